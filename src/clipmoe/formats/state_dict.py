"""State dicts on disk: read one without executing pickled code, load one strictly (naming every mismatch and
every tensor that is not floating point or not finite), write a torch file atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..utils.io import atomic_file
from ..utils.keys import key_mismatch
from .hub import WEIGHT_FILES as WEIGHT_FILES  # defined with the model-name resolution (torch-free)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (wrong format, keys, shapes, truncated file)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a plain torch state-dict pickle (weights only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {str(e)[:300]}). "
            "Loading it would require executing pickled code, which clipmoe refuses; "
            "convert it to safetensors with a trusted tool first."
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_weights(
    state_dict: Mapping[str, torch.Tensor], source: str, expected: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Refuse a tensor that is not floating point (where ``expected``, the model's state dict, has a floating
    point tensor under that name) or that holds a NaN or inf, naming it; other dtypes are cast on load."""
    for name, tensor in state_dict.items():
        want = expected.get(name) if expected is not None else None
        if want is not None and not want.is_floating_point():
            continue  # an integer buffer of the model
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                "weights must be floating point (is this file a model checkpoint?)"
            )
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise CheckpointError(
                f"{source}: tensor {name} holds {nan} NaN and {inf} inf value(s) of {tensor.numel()}; "
                "refusing a model with non-finite weights"
            )


def save_file_atomically(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to a temporary sibling, renamed to ``path``: a kill leaves the previous file, and
    a full disk removes the temporary and raises one ``utils.io.WriteError`` naming ``path``."""
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what is missing, extra or mis-shaped, or
    names a tensor that is not floating point or not finite."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mis_shaped:
        problems = key_mismatch(missing=missing, unexpected=unexpected, **{"wrong shape": mis_shaped})
        raise CheckpointError(f"{source} does not match the model built from its config; {problems}")
    check_weights(state_dict, source, expected)
    model.load_state_dict(state_dict, strict=True)
