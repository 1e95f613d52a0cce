"""clipmoe: turn a pretrained CLIP into a sparse Mixture-of-Experts CLIP by Diversified Multiplet Upcycling.

The public API below is resolved on first use (PEP 562), so that ``import clipmoe.cli`` (and ``clipmoe --help``)
does not pay for torch and transformers; ``from clipmoe import load`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "CheckpointError": "clipmoe.formats.state_dict",
    "ClipMoeConfig": "clipmoe.model.modeling",
    "ClipMoeModel": "clipmoe.model.modeling",
    "ClipMoeVisionConfig": "clipmoe.model.modeling",
    "ClipMoeVisionModel": "clipmoe.model.modeling",
    "MoEFeedForward": "clipmoe.model.moe",
    "MoEOptions": "clipmoe.model.options",
    "MoESpec": "clipmoe.model.modeling",
    "assemble_moe": "clipmoe.model.surgery",
    "convert_file": "clipmoe.formats.convert",
    "find_ffns": "clipmoe.model.surgery",
    "load": "clipmoe.formats.load",
    "load_balancing_loss": "clipmoe.model.moe",
    "router_z_loss": "clipmoe.model.moe",
    "sparse_upcycle": "clipmoe.model.surgery",
}

__all__ = [
    "CheckpointError",
    "ClipMoeConfig",
    "ClipMoeModel",
    "ClipMoeVisionConfig",
    "ClipMoeVisionModel",
    "MoEFeedForward",
    "MoEOptions",
    "MoESpec",
    "assemble_moe",
    "convert_file",
    "find_ffns",
    "load",
    "load_balancing_loss",
    "router_z_loss",
    "sparse_upcycle",
]
assert set(__all__) == set(_API)

if TYPE_CHECKING:
    from .formats.convert import convert_file
    from .formats.load import load
    from .formats.state_dict import CheckpointError
    from .model.modeling import ClipMoeConfig, ClipMoeModel, ClipMoeVisionConfig, ClipMoeVisionModel, MoESpec
    from .model.moe import MoEFeedForward, load_balancing_loss, router_z_loss
    from .model.options import MoEOptions
    from .model.surgery import assemble_moe, find_ffns, sparse_upcycle


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clipmoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
