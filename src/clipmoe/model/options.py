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
    # Switch/GShard token dropping: each expert takes at most ceil(factor * tokens * top_k / routed experts)
    # (token, slot) pairs per layer call; 0 = no limit (dropless). Training only unless capacity_at_inference.
    capacity_factor: float = 0.0
    capacity_at_inference: bool = False
    # A fusion gate that keeps expert 0 (the base FFN) for every token: top_k of the other experts are added to
    # it, weighted by their router probabilities (CLIP-FMoE's idea; moe.MoEFeedForward)
    always_on_base: bool = False

    def layer_options(self) -> dict:
        """The options ``MoEFeedForward`` takes beyond top_k, expert_dropout and dispatch (saved in config.moe)."""
        return {
            "uniform": self.uniform,
            "capacity_factor": self.capacity_factor,
            "capacity_at_inference": self.capacity_at_inference,
            "always_on_base": self.always_on_base,
        }
