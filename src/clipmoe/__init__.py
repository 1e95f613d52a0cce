"""clipmoe: turn a pretrained CLIP into a sparse Mixture-of-Experts CLIP by Diversified Multiplet Upcycling."""

from . import moe_kernels  # noqa: F401  (registers the fast expert kernels into moe.EXPERT_KERNELS)
from .checkpoint import CheckpointError, load
from .convert import convert_file
from .modeling import ClipMoeModel, ClipMoeVisionModel, MoESpec
from .moe import MoEFeedForward, load_balancing_loss, router_z_loss
from .surgery import find_ffns, sparse_upcycle, upcycle

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
