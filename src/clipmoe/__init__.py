"""clipmoe: turn a pretrained CLIP into a sparse Mixture-of-Experts CLIP by Diversified Multiplet Upcycling."""

from .formats.convert import convert_file
from .formats.load import CheckpointError, load
from .model.modeling import ClipMoeModel, ClipMoeVisionModel, MoESpec
from .model.moe import MoEFeedForward, load_balancing_loss, router_z_loss
from .model.surgery import find_ffns, sparse_upcycle, upcycle

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ClipMoeModel",
    "ClipMoeVisionModel",
    "MoEFeedForward",
    "MoESpec",
    "convert_file",
    "find_ffns",
    "load",
    "load_balancing_loss",
    "router_z_loss",
    "sparse_upcycle",
    "upcycle",
]
