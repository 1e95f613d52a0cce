"""The floating-point dtypes a user may ask for (``--dtype``): one table for every command."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_CHOICES = sorted(DTYPES) + sorted(ALIASES)  # for argparse ``choices``


def torch_dtype(name: str) -> torch.dtype:
    """The dtype called ``name`` (``float32`` / ``fp32``, ...); a ValueError naming the choices otherwise."""
    name = ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return DTYPES[name]
