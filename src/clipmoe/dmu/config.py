"""The pipeline's configuration: YAML (or JSON) -> typed dataclasses, validated before any work starts.

Unknown keys, wrong types, missing paths and impossible values are collected and reported together in one
``ConfigError``, so a user fixes the file once instead of once per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..model.options import MoEOptions, resolve_layers
from ..train.config import TrainConfig
from .budgets import BUDGETS

# Paper recipe (README of the official code + paper v3): MCL lr 1e-5 wd 0.2; router lr 1e-6 wd 0.01.
MCL_DEFAULTS: dict[str, Any] = {"trainable": "ffn", "lr": 1e-5, "weight_decay": 0.2}
ROUTE_DEFAULTS: dict[str, Any] = {"trainable": "router", "lr": 1e-6, "weight_decay": 0.01, "balance_weight": 0.01}


class ConfigError(ValueError):
    """One or more problems with a configuration file, all listed."""


@dataclass
class DataConfig:
    train: str  # dataset path (img2dataset folder, tar shards, csv/tsv, jsonl, ShareGPT4V json)
    format: str = "auto"
    caption: str = "txt"  # "txt" or "json:KEY"
    root: str | None = None  # image root for csv/jsonl/sharegpt4v
    eval: str | None = None  # a folder of evaluation sets (the generated world's eval/ layout)
    max_skipped_fraction: float = 0.01
    num_workers: int = 0
    # CSV/TSV/JSONL column or field names (default: CSV filepath/title, JSONL image/caption) and the CSV
    # separator (tab, as open_clip's --csv-separator)
    image_key: str | None = None
    caption_key: str | None = None
    separator: str = "\t"

    def reader_options(self) -> dict:
        """``open_dataset``'s keyword arguments for the training set."""
        return {
            "format": self.format,
            "caption": self.caption,
            "root": self.root,
            "image_key": self.image_key,
            "caption_key": self.caption_key,
            "separator": self.separator,
            "max_skipped_fraction": self.max_skipped_fraction,
        }


@dataclass
class PrepareConfig:
    stretch_text_positions: bool = False  # Long-CLIP: keep positions 0-19, interpolate the rest 4x
    keep_positions: int = 20
    stretch_factor: int = 4


@dataclass
class EmbedConfig:
    batch_size: int = 256
    chunk_size: int = 4096


@dataclass
class ClusterConfig:
    image_clusters: int = 3
    text_clusters: int = 3
    niter: int = 25


@dataclass
class MoEConfig(MoEOptions):
    """The surgery's ``MoEOptions`` (top_k, layers, expert_dropout, dispatch) plus the number of experts."""

    experts: int = 4  # N experts = the base FFN + N-1 MCL stages
    expert_dropout: float = 0.1  # inside experts while training routers (official code)
    # DMU assembly's routers: "random" = nn.Linear's default init (the paper); "centroid" = row e points at the
    # mean FFN input (after the pre-FFN LayerNorm) of the training samples expert e was fine-tuned on, at that
    # layer, under the base model (Cluster-aware Upcycling's idea, dmu/centroids.py); router_init_samples of
    # the training set (a seeded subsample) are encoded for it.
    router_init: str = "random"
    router_init_samples: int = 1024


@dataclass
class ClipUpConfig:
    """The ``clip_up`` baseline (sparse upcycling the CLIP-UP way; docs/pipeline.md says which values are ours)."""

    noise: float = 0.01  # multiplicative noise on each expert copy, as the upcycle baseline
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE's weight; CLIP-UP's is not public)
    router_lr: float | None = None  # None: the routing phase's lr (route.lr)
    expert_lr_scale: float = 0.1  # experts (upcycled weights) learn at this fraction of the routers' lr
    capacity_factor: float = 1.25  # Switch/GShard token dropping while training; 0 = dropless
    capacity_at_inference: bool = False  # the saved model drops tokens at inference too


@dataclass
class FMoEConfig:
    """The ``fmoe`` baseline (cluster-partition experts with a fusion gate that keeps the base FFN)."""

    # How the stage-0 joint clusters are grouped into (experts - 1) partitions: balanced (largest cluster first
    # into the smallest partition) | largest (the experts - 2 largest clusters alone, the rest together)
    partitions: str = "balanced"


@dataclass
class BaselineConfig:
    """Which rows of dmu/baselines.py's registry to train, and under which budget rules."""

    # "all", or a list of keys of dmu/baselines.py's BASELINES: dense (full fine-tuning), upcycle (sparse
    # upcycling), wo_mcl (the paper's Table 4 "w/o MCL" ablation), soup (the MCL FFNs averaged)
    enabled: Any = "all"
    stages: bool = True  # evaluate each MCL stage model alone
    upcycle_trainable: str = "router+experts"  # with identical experts, routers alone cannot change outputs
    upcycle_noise: float = 0.01
    # dmu/budgets.py: epoch = the paper's rule (every baseline phase sees the fine-tuning data once, as the
    # official scripts' one epoch); steps / samples / flops = as many optimizer steps / training samples /
    # training FLOPs as all DMU phases together.
    budgets: list = field(default_factory=lambda: ["epoch", "steps"])  # of BUDGETS; samples, flops on request
    clip_up: ClipUpConfig = field(default_factory=ClipUpConfig)
    fmoe: FMoEConfig = field(default_factory=FMoEConfig)


@dataclass
class EvalConfig:
    batch_size: int = 256
    throughput_batch: int = 32


@dataclass
class PipelineConfig:
    base_model: str  # HF CLIP folder, checkpoint file, "builtin:tiny-clip", or a hub id owner/name[@revision]
    data: DataConfig
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (embedding and training autocast)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    mcl: TrainConfig = field(default_factory=lambda: TrainConfig(**MCL_DEFAULTS))  # a partial section
    moe: MoEConfig = field(default_factory=MoEConfig)  # starts from these defaults
    route: TrainConfig = field(default_factory=lambda: TrainConfig(**ROUTE_DEFAULTS))
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def stages(self) -> int:
        return self.moe.experts - 1

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


# Set once for the whole run; the phases (mcl, route) inherit them (the seed offset per MCL stage).
SHARED_SETTINGS = {"seed": "seed", "precision": "precision", "num_workers": "data.num_workers"}


def load_config(path: str | os.PathLike, check_paths: bool = True) -> PipelineConfig:
    """Read and validate a pipeline config file; every problem is reported in one ``ConfigError``.

    Relative paths in it (base_model, data.train, data.root, data.eval, route.distill_data) are taken relative
    to the file's folder, so the config, and the snapshot a run writes of it, mean the same from any working
    directory. A ``base_model`` that is no such path but a Hugging Face repo id (``owner/name[@revision]``) stays
    an id (``formats/hub.py``)."""
    path = os.fspath(path)
    raw = read_yaml(path)
    return config_from_dict(raw, source=path, check_paths=check_paths, base_dir=os.path.dirname(os.path.abspath(path)))


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with two fixes for config files: a key given twice in one mapping is an error
    (PyYAML keeps the last silently), and ``1e-5`` is a float (YAML 1.1 wants ``1.0e-5``; PyYAML reads
    ``1e-5`` as a string). A key written beside a merge (``<<: *base``) overrides the merged one, as YAML
    means it: only keys written twice are errors."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: dict = {}
    for key_node, value_node in node.value:  # the keys as written, before the merges are flattened into them
        if key_node.tag == "tag:yaml.org,2002:merge":
            # the merged mappings get these checks too (an inline one is built nowhere else before flattening)
            loader.construct_object(value_node, deep=True)
            key = "<<"  # two merges in one mapping: YAML allows one (a list merges several, the first wins)
        else:
            key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    loader.flatten_mapping(node)  # merged keys first, so the ones written here win
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: str) -> Any:
    """A YAML (or JSON) config file, read strictly (``_StrictLoader``); problems as one ``ConfigError``."""
    if not os.path.isfile(path):
        raise ConfigError(f"no config file at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=_StrictLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text: {e}") from e


def config_from_dict(
    raw: Any, source: str = "config", check_paths: bool = True, base_dir: str | None = None
) -> PipelineConfig:
    """Validate a plain config dict; relative paths resolve against ``base_dir`` (None: the working directory)."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    cfg = build_section(PipelineConfig, raw, "", errors)
    if cfg is not None:
        errors += _shared_setting_errors(cfg, raw)
        with contextlib.suppress(ValueError):  # a run-wide setting out of range: _semantic_errors names its key
            cfg = _with_shared_settings(cfg)

        if base_dir is not None:
            cfg = _resolve_paths(cfg, base_dir)
        errors += _semantic_errors(cfg, check_paths)
    if errors:
        raise ConfigError(f"{source} has {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    return cfg


def build_section(cls, raw: Any, where: str, errors: list[str], defaults: Any = None):
    """A ``cls`` dataclass from a plain mapping, appending every problem to ``errors``.

    Keys absent from ``raw`` keep the value of ``defaults`` (an instance of ``cls``) or the field's default;
    nested sections start from their field's ``default_factory`` (so a partial ``mcl`` keeps the paper's
    MCL recipe for what it does not name). A value with a problem is left at its default, so that the
    section is still built and the checks after this one report the config's other problems in the same
    error; None when it cannot be built (not a mapping, a required key missing or unusable, its own checks)."""
    if not isinstance(raw, dict):
        errors.append(f"{where.rstrip('.') or 'top level'}: expected a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            errors.append(f"{where}{key}: unknown key (known: {', '.join(sorted(fields))})")
    values = {name: getattr(defaults, name) for name in fields} if defaults is not None else {}
    unusable = False  # a required key missing, or given but unusable: no instance can be made
    for name, f in fields.items():
        key = f"{where}{name}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and defaults is None
        if name not in raw:
            if required:
                errors.append(f"{key}: required")
                unusable = True
            continue
        value = raw[name]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            value = build_section(hint, value, key + ".", errors, factory() if factory else None)
            if value is None:
                unusable |= required
                continue
        elif not _type_ok(value, hint):
            errors.append(f"{key}: expected {_type_name(hint)}, got {value!r}")
            unusable |= required
            continue
        elif hint in (float, float | None) and isinstance(value, int):
            value = float(value)
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        values[name] = value
    if unusable:
        return None
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        errors.append(f"{where.rstrip('.') or 'config'}: {e}")
        return None


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _shared_setting_errors(cfg: PipelineConfig, raw: dict) -> list[str]:
    """A phase section may repeat a run-wide setting only with the same value (it is never overwritten silently)."""
    errors = []
    for phase in ("mcl", "route"):
        section = raw.get(phase) or {}
        for name, where in SHARED_SETTINGS.items():
            if name in section and section[name] != _get(cfg, where):
                errors.append(
                    f"{phase}.{name}: {section[name]!r} conflicts with {where}: {_get(cfg, where)!r}; "
                    f"it is set once for the whole run, at {where}"
                )
    return errors


def _with_shared_settings(cfg: PipelineConfig) -> PipelineConfig:
    shared = {name: _get(cfg, where) for name, where in SHARED_SETTINGS.items()}
    return dataclasses.replace(
        cfg, mcl=dataclasses.replace(cfg.mcl, **shared), route=dataclasses.replace(cfg.route, **shared)
    )


def resolve_path(path: str | None, base_dir: str) -> str | None:
    """``path`` relative to ``base_dir`` unless absolute, builtin or None; each part of ``a::b`` separately."""
    if path is None or path.startswith("builtin:"):
        return path
    return "::".join(p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p)) for p in path.split("::"))


def _resolve_paths(cfg: PipelineConfig, base_dir: str) -> PipelineConfig:
    data = dataclasses.replace(
        cfg.data, **{k: resolve_path(getattr(cfg.data, k), base_dir) for k in ("train", "root", "eval")}
    )
    route = dataclasses.replace(cfg.route, distill_data=resolve_path(cfg.route.distill_data, base_dir))
    return dataclasses.replace(cfg, base_model=_resolve_base_model(cfg.base_model, base_dir), data=data, route=route)


def _resolve_base_model(name: str, base_dir: str) -> str:
    """The base model's path relative to ``base_dir`` if it exists there (a local folder wins), else a repo id
    as written, else the (missing) path, which validation then names."""
    from ..formats.hub import parse_repo_id

    path = resolve_path(name, base_dir)
    if path is None or os.path.exists(path) or parse_repo_id(name) is None:
        return path
    return name


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(hint)
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(args)
            and all(_type_ok(v, a) for v, a in zip(value, args))
        )
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
UPCYCLE_TRAINABLE = ("router+experts", "all", "router")
ROUTER_INITS = ("random", "centroid")


def _semantic_errors(cfg: PipelineConfig, check_paths: bool) -> list[str]:
    """Every value in range, checked before any work (each problem one line naming its key)."""
    errors = []

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            errors.append(f"{key}: {what}, got {_get(cfg, key)!r}")

    if cfg.moe.experts < 1:
        errors.append(f"moe.experts: must be >= 1, got {cfg.moe.experts}")
    if not 1 <= cfg.moe.top_k <= max(cfg.moe.experts - int(cfg.moe.always_on_base), 1):
        on = " (expert 0 always on)" if cfg.moe.always_on_base else ""
        errors.append(f"moe.top_k: {cfg.moe.top_k} is impossible with {cfg.moe.experts} experts{on}")
    need(cfg.moe.capacity_factor >= 0, "moe.capacity_factor", "must be >= 0 (0: no capacity limit)")
    if cfg.cluster.image_clusters < 1 or cfg.cluster.text_clusters < 1:
        errors.append("cluster: image_clusters and text_clusters must be >= 1")
    need(cfg.cluster.niter >= 1, "cluster.niter", "must be >= 1 (k-means iterations)")
    if cfg.precision not in ("fp32", "bf16"):
        errors.append(f"precision: must be fp32 or bf16, got {cfg.precision!r}")
    need(bool(DEVICE.match(cfg.device)), "device", "must be auto, cpu, cuda or cuda:N")
    need(0 <= cfg.seed < 2**31, "seed", "must be in [0, 2^31) (k-means and the samplers take 32-bit seeds)")
    need(0 <= cfg.moe.expert_dropout < 1, "moe.expert_dropout", "must be in [0, 1)")
    need(cfg.moe.dispatch in ("auto", "loop", "grouped_mm"), "moe.dispatch", "must be auto, loop or grouped_mm")
    need(cfg.embed.batch_size > 0, "embed.batch_size", "must be > 0")
    need(cfg.embed.chunk_size > 0, "embed.chunk_size", "must be > 0")
    need(cfg.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    need(cfg.eval.throughput_batch > 0, "eval.throughput_batch", "must be > 0")
    need(0 <= cfg.data.max_skipped_fraction <= 1, "data.max_skipped_fraction", "must be in [0, 1]")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(cfg.prepare.keep_positions >= 1, "prepare.keep_positions", "must be >= 1")
    need(cfg.prepare.stretch_factor >= 1, "prepare.stretch_factor", "must be >= 1")
    need(cfg.baselines.upcycle_noise >= 0, "baselines.upcycle_noise", "must be >= 0")
    need(
        not cfg.moe.uniform,
        "moe.uniform",
        "DMU's CLIP-MoE routes its tokens (its routers are what the route stage trains); the uniform mixture is "
        "the control row 'uniform' of baselines.enabled",
    )
    need(
        cfg.baselines.upcycle_trainable in UPCYCLE_TRAINABLE,
        "baselines.upcycle_trainable",
        f"must be one of {', '.join(UPCYCLE_TRAINABLE)}",
    )
    errors += _recipe_errors(cfg)
    errors += _ineffective_errors(cfg)
    enabled = cfg.baselines.enabled
    if enabled != "all" and not (isinstance(enabled, list) and all(isinstance(k, str) for k in enabled)):
        errors.append(f"baselines.enabled: expected 'all' or a list of baseline keys, got {enabled!r}")
    unknown = [b for b in cfg.baselines.budgets if not isinstance(b, str) or b not in BUDGETS]
    if unknown:
        errors.append(f"baselines.budgets: unknown rule(s) {unknown}; known: {', '.join(BUDGETS)}")
    if cfg.mcl.trainable != "ffn":
        errors.append(f"mcl.trainable: MCL stages train FFNs only, got {cfg.mcl.trainable!r}")
    need(cfg.moe.router_init in ROUTER_INITS, "moe.router_init", f"must be one of {', '.join(ROUTER_INITS)}")
    need(cfg.moe.router_init_samples >= 1, "moe.router_init_samples", "must be >= 1")
    need(cfg.mcl.distill_weight == 0, "mcl.distill_weight", "the distillation term is a routing option (route.)")
    for key, none in (("router_lr", None), ("balance_weight", 0.0), ("z_loss_weight", 0.0)):
        need(getattr(cfg.mcl, key) == none, f"mcl.{key}", "MCL stages train dense FFNs: no router for it to act on")
    depth = None
    if check_paths:
        depth, base_errors = _base_depth(cfg.base_model)
        errors += base_errors
    errors += _layer_errors(cfg.moe.layers, depth)
    if not any(e.startswith("moe.layers") for e in errors):
        errors += _routed_block_errors(cfg, depth)
    errors += _nonfinite_errors(cfg)
    if check_paths:
        for key in ("train", "root", "eval"):
            p = getattr(cfg.data, key)
            if p is not None and not _path_exists(p):
                errors.append(f"data.{key}: no such file or folder: {p}")
        if cfg.route.distill_data is not None and not _path_exists(cfg.route.distill_data):
            errors.append(f"route.distill_data: no such file or folder: {cfg.route.distill_data}")
    return errors


def _nonfinite_errors(section: Any, where: str = "") -> list[str]:
    """An infinite or NaN number anywhere in the config (the training phases refuse theirs themselves): it
    would pass every range check above and fail, or train on non-finite weights, after the work began."""
    errors = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, TrainConfig):
            errors += _nonfinite_errors(value, f"{where}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{where}{f.name}: must be a finite number, got {value!r}")
    return errors


FMOE_PARTITIONS = ("balanced", "largest")


def _recipe_errors(cfg: PipelineConfig) -> list[str]:
    """The ``baselines.clip_up`` and ``baselines.fmoe`` sections (dmu/baselines.py)."""
    up, fm, errors = cfg.baselines.clip_up, cfg.baselines.fmoe, []
    for key, ok, what in (
        ("noise", up.noise >= 0, "must be >= 0"),
        ("z_loss_weight", up.z_loss_weight >= 0, "must be >= 0"),
        ("router_lr", up.router_lr is None or up.router_lr > 0, "must be > 0 (or null: route.lr)"),
        ("expert_lr_scale", up.expert_lr_scale > 0, "must be > 0"),
        ("capacity_factor", up.capacity_factor >= 0, "must be >= 0 (0: no capacity limit)"),
    ):
        if not ok:
            errors.append(f"baselines.clip_up.{key}: {what}, got {getattr(up, key)!r}")
    enabled = cfg.baselines.enabled

    def on(key: str) -> bool:
        return enabled == "all" or (isinstance(enabled, list) and key in enabled)

    if fm.partitions not in FMOE_PARTITIONS:
        errors.append(f"baselines.fmoe.partitions: must be one of {', '.join(FMOE_PARTITIONS)}, got {fm.partitions!r}")
    if on("fmoe"):
        joint = cfg.cluster.image_clusters * cfg.cluster.text_clusters
        if cfg.moe.experts < 2:
            errors.append("baselines.fmoe: needs moe.experts >= 2 (the base FFN + at least one partition expert)")
        elif joint < cfg.moe.experts - 1:
            errors.append(
                f"baselines.fmoe: {cfg.moe.experts - 1} partition experts need at least as many stage-0 clusters, "
                f"but cluster makes {joint} (image_clusters x text_clusters)"
            )
    return errors


def _ineffective_errors(cfg: PipelineConfig) -> list[str]:
    """Settings moved from their defaults that this config's recipe never reads: a run would silently ignore
    them. (Keys at their defaults pass, so a run's own ``config.yaml`` snapshot, which holds every key, loads.)"""
    enabled, b, p = cfg.baselines.enabled, cfg.baselines, cfg.prepare
    if enabled != "all" and not isinstance(enabled, list):
        return []  # named by the enabled check itself

    def moved(section: Any, where: str, names: Iterable[str] | None = None) -> list[tuple[str, Any]]:
        default = type(section)()
        names = [f.name for f in dataclasses.fields(section)] if names is None else names
        return [(f"{where}.{n}", getattr(section, n)) for n in names if getattr(section, n) != getattr(default, n)]

    unread = []
    for key, settings in (
        ("upcycle", moved(b, "baselines", ("upcycle_trainable", "upcycle_noise"))),
        ("clip_up", moved(b.clip_up, "baselines.clip_up")),
        ("fmoe", moved(b.fmoe, "baselines.fmoe")),
    ):
        if enabled != "all" and key not in enabled:
            why = f"the {key} baseline is not in baselines.enabled {enabled}; remove the setting or enable {key}"
            unread += [(setting, value, why) for setting, value in settings]
    if not p.stretch_text_positions:
        why = "prepare.stretch_text_positions is false; remove the setting or set it true"
        unread += [
            (setting, value, why) for setting, value in moved(p, "prepare", ("keep_positions", "stretch_factor"))
        ]
    return [f"{setting}: {value!r} has no effect: {why}" for setting, value, why in unread]


def _base_depth(base_model: str) -> tuple[dict[str, int] | None, list[str]]:
    """Blocks per tower of the base model, from its ``config.json`` only (for a hub id that one file is fetched,
    or read from the cache offline), and the problems with ``base_model``. The depth is None for a checkpoint
    file, and for a hub id whose config is neither cached nor downloadable now: ``--dry-run`` then says it
    would download it and a run refuses (``dmu.pipeline.base_model_unavailable``)."""
    from ..formats.hub import ModelNotCachedError, ModelNotFoundError, model_config_path, parse_repo_id

    if not (os.path.exists(base_model) or base_model.startswith("builtin:") or parse_repo_id(base_model)):
        return None, [f"base_model: no such file or folder: {base_model}"]
    try:
        path = model_config_path(base_model)
    except ModelNotCachedError:
        return None, []
    except ModelNotFoundError as e:
        return None, [f"base_model: {e}"]
    if path is None:
        return None, []
    try:
        with open(path) as f:
            hf = json.load(f)
        return {t: int(hf[f"{t}_config"]["num_hidden_layers"]) for t in ("vision", "text")}, []
    except (OSError, ValueError, KeyError, TypeError):
        return None, []


def _layer_errors(layers: Any, depth: dict[str, int] | None) -> list[str]:
    """``moe.layers`` against the base model's depth (``depth`` None: only what needs no depth)."""
    if isinstance(layers, dict):
        unknown = sorted(set(layers) - {"vision", "text"})
        if unknown:
            return [f"moe.layers: unknown tower(s) {unknown}; expected vision and/or text"]
        selections = [(f"moe.layers.{t}", t, sel) for t, sel in layers.items()]
    else:
        selections = [("moe.layers", t, layers) for t in ("vision", "text")]
    errors = []
    for key, tower, sel in selections:
        n = depth[tower] if depth else None
        of = f" (the base model's {tower} tower has {n} blocks)" if n is not None else ""
        if sel == "all":
            continue
        if isinstance(sel, bool) or not isinstance(sel, (int, list)):
            errors.append(f"{key}: expected 'all', an int or a list of block indices, got {sel!r}")
        elif isinstance(sel, int) and not (sel >= 0 and (n is None or sel <= n)):
            errors.append(f"{key}: cannot make the last {sel} blocks MoE{of}")
        elif isinstance(sel, list):
            bad = [
                i for i in sel if isinstance(i, bool) or not isinstance(i, int) or i < 0 or (n is not None and i >= n)
            ]
            if bad:
                errors.append(f"{key}: block indices {bad} out of range{of or ' (indices start at 0)'}")
    return list(dict.fromkeys(errors))


def _routed_block_errors(cfg: PipelineConfig, depth: dict[str, int] | None) -> list[str]:
    """A CLIP-MoE with no router, or a routing phase that trains none (``route.last_n_blocks`` past every MoE
    block), would fail only after the MCL stages; refused here (the second needs the base model's depth)."""
    layers = cfg.moe.layers
    chosen = layers.values() if isinstance(layers, dict) else [layers]
    if all(sel in (0, []) for sel in chosen):
        return [f"moe.layers: {layers!r} selects no block in either tower: the CLIP-MoE would have no router"]
    n_last = cfg.route.last_n_blocks
    if depth is None or n_last is None:
        return []
    blocks = resolve_layers(layers, depth)
    if any(b >= depth[tower] - n_last for tower, bs in blocks.items() for b in bs):
        return []
    return [
        f"route.last_n_blocks: {n_last}: no MoE block (moe.layers {layers!r}) is among the last {n_last}, so"
        " router training would train nothing"
    ]


def _path_exists(p: str) -> bool:
    if any(ch in p for ch in "*{"):  # shard patterns are checked by the reader
        return True
    return os.path.exists(p)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
