"""Import single-file CLIP checkpoints as ``ClipMoeModel``: OpenAI CLIP / open_clip (dense or Long-CLIP), the
official CLIP-MoE release, and HF ``CLIPModel`` state dicts.

A checkpoint file carries no config, so, like OpenAI's ``build_model``, every hyperparameter is read off tensor
shapes and key counts: widths, block counts, patch and image size, context length, vocabulary, projection width,
which blocks are MoE and how many experts they hold. Heads follow CLIP's 64-dim rule (``width // 64``).

Nothing pickled is executed: safetensors and ``torch.load(weights_only=True)`` read ordinary files, and TorchScript
archives (OpenAI's ``.pt`` downloads) go through a restricted unpickler that rebuilds tensors and refuses every other
global. Bad files fail with a ``CheckpointError`` that names the file and the problem.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
import torch.jit._pickle as jit_pickle
from transformers import CLIPConfig
from transformers.activations import ACT2FN
from transformers.initialization import no_init_weights

from ..data.processing import OPENAI_MEAN, OPENAI_STD, ImageTransform, TextTokenizer
from ..model.modeling import TOWERS, ClipMoeModel, MoESpec
from ..utils.keys import key_mismatch
from .hub import parse_repo_id, resolve_file, resolve_model
from .state_dict import CheckpointError, load_state_dict_strict, read_state_dict

CLI_CONVERT_HELP = """Convert a checkpoint file (OpenAI CLIP, open_clip, official CLIP-MoE, HF state dict) to a clipmoe folder.

The output is an HF-style folder that `clipmoe.load` opens. The checkpoint holds no tokenizer: pass --tokenizer DIR
to include one. SRC may be a Hugging Face repo id (owner/name[@revision]) with --file naming the checkpoint in it;
--tokenizer may be a repo id too (only its tokenizer files are fetched). Both go through the HF cache (HF_HOME,
HF_HUB_OFFLINE). The image preprocessing (OpenAI's: resize, center crop to the model's resolution, normalise) is
written from the inferred resolution and the --image-* options.
"""

HEAD_DIM = 64  # OpenAI CLIP (and open_clip's default head_width): heads = width // 64
LONG_CLIP_KEPT = 20  # Long-CLIP keeps positions 0-19 from `positional_embedding`, the rest from `_res`
DEFAULT_ACT = "quick_gelu"  # OpenAI CLIP and the official CLIP-MoE release were trained with QuickGELU
FORMATS = ("openai", "clip-moe", "hf")

_VISION_BLOCKS, _TEXT_BLOCKS = "visual.transformer.resblocks.", "transformer.resblocks."
_OPENAI_REQUIRED = (
    "visual.conv1.weight",
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "text_projection",
)
_OPENAI_TOP_LEVEL = (
    *_OPENAI_REQUIRED,
    "visual.class_embedding",
    "visual.ln_pre.weight",
    "visual.ln_pre.bias",
    "visual.ln_post.weight",
    "visual.ln_post.bias",
    "ln_final.bias",
    "logit_scale",
)
# Non-weight entries of OpenAI / open_clip files: the ints OpenAI's JIT models keep as tensors, and causal masks
# (rebuilt by the HF text tower).
_IGNORED = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
_HF_REQUIRED = (
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight",
    "text_projection.weight",
    "visual_projection.weight",
)


# ---------------------------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, a ``torch.save`` state dict or a TorchScript archive, without running
    pickled code. The format is told from the content, so a PNG or a text file named ``.pt`` gets a clear error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    kind = _file_kind(path)
    if kind == "torchscript":
        return read_torchscript(path)
    if (kind == "safetensors") != path.endswith(".safetensors"):  # read_state_dict goes by the name
        actual, suffix = ("safetensors", ".safetensors") if kind == "safetensors" else ("torch.save", ".pt")
        raise CheckpointError(f"{path} is a {actual} file under another name; rename it to end in {suffix}")
    return read_state_dict(path)


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"\x89HDF", "an HDF5 file"),
)


def _file_kind(path: str) -> str:
    """``safetensors``, ``torchscript`` or ``torch``, from the first bytes (and the zip directory)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{path} is empty")
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            raise CheckpointError(f"{path} is {what}, not a model checkpoint")
    if all(b >= 32 or b in b"\t\n\r\f" for b in head) and head[0] < 0x80:
        raise CheckpointError(f"{path} is a text file, not a model checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if path.endswith(".safetensors") or (len(head) > 8 and head[8:9] == b"{"):
        _check_safetensors(path, size)
        return "safetensors"
    if head[0] == 0x80:  # pickle PROTO opcode: the legacy (pre-zip) torch.save format
        return "torch"
    raise CheckpointError(
        f"{path} is not a checkpoint format clipmoe reads (safetensors, torch.save, TorchScript); "
        f"it starts with {head[:8]!r}"
    )


def _zip_kind(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path} is a truncated or corrupt zip archive ({e})") from e
    if any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names):  # how torch.load spots TorchScript
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch"
    raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (it has no data.pkl)")


def _check_safetensors(path: str, size: int) -> None:
    """Catch truncation up front, with sizes in the message (safetensors' own error does not say)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes, the file has {size}"
            )
        header = f.read(n)
    try:
        meta = json.loads(header)
        end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: unreadable header ({e})") from e
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {end} bytes of tensor data but only {size - 8 - n} follow"
        )


# TorchScript archives pickle the module tree as objects of `__torch__.*` classes whose code lives in the archive.
# The unpickler below never imports or runs that code: every such class becomes an inert `_ScriptObject`, storages
# are read straight from the zip, and the only callables it will hand to pickle are these pure functions.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_unused) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a view into the flat storage read from the zip."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("tensor without a storage")
    return storage.as_strided(tuple(size), tuple(stride), offset)


_SAFE_CALLABLES = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # identity functions TorchScript uses to tag the types of list / dict attributes
    ("torch.jit._pickle", "restore_type_tag"): jit_pickle.restore_type_tag,
    ("torch.jit._pickle", "build_intlist"): jit_pickle.build_intlist,
    ("torch.jit._pickle", "build_tensorlist"): jit_pickle.build_tensorlist,
    ("torch.jit._pickle", "build_doublelist"): jit_pickle.build_doublelist,
    ("torch.jit._pickle", "build_boollist"): jit_pickle.build_boollist,
}


class _ScriptObject:
    """Stands in for every TorchScript class while unpickling: it records the attributes and runs nothing."""

    def __init__(self) -> None:
        self.attributes: dict = {}

    def __setstate__(self, state) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, root: str, source: str) -> None:
        super().__init__(io.BytesIO(archive.read(f"{root}/data.pkl")))
        self.archive, self.root, self.source = archive, root, source
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _SAFE_CALLABLES:
            return _SAFE_CALLABLES[module, name]
        raise CheckpointError(
            f"{self.source} is a TorchScript archive that refers to {module}.{name}; clipmoe only rebuilds tensors "
            "from TorchScript archives and will not run anything else. Re-save the model as a state dict "
            "(torch.save(model.state_dict()) or safetensors) with a trusted tool first."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            raw = self.archive.read(f"{self.root}/data/{key}")
            nbytes = int(numel) * dtype.itemsize
            if len(raw) < nbytes:
                raise CheckpointError(f"{self.source} is truncated: storage {key} has {len(raw)} of {nbytes} bytes")
            flat = torch.frombuffer(bytearray(raw[:nbytes]), dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            self.storages[key] = flat
        return self.storages[key]


def read_torchscript(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (``torch.jit.save``), read without running its code."""
    path = os.fspath(path)
    with zipfile.ZipFile(path) as archive:
        roots = [n[: -len("/data.pkl")] for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(roots) != 1:
            raise CheckpointError(f"{path} is not a TorchScript archive (expected one <name>/data.pkl)")
        root = roots[0]
        if f"{root}/byteorder" in archive.namelist() and archive.read(f"{root}/byteorder") != b"little":
            raise CheckpointError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")
        try:
            tree = _TorchScriptUnpickler(archive, root, path).load()
        except CheckpointError:
            raise
        except Exception as e:  # any malformed pickle or zip entry: report, never half-load
            raise CheckpointError(
                f"{path}: cannot read the TorchScript archive's tensors ({type(e).__name__}: {e})"
            ) from e
    state: dict[str, torch.Tensor] = {}
    _collect_tensors(tree, "", state)
    if not state:
        raise CheckpointError(f"{path} is a TorchScript archive without tensors")
    return state


def _collect_tensors(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if not isinstance(obj, _ScriptObject):
        return
    for name, value in obj.attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        else:
            _collect_tensors(value, f"{prefix}{name}.", out)


# ---------------------------------------------------------------------------------------------------------------
# Building the model


class _Layout(NamedTuple):
    """A checkpoint read in HF ``CLIPModel`` names, with what its shapes say about the architecture."""

    state: dict[str, torch.Tensor]
    vision: dict  # CLIPVisionConfig fields inferred from shapes
    text: dict  # CLIPTextConfig fields inferred from shapes
    projection_dim: int
    moe_layers: dict[str, list[int]]  # tower -> blocks holding experts
    num_experts: int


def convert_file(path: str | os.PathLike, top_k: int = 2, hidden_act: str | None = None) -> ClipMoeModel:
    """Read a checkpoint file and build the ``ClipMoeModel`` it describes (see ``from_state_dict``)."""
    return from_state_dict(read_checkpoint(path), os.fspath(path), top_k=top_k, hidden_act=hidden_act)


def detect_format(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> str:
    """``openai`` (OpenAI CLIP / open_clip / Long-CLIP naming), ``clip-moe`` (official release: OpenAI naming with
    ``experts.K`` and ``gate`` in MoE blocks) or ``hf`` (``CLIPModel`` keys, dense or clipmoe's MoE layout)."""
    keys = list(state_dict)
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in keys):
        raise CheckpointError(f"{source} is a ResNet CLIP; only ViT CLIPs convert (HF CLIPModel has no ResNet tower)")
    if any(k.startswith(("visual.", _TEXT_BLOCKS)) or k == "token_embedding.weight" for k in keys):
        moe = any(".experts." in k or k.endswith(".gate.weight") for k in keys)
        return "clip-moe" if moe else "openai"
    raise CheckpointError(
        f"{source} has an unrecognised layout: expected OpenAI/open_clip keys (visual.conv1.weight, "
        "transformer.resblocks.N...), official CLIP-MoE keys (resblocks.N.experts.K.c_fc...) or HF CLIPModel "
        f"keys (vision_model..., text_model...); its first keys are {keys[:5]}"
    )


def from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    source: str = "state dict",
    top_k: int = 2,
    hidden_act: str | None = None,
) -> ClipMoeModel:
    """Build a ``ClipMoeModel`` (fp32, eval mode) from a CLIP state dict in any format ``detect_format`` knows.

    ``top_k`` applies to MoE checkpoints: it is not stored in the files, and 2 is the CLIP-MoE paper's setting.
    ``hidden_act`` is the FFN activation, which no weight reveals: None means ``quick_gelu``, right for OpenAI CLIP
    and the official CLIP-MoE release; open_clip models trained without QuickGELU (e.g. LAION ``ViT-B-32``, not
    ``ViT-B-32-quickgelu``) need ``"gelu"``. ``source`` names the checkpoint in error messages.

    The text config takes OpenAI's token ids: BOS = vocab - 2, EOS = vocab - 1 (49406 / 49407), pad = 0. HF pools
    text at the first EOS, which is where OpenAI's argmax pooling lands since EOS is the largest id.
    """
    hidden_act = hidden_act or DEFAULT_ACT
    if hidden_act not in ACT2FN:
        raise ValueError(f"unknown hidden_act {hidden_act!r}; CLIP models use 'quick_gelu' or 'gelu'")
    fmt = detect_format(state_dict, source)
    build = _hf_layout if fmt == "hf" else _openai_layout
    layout = build(dict(state_dict), source)
    config = _clip_config(layout.vision, layout.text, layout.projection_dim, hidden_act, source)
    if any(layout.moe_layers.values()):
        if not 1 <= top_k <= layout.num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the {layout.num_experts} experts of {source}")
        config.moe = MoESpec(layout.num_experts, top_k, layout.moe_layers).to_dict()
    with no_init_weights():  # every weight is overwritten below; random init of a ViT-L MoE alone takes ~30 s
        model = ClipMoeModel(config)
    load_state_dict_strict(model, layout.state, source)
    size = config.vision_config.image_size
    model.image_processor = ImageTransform(size=size, crop_size=size)  # OpenAI's preprocessing at this resolution
    return model.eval()


def _openai_layout(sd: dict[str, torch.Tensor], source: str) -> _Layout:
    """OpenAI / open_clip / official CLIP-MoE naming -> HF keys, plus the shapes the config needs."""
    _require(sd, _OPENAI_REQUIRED, source, "to infer the architecture")
    prefixes = {"vision": _VISION_BLOCKS, "text": _TEXT_BLOCKS}
    blocks = {t: _block_subkeys(sd, p) for t, p in prefixes.items()}
    experts = {t: {i: _num_experts(subs) for i, subs in b.items()} for t, b in blocks.items()}
    num_experts = max((e for tower in experts.values() for e in tower.values()), default=0)
    moe_layers = {t: sorted(i for i, e in experts[t].items() if e) for t in TOWERS}
    layers = {t: max(b, default=-1) + 1 for t, b in blocks.items()}
    for tower, n in layers.items():
        if n == 0:
            raise CheckpointError(f"{source} has no transformer blocks for the {tower} tower ({prefixes[tower]}N...)")
    expected = set(_OPENAI_TOP_LEVEL)
    if "positional_embedding_res" in sd:
        expected.add("positional_embedding_res")
    for tower, prefix in prefixes.items():
        for i in range(layers[tower]):
            expected.update(_openai_block_keys(f"{prefix}{i}.", num_experts if i in moe_layers[tower] else 0))
    present = {k for k in sd if k.rsplit(".", 1)[-1] not in _IGNORED}
    _check_keys(source, missing=expected - present, unexpected=present - expected)

    out = {
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": _text_positions(sd, source),
        "text_projection.weight": sd["text_projection"].t(),
        "logit_scale": sd["logit_scale"].reshape(()) if sd["logit_scale"].numel() == 1 else sd["logit_scale"],
    }
    for ours, theirs in (
        ("vision_model.pre_layrnorm", "visual.ln_pre"),
        ("vision_model.post_layernorm", "visual.ln_post"),
        ("text_model.final_layer_norm", "ln_final"),
    ):
        for param in ("weight", "bias"):
            out[f"{ours}.{param}"] = sd[f"{theirs}.{param}"]
    for tower, prefix in prefixes.items():
        for i in range(layers[tower]):
            e = num_experts if i in moe_layers[tower] else 0
            out.update(_map_block(sd, f"{prefix}{i}.", f"{tower}_model.encoder.layers.{i}.", e, source))

    conv = sd["visual.conv1.weight"]
    patch, positions = conv.shape[-1], sd["visual.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if conv.dim() != 4 or grid * grid + 1 != positions:
        raise CheckpointError(
            f"{source}: visual.positional_embedding has {positions} rows, not a square grid of patches plus "
            "the class token"
        )
    first = {
        t: f"{p}0." + ("experts.0.c_fc.weight" if 0 in moe_layers[t] else "mlp.c_fc.weight")
        for t, p in prefixes.items()
    }
    vision = {
        "hidden_size": conv.shape[0],
        "intermediate_size": sd[first["vision"]].shape[0],
        "num_hidden_layers": layers["vision"],
        "num_channels": conv.shape[1],
        "patch_size": patch,
        "image_size": patch * grid,
    }
    text = {
        "hidden_size": sd["ln_final.weight"].shape[0],
        "intermediate_size": sd[first["text"]].shape[0],
        "num_hidden_layers": layers["text"],
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "max_position_embeddings": out["text_model.embeddings.position_embedding.weight"].shape[0],
    }
    projection_dim = _projection_dim(sd["visual.proj"].shape[-1], sd["text_projection"].shape[-1], source)
    return _Layout(out, vision, text, projection_dim, moe_layers, num_experts)


def _block_subkeys(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[int, set[str]]:
    """Block index -> the key suffixes under ``prefix + index + '.'``."""
    blocks: dict[int, set[str]] = {}
    for key in sd:
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            if index.isdigit():
                blocks.setdefault(int(index), set()).add(rest)
    return blocks


def _num_experts(subkeys: Iterable[str]) -> int:
    """Experts of one official CLIP-MoE block (``experts.K...``), 0 for a dense block."""
    ids = [int(k.split(".")[1]) for k in subkeys if k.startswith("experts.") and k.split(".")[1].isdigit()]
    if ids:
        return max(ids) + 1
    return 1 if any(k.startswith("gate.") for k in subkeys) else 0  # a gate without experts: report missing keys


def _openai_block_keys(p: str, num_experts: int) -> list[str]:
    keys = [p + s for s in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")]
    keys += [p + s for s in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias")]
    fc = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")
    if num_experts:
        return [*keys, p + "gate.weight", *(f"{p}experts.{k}.{s}" for k in range(num_experts) for s in fc)]
    return keys + [f"{p}mlp.{s}" for s in fc]


def _map_block(sd: Mapping[str, torch.Tensor], src: str, dst: str, num_experts: int, source: str) -> dict:
    """One OpenAI block -> HF names: in_proj split into q/k/v, c_fc/c_proj -> fc1/fc2 (or stacked experts)."""
    out = {}
    for theirs, ours in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj")):
        for param in ("weight", "bias"):
            out[f"{dst}{ours}.{param}"] = sd[f"{src}{theirs}.{param}"]
    for param in ("weight", "bias"):
        for name, part in zip("qkv", sd[f"{src}attn.in_proj_{param}"].chunk(3, dim=0)):
            out[f"{dst}self_attn.{name}_proj.{param}"] = part
    if not num_experts:
        for theirs, ours in (("c_fc", "fc1"), ("c_proj", "fc2")):
            for param in ("weight", "bias"):
                out[f"{dst}mlp.{ours}.{param}"] = sd[f"{src}mlp.{theirs}.{param}"]
        return out
    out[f"{dst}mlp.router.weight"] = sd[f"{src}gate.weight"]
    for ours, theirs in (("w1", "c_fc.weight"), ("b1", "c_fc.bias"), ("w2", "c_proj.weight"), ("b2", "c_proj.bias")):
        parts = [sd[f"{src}experts.{k}.{theirs}"] for k in range(num_experts)]
        if len({p.shape for p in parts}) != 1:
            shapes = [tuple(p.shape) for p in parts]
            raise CheckpointError(f"{source}: the experts of {src[:-1]} differ in shape ({theirs}: {shapes})")
        out[f"{dst}mlp.{ours}"] = torch.stack(parts)
    return out


def _text_positions(sd: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    """Text position embeddings; Long-CLIP / CLIP-MoE files split them over two tensors of the full length,
    combined by masks: rows 0-19 of ``positional_embedding`` and rows 20.. of ``positional_embedding_res``."""
    pe = sd["positional_embedding"]
    if "positional_embedding_res" not in sd:
        return pe
    res = sd["positional_embedding_res"]
    if res.shape != pe.shape or pe.shape[0] <= LONG_CLIP_KEPT:
        raise CheckpointError(
            f"{source}: positional_embedding {tuple(pe.shape)} and positional_embedding_res {tuple(res.shape)} "
            f"must have the same shape, longer than {LONG_CLIP_KEPT} rows (Long-CLIP layout)"
        )
    return torch.cat([pe[:LONG_CLIP_KEPT], res[LONG_CLIP_KEPT:]])


def _hf_layout(sd: dict[str, torch.Tensor], source: str) -> _Layout:
    """An HF ``CLIPModel`` state dict (dense, or clipmoe's ``mlp.router / w1..b2`` MoE blocks)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a buffer older transformers saved
    _require(sd, _HF_REQUIRED, source, "to infer the architecture")
    vision, text = {}, {}
    moe_layers, experts = {}, set()
    for tower, cfg in (("vision", vision), ("text", text)):
        prefix = f"{tower}_model.encoder.layers."
        blocks = _block_subkeys(sd, prefix)
        if not blocks:
            raise CheckpointError(f"{source} has no transformer blocks for the {tower} tower ({prefix}N...)")
        moe_layers[tower] = sorted(i for i, subs in blocks.items() if "mlp.router.weight" in subs)
        experts.update(sd[f"{prefix}{i}.mlp.router.weight"].shape[0] for i in moe_layers[tower])
        up = f"{prefix}0.mlp." + ("w1" if 0 in moe_layers[tower] else "fc1.weight")
        _require(sd, (up,), source, f"to infer the {tower} FFN width")
        cfg["hidden_size"] = sd[f"{tower}_model.embeddings.position_embedding.weight"].shape[1]
        cfg["intermediate_size"] = sd[up].shape[-2]
        cfg["num_hidden_layers"] = max(blocks) + 1
    if len(experts) > 1:
        raise CheckpointError(f"{source}: MoE blocks disagree on the number of experts ({sorted(experts)})")
    patch = sd["vision_model.embeddings.patch_embedding.weight"]
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = round((positions - 1) ** 0.5)
    vision.update(num_channels=patch.shape[1], patch_size=patch.shape[-1], image_size=patch.shape[-1] * grid)
    text.update(
        vocab_size=sd["text_model.embeddings.token_embedding.weight"].shape[0],
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
    )
    projection_dim = _projection_dim(
        sd["visual_projection.weight"].shape[0], sd["text_projection.weight"].shape[0], source
    )
    return _Layout(sd, vision, text, projection_dim, moe_layers, experts.pop() if experts else 0)


def _clip_config(vision: dict, text: dict, projection_dim: int, hidden_act: str, source: str) -> CLIPConfig:
    for tower, cfg in (("vision", vision), ("text", text)):
        width = cfg["hidden_size"]
        if width % HEAD_DIM:
            raise CheckpointError(
                f"{source}: the {tower} width {width} is not a multiple of {HEAD_DIM}, so its number of attention "
                f"heads cannot be inferred (CLIP uses {HEAD_DIM}-dim heads)"
            )
        cfg.update(num_attention_heads=width // HEAD_DIM, hidden_act=hidden_act, projection_dim=projection_dim)
    vocab = text["vocab_size"]
    text.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)  # OpenAI: <sot>, <eot>, zero-pad
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def _projection_dim(vision: int, text: int, source: str) -> int:
    if vision != text:
        raise CheckpointError(f"{source}: image and text projections differ in width ({vision} vs {text})")
    return int(vision)


def _require(sd: Mapping[str, torch.Tensor], keys: Iterable[str], source: str, why: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"{source} lacks keys needed {why}: {', '.join(missing)}")


def _check_keys(source: str, missing: set[str], unexpected: set[str]) -> None:
    if missing or unexpected:
        problems = key_mismatch(missing=sorted(missing), unexpected=sorted(unexpected))
        raise CheckpointError(f"{source} does not match the CLIP layout its shapes imply; {problems}")


def attach_tokenizer(model: ClipMoeModel, folder: str | os.PathLike) -> TextTokenizer:
    """Give a converted model the HF tokenizer in ``folder``; its BOS/EOS/pad ids go into the text config, since
    the EOS id decides where the text tower pools."""
    tokenizer = TextTokenizer.from_folder(folder, model.config.text_config.max_position_embeddings)
    vocab = model.config.text_config.vocab_size
    if len(tokenizer.hf) > vocab:
        raise ValueError(f"the tokenizer in {folder} has {len(tokenizer.hf)} tokens; the model embeds only {vocab}")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer.hf, attr)
        if value is not None:
            setattr(model.config.text_config, attr, value)
    model.text_model.eos_token_id = model.config.text_config.eos_token_id  # cached by the text tower at init
    model.tokenizer = tokenizer
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# CLI


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="checkpoint file (.pt/.bin state dict or TorchScript archive, .safetensors), or a Hugging Face repo id "
        "owner/name[@revision] with --file",
    )
    parser.add_argument("--file", metavar="NAME", help="the checkpoint file inside the repo SRC names")
    parser.add_argument("dst", help="output folder (HF layout, opened by clipmoe.load)")
    parser.add_argument("--top-k", type=int, default=None, help="experts per token for MoE checkpoints (default 2)")
    parser.add_argument(
        "--hidden-act",
        choices=("quick_gelu", "gelu"),
        default=None,
        help="FFN activation (default quick_gelu, as OpenAI CLIP; gelu for open_clip models trained without it)",
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="folder (or Hugging Face repo id) with an HF tokenizer to include"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="resize the shortest image side to N before the center crop (default: the model's resolution)",
    )
    parser.add_argument(
        "--image-mean", type=float, nargs=3, metavar=("R", "G", "B"), default=OPENAI_MEAN, help="default: OpenAI's"
    )
    parser.add_argument(
        "--image-std", type=float, nargs=3, metavar=("R", "G", "B"), default=OPENAI_STD, help="default: OpenAI's"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run_convert(args: argparse.Namespace) -> int:
    top_k_given, args.top_k = args.top_k is not None, 2 if args.top_k is None else args.top_k
    if not args.dst:
        raise ValueError("no output folder given")
    if args.file:
        if os.path.exists(args.src) or parse_repo_id(args.src) is None:
            raise ValueError(f"--file names a file inside a Hugging Face repo; {args.src} is not a repo id")
        args.src = resolve_file(args.src, args.file)
    elif not os.path.exists(args.src) and parse_repo_id(args.src) is not None:
        raise ValueError(f"{args.src} is a Hugging Face repo id: name the checkpoint file in it with --file")
    if os.path.isdir(args.src):
        raise ValueError(f"{args.src} is a folder; convert reads one checkpoint file (clipmoe.load opens folders)")
    if os.path.exists(args.dst) and not args.overwrite and not (os.path.isdir(args.dst) and not os.listdir(args.dst)):
        raise ValueError(f"{args.dst} already exists; pass --overwrite to replace it")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be positive, got {args.image_size}")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    state = read_checkpoint(args.src)
    fmt = detect_format(state, args.src)
    model = from_state_dict(state, args.src, top_k=args.top_k, hidden_act=args.hidden_act)
    if top_k_given and not model.moe_layers():
        raise ValueError(f"--top-k is for MoE checkpoints; {args.src} is a dense CLIP")
    crop = model.config.vision_config.image_size
    model.image_processor = ImageTransform(
        size=args.image_size or crop, crop_size=crop, mean=tuple(args.image_mean), std=tuple(args.image_std)
    )
    if args.tokenizer:
        attach_tokenizer(model, resolve_model(args.tokenizer, weights=False))
    model.save_pretrained(args.dst, overwrite=args.overwrite)

    vc, tc, spec = model.config.vision_config, model.config.text_config, model.moe_spec
    print(
        f"converted {fmt} checkpoint {args.src} -> {args.dst}: vision {vc.num_hidden_layers} blocks x "
        f"{vc.hidden_size} ({vc.image_size} px, patch {vc.patch_size}), text {tc.num_hidden_layers} blocks x "
        f"{tc.hidden_size} (context {tc.max_position_embeddings}, vocab {tc.vocab_size})"
        + (f", {spec.num_experts} experts top-{spec.top_k} in blocks {spec.layers}" if spec else ", dense")
    )
    if not args.tokenizer:
        print(
            f"note: {args.src} holds no tokenizer, so {args.dst} has none; pass --tokenizer DIR (e.g. the tokenizer "
            "files of the matching HF CLIP) or add tokenizer files to the folder before encoding text"
        )
    return 0
