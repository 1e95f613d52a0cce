"""Model names -> files on disk: a local path, a shipped ``builtin:`` model, or a Hugging Face Hub repo id.

Every command and function that takes a model (``clipmoe.load``, a pipeline config's ``base_model``,
``clipmoe eval``/``export``/``index``/``convert``) resolves its name here, in this order:

1. a path that exists on this machine (file or folder): itself; a local folder always wins over a repo id;
2. ``builtin:NAME``: the folder shipped in ``clipmoe/assets``;
3. ``owner/name`` or ``owner/name@revision`` (a branch, tag or commit): a folder of huggingface_hub's own
   cache, filled by ``snapshot_download`` / ``hf_hub_download``, so ``HF_HOME``, ``HF_HUB_CACHE``,
   ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` work as for any HF library. Only the files a model needs are fetched
   (config, tokenizer, preprocessor, remote code, and one weights file: ``model.safetensors``, else
   ``pytorch_model.bin``), never the TF/Flax/ONNX copies a repo may also hold.

A repo id that is neither cached nor downloadable now (``HF_HUB_OFFLINE``, no network) is one
``ModelNotCachedError`` naming the id, the cache folder searched and ``HF_HUB_OFFLINE``. This module imports
no torch: the pipeline's config validation uses it.
"""

from __future__ import annotations

import os
import re

from ..assets import resolve_model_path

__all__ = [
    "ModelNotCachedError",
    "ModelNotFoundError",
    "cache_folder",
    "model_config_path",
    "parse_repo_id",
    "resolve_file",
    "resolve_model",
]

# huggingface_hub's repo-id rule (owner/name of letters, digits, "-", "_", "."; no "--" or ".."), with the owner
# required: a bare "name" is far more likely a local folder that is missing than a legacy hub model.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]+))?$")
# Names ending like files are checkpoint or config paths that are missing, not repo ids.
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json", ".yaml", ".yml", ".tar", ".npz")
# Everything but the weights: config, tokenizer (json, merges.txt, sentencepiece .model), preprocessor, remote code.
_MODEL_FILES = ["*.json", "*.txt", "*.model", "*.py"]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the weights a model folder holds, in preference order


_NO_MODEL = "no model at {name} (no such file or folder, and not a Hugging Face repo id owner/name[@revision])"


class ModelNotFoundError(FileNotFoundError):
    """A model name that is no local path, no shipped model and no model on the Hub."""


class ModelNotCachedError(ModelNotFoundError):
    """A repo id that is not in the local Hugging Face cache and cannot be downloaded now (offline, no network)."""


def parse_repo_id(name: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``name`` is shaped as ``owner/name[@revision]``, else None."""
    m = _REPO_ID.match(name)
    if m is None or name.lower().endswith(_FILE_SUFFIXES):
        return None
    repo = m["repo"]
    if "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    return repo, m["revision"]


def cache_folder(repo_id: str) -> str:
    """The folder huggingface_hub's cache keeps ``repo_id`` in (``$HF_HUB_CACHE/models--owner--name``)."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))


def resolve_model(name: str | os.PathLike, *, allow_download: bool = True, weights: bool = True) -> str:
    """A local file or folder for the model ``name`` (see the module docstring for the order).

    ``allow_download=False`` reads the cache only. ``weights=False`` fetches no weights (a tokenizer, a config).
    Raises ``ModelNotFoundError`` (a ``FileNotFoundError``) for a name that is none of the three, and its
    subclass ``ModelNotCachedError`` for a repo id that is not cached and cannot be downloaded now."""
    name = os.fspath(name)
    if os.path.exists(name):
        return name
    if name.startswith("builtin:"):
        return _builtin(name)
    parsed = parse_repo_id(name)
    if parsed is None:
        raise ModelNotFoundError(_NO_MODEL.format(name=name))
    repo, revision = parsed
    from huggingface_hub import snapshot_download

    def download(patterns: list[str]) -> str:
        return _hub(
            name,
            lambda: snapshot_download(
                repo, revision=revision, allow_patterns=patterns, local_files_only=not allow_download
            ),
            allow_download,
        )

    folder = download([*_MODEL_FILES, "model.safetensors"] if weights else _MODEL_FILES)
    if weights and not any(os.path.exists(os.path.join(folder, w)) for w in WEIGHT_FILES):
        folder = download([*_MODEL_FILES, "pytorch_model.bin"])  # a repo without safetensors weights
        if not any(os.path.exists(os.path.join(folder, w)) for w in WEIGHT_FILES):
            # Offline, huggingface_hub returns whatever part of the snapshot is cached (e.g. only config.json
            # after a dry run fetched it): say so here rather than as a puzzling "no weights" later.
            raise ModelNotCachedError(
                f"{name}: the cached snapshot {folder} holds no weights ({' or '.join(WEIGHT_FILES)})"
                + _why_not_downloaded(allow_download)
            )
    if weights and not os.path.exists(os.path.join(folder, "config.json")):
        raise ModelNotFoundError(f"{name}: the Hub repo has no config.json; is it a transformers CLIP model?")
    return folder


def resolve_file(name: str, filename: str, *, allow_download: bool = True) -> str:
    """The local path of one file ``filename`` of the repo ``owner/name[@revision]`` (``hf_hub_download``)."""
    parsed = parse_repo_id(name)
    if parsed is None:
        raise ModelNotFoundError(f"{name} is not a Hugging Face repo id (owner/name or owner/name@revision)")
    repo, revision = parsed
    from huggingface_hub import hf_hub_download

    return _hub(
        name,
        lambda: hf_hub_download(repo, filename, revision=revision, local_files_only=not allow_download),
        allow_download,
        filename,
    )


def model_config_path(name: str | os.PathLike, *, allow_download: bool = True) -> str | None:
    """The ``config.json`` of the model ``name``, fetching that file alone for a repo id (no weights): None for a
    local checkpoint file, or a folder without one. Raises as ``resolve_model``."""
    name = os.fspath(name)
    if os.path.exists(name) or name.startswith("builtin:"):
        path = os.path.join(name if os.path.exists(name) else _builtin(name), "config.json")
        return path if os.path.isfile(path) else None
    if parse_repo_id(name) is None:
        raise ModelNotFoundError(_NO_MODEL.format(name=name))
    # One Hub lookup per process and id: a run asks for its base model's config several times (validation, the
    # plan, the report), and an unreachable Hub costs each ask huggingface_hub's retries (about 30 s).
    key = (name, allow_download)
    if key not in _CONFIG_LOOKUPS:
        try:
            _CONFIG_LOOKUPS[key] = resolve_file(name, "config.json", allow_download=allow_download)
        except ModelNotFoundError as e:
            _CONFIG_LOOKUPS[key] = e
    found = _CONFIG_LOOKUPS[key]
    if isinstance(found, ModelNotFoundError):
        raise found
    return found


_CONFIG_LOOKUPS: dict[tuple[str, bool], str | ModelNotFoundError] = {}


def _builtin(name: str) -> str:
    try:
        return resolve_model_path(name)
    except FileNotFoundError as e:
        raise ModelNotFoundError(str(e)) from e


def _hub(name: str, call, allow_download: bool, filename: str | None = None) -> str:
    """``call()`` (a huggingface_hub download), its errors turned into one ``ModelNotFoundError`` naming ``name``."""
    from huggingface_hub import errors

    repo, revision = parse_repo_id(name)  # type: ignore[misc]  # callers pass repo ids only
    wanted = f" for {filename}" if filename else ""
    try:
        return call()
    except errors.LocalEntryNotFoundError as e:  # not cached, and downloading is off or failed
        raise ModelNotCachedError(
            f"{name} is not a local file or folder, and the Hugging Face model {repo} (revision "
            f"{revision or 'main'}) is not in the cache (searched {cache_folder(repo)}{wanted})"
            + _why_not_downloaded(allow_download, e)
        ) from e
    except errors.GatedRepoError as e:
        raise ModelNotFoundError(f"{name}: the Hub repo {repo} is gated; accept its terms and set HF_TOKEN") from e
    except errors.RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{name} is not a local file or folder, and there is no model {repo} on the Hugging Face Hub "
            "(or it is private: set HF_TOKEN)"
        ) from e
    except errors.RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{name}: the Hub repo {repo} has no revision {revision!r}") from e
    except errors.EntryNotFoundError as e:
        raise ModelNotFoundError(f"{name}: the Hub repo {repo} has no file {filename}") from e
    except errors.HfHubHTTPError as e:
        raise ModelNotCachedError(f"{name}: the Hugging Face Hub refused the download ({e})") from e


def _why_not_downloaded(allow_download: bool, error: Exception | None = None) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (
            "; HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE on a machine with a network, or fill "
            f"that cache (HF_HOME={constants.HF_HOME}) with the model first"
        )
    if not allow_download:
        return "; downloading was not allowed here"
    cause = error.__cause__ if error is not None and error.__cause__ is not None else error
    reason = f" ({type(cause).__name__}: {str(cause)[:200]})" if cause is not None else ""
    return (
        f"; the Hub could not be reached{reason} (HF_HUB_OFFLINE is not set): check the network, or set "
        "HF_HOME to a cache that holds the model"
    )
