"""The one wording of a key mismatch between a state dict and a model (strict loading, conversion, surgery)."""

from __future__ import annotations

from collections.abc import Sequence

SHOWN = 10  # keys named per group; the rest are counted


def key_mismatch(**groups: Sequence[str]) -> str:
    """``"missing keys: a, b; unexpected keys: c, ... (12 in all)"`` for the non-empty groups, in order."""
    parts = []
    for label, keys in groups.items():
        if keys:
            shown = ", ".join(keys[:SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > SHOWN else "")
            parts.append(f"{label} keys: {shown}")
    return "; ".join(parts)
