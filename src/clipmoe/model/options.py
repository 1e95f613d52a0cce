"""How a CLIP-MoE is built, as one plain object (torch-free): the pipeline's ``moe`` config section is this
object plus the number of experts, and surgery takes it whole, so a new MoE option is added here once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class MoEOptions:
    top_k: int = 2
    layers: Any = "all"  # "all" | N (last N blocks per tower) | [block ids] | {vision: ..., text: ...}
    expert_dropout: float = 0.0  # dropout inside experts while training (the official code: 0.1 for routing)
    dispatch: str = "auto"  # how tokens reach experts: auto | loop | grouped_mm (a run-time choice)
    # No routing: every token through every expert, outputs averaged with equal weights (top_k is then the
    # number of experts). The "uniform mixture" control row; saved in the model's config.
    uniform: bool = False
