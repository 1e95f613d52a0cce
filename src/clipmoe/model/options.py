"""How a CLIP-MoE is built, as one plain object (torch-free): the pipeline's ``moe`` config section is this
object plus the number of experts, and surgery takes it whole, so a new MoE option is added here once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LayerSelection = str | int | Sequence[int] | Mapping[str, "str | int | Sequence[int]"]


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


def resolve_layers(layers: LayerSelection, num_blocks: Mapping[str, int]) -> dict[str, list[int]]:
    """Turn a layer selection into block indices per tower.

    ``"all"``; an int N (the last N blocks of each tower); a list of block indices (every tower); or a
    mapping ``{"vision": ..., "text": ...}`` of any of those per tower (a missing tower gets none).
    """
    if isinstance(layers, Mapping):
        unknown = set(layers) - set(num_blocks)
        if unknown:
            raise ValueError(f"unknown tower(s) in layers: {sorted(unknown)}; expected {tuple(num_blocks)}")
        return {t: _resolve_one(layers[t], t, num_blocks[t]) if t in layers else [] for t in num_blocks}
    return {t: _resolve_one(layers, t, n) for t, n in num_blocks.items()}


def _resolve_one(sel, tower: str, n: int) -> list[int]:
    if sel == "all":
        return list(range(n))
    if isinstance(sel, bool) or not isinstance(sel, (int, Sequence)) or isinstance(sel, str):
        raise ValueError(f"layers for the {tower} tower must be 'all', an int or a list of ints, got {sel!r}")
    if isinstance(sel, int):
        if not 0 <= sel <= n:
            raise ValueError(f"cannot make the last {sel} blocks MoE: the {tower} tower has {n} blocks")
        return list(range(n - sel, n))
    out = sorted({int(i) for i in sel})
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range for the {tower} tower (blocks 0..{n - 1})")
    return out
