"""The one wording of a key mismatch between a state dict and a model (strict loading, conversion, surgery),
and of any list of names too long to print whole."""

from __future__ import annotations

from collections.abc import Sequence

SHOWN = 10  # keys named per group; the rest are counted


def first_few(items: Sequence[str], n: int = SHOWN) -> str:
    """``"a, b, ... (12 in all)"``: the first ``n`` of ``items``, and how many there are when there are more."""
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def key_mismatch(**groups: Sequence[str]) -> str:
    """``"missing keys: a, b; unexpected keys: c, ... (12 in all)"`` for the non-empty groups, in order."""
    return "; ".join(f"{label} keys: {first_few(keys)}" for label, keys in groups.items() if keys)
