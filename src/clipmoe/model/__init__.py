"""The CLIP-MoE model: the MoE layer, the HF-compatible model classes, surgery (assembly, sparse upcycling), the
Long-CLIP position stretch. Depends on nothing else in clipmoe."""

from . import kernels  # noqa: F401  (registers the fast expert kernels beside the plain layer in moe.py)
