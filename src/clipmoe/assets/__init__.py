"""Files shipped inside the package: the tiny pretrained base CLIP used by the demo and the tests."""

from __future__ import annotations

import os

ASSETS = os.path.dirname(os.path.abspath(__file__))
TINY_CLIP = os.path.join(ASSETS, "tiny-clip")  # HF CLIP folder pretrained on the generated world's short captions


def resolve_model_path(name: str) -> str:
    """``builtin:tiny-clip`` -> the shipped folder; any other string is returned unchanged."""
    if name.startswith("builtin:"):
        path = os.path.join(ASSETS, name.removeprefix("builtin:"))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no built-in model {name!r} (looked in {ASSETS})")
        return path
    return name
