"""Generate a world of image-caption data on which a CLIP trained on short captions suppresses features.

Each image shows one shape in one quadrant and a few small dots, with seven independent attributes of
graded difficulty: colour and background (easy), shape, size and position (moderate), texture and dot
count (hard). Short captions (alt-text style) name the colour, shape and background only; detailed captions
name every attribute. Writes img2dataset ``train/`` and ``val/`` folders, CLIP_benchmark retrieval and
classification sets, an MMVP-VLM folder and attribute probes under ``eval/``, and ``world.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..utils import interrupt
from ..utils.io import make_shared
from .world_formats import ShardedTarWriter, img2dataset_key, jpeg_bytes, json_text, png_bytes, wds_key, write_file
from .world_language import (
    ATTRIBUTE_BY_NAME,
    ATTRIBUTES,
    CLASSIFICATION_TEMPLATES,
    DETAILED_EVAL_TEMPLATES,
    DETAILED_TRAIN_TEMPLATES,
    SHORT_ATTRIBUTES,
    SHORT_EVAL_TEMPLATES,
    SHORT_TRAIN_TEMPLATES,
    WEB_MENTION_RATE,
    CaptionPlan,
    sample_captions,
    vocabulary,
    web_caption,
)
from .world_render import DOT_COLORS, DOT_PLACEMENTS, DOT_RADIUS, MAX_DOT_RADIUS, Layout, render

FORMAT_VERSION = 2  # 2: web alt-text captions, train/val colour and background subsets
MANIFEST = "world.json"
MIN_IMAGE_SIZE = 32  # at 32 px stripes are already 1 px and dots 3 px across; smaller would blur them away
# Independent random streams per part of the world: sample i of a split is the same whatever else changes.
_STREAMS = {"train": 0, "val": 1, "eval": 2, "mmvp": 3, "probes": 4}
HELDOUT_ATTRIBUTES = ("color", "shape")
_CHUNK = 256  # samples per job when several processes write a split


@dataclass(frozen=True)
class WorldConfig:
    """Size and difficulty of a generated world. The defaults are the ``demo`` preset."""

    seed: int = 0
    image_size: int = 48
    train_size: int = 6000
    val_size: int = 500  # seen attribute combinations, unseen images
    eval_size: int = 500  # held-out combinations: retrieval and per-attribute classification sets
    mmvp_pairs: int = 15  # per attribute
    probe_pairs: int = 20  # per attribute (each also gives one swap probe)
    captions_per_image: int = 3  # retrieval captions per image, each from a different held-out template
    shard_size: int = 10000
    color_jitter: int = 12  # per-channel random offset of object and background colours
    noise: float = 0.0  # std of Gaussian pixel noise (0-255 scale): a difficulty knob
    dot_radius: float = DOT_RADIUS  # of the image side: how salient the dots (the count attribute) are
    dot_color: str = "contrast"  # black/white against the backdrop, or "object": the object's colour (DOT_COLORS)
    dot_placement: str = "apart"  # in other quadrants, or "object": spots on the object itself (DOT_PLACEMENTS)
    # A narrower train/val image distribution (the fine-tuning data of the quality testbed): object colours and
    # backgrounds drawn from these values only; empty = all. Evaluation sets always cover every value.
    train_colors: tuple[str, ...] = ()
    train_backgrounds: tuple[str, ...] = ()
    # How often web alt-text (the pretraining corpus's captions, ``json:web``) names each attribute: overrides of
    # WEB_MENTION_RATE as (attribute, rate) pairs, e.g. (("position", 0.3),); empty = the defaults.
    web_mention_rate: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        checks = [
            ("seed", self.seed >= 0, "must be >= 0"),
            ("image_size", self.image_size >= MIN_IMAGE_SIZE, f"must be >= {MIN_IMAGE_SIZE} (hard attributes blur)"),
            ("train_size", self.train_size >= 1, "must be >= 1"),
            ("val_size", self.val_size >= 0, "must be >= 0"),
            ("eval_size", self.eval_size >= 1, "must be >= 1"),
            ("mmvp_pairs", self.mmvp_pairs >= 1, "must be >= 1"),
            ("probe_pairs", self.probe_pairs >= 1, "must be >= 1"),
            ("shard_size", self.shard_size >= 1, "must be >= 1"),
            # The two closest nominal colours differ by 40 in one channel: more jitter would let them overlap.
            ("color_jitter", 0 <= self.color_jitter <= 20, "must be in [0, 20] (colours would overlap)"),
            ("noise", 0 <= self.noise < math.inf, "must be >= 0 and finite"),
            (
                "dot_radius",
                self.dot_radius * self.image_size >= 1 and self.dot_radius <= MAX_DOT_RADIUS,
                f"must be at most {MAX_DOT_RADIUS} (a dot fits its quadrant) and 2 px across or more at "
                f"image_size {self.image_size} (smaller dots blur away)",
            ),
            ("dot_color", self.dot_color in DOT_COLORS, f"must be one of {DOT_COLORS}"),
            ("dot_placement", self.dot_placement in DOT_PLACEMENTS, f"must be one of {DOT_PLACEMENTS}"),
            (
                "dot_placement",
                self.dot_placement == "apart" or (self.dot_radius == DOT_RADIUS and self.dot_color == "contrast"),
                "draws black or white spots scaled with the object: dot_radius and dot_color must stay at their"
                f" defaults ({DOT_RADIUS}, 'contrast'); they set only dots apart from it",
            ),
        ]
        for name, attribute in (("train_colors", "color"), ("train_backgrounds", "background")):
            values, known = getattr(self, name), ATTRIBUTE_BY_NAME[attribute].values
            bad = [v for v in values if v not in known]
            checks.append((name, not bad and len(set(values)) == len(values), f"must be distinct values of {known}"))
        names = [name for name, _ in self.web_mention_rate]
        checks.append(
            (
                "web_mention_rate",
                set(names) <= set(WEB_MENTION_RATE)
                and len(set(names)) == len(names)
                and all(isinstance(rate, (int, float)) and 0 <= rate <= 1 for _, rate in self.web_mention_rate),
                f"must be distinct (attribute, rate) pairs of {sorted(WEB_MENTION_RATE)} with rates in [0, 1]",
            )
        )
        most = min(len(SHORT_EVAL_TEMPLATES), len(DETAILED_EVAL_TEMPLATES))
        checks.append(("captions_per_image", 1 <= self.captions_per_image <= most, f"must be in [1, {most}]"))
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"WorldConfig.{name}={getattr(self, name)!r} {why}")

    def web_rates(self) -> dict[str, float]:
        """The mention rate of every attribute in web captions: the defaults with this config's overrides."""
        return {**WEB_MENTION_RATE, **{name: float(rate) for name, rate in self.web_mention_rate}}

    @classmethod
    def preset(cls, name: str = "demo", **overrides) -> WorldConfig:
        """A preset (``test``, ``demo``, ``large``) with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown world preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown WorldConfig field(s) {unknown}")
        return replace(cls(**PRESETS[name]), **{k: _tuples(v) for k, v in overrides.items()})


def _tuples(value):
    """Lists (from JSON or YAML) as the nested tuples a frozen config holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# The fine-tuning images of the quality testbed and the demo (docs/quality.md): 6 of the 10 colours on 6 of the 8
# backgrounds, a narrower distribution than the base's pretraining corpus, as ShareGPT4V is narrower than web
# data. Their evaluation sets cover every value.
FINETUNE_COLORS = ("red", "yellow", "green", "cyan", "blue", "purple")
FINETUNE_BACKGROUNDS = ("white", "gray", "black", "brown", "navy", "teal")

PRESETS: dict[str, dict] = {
    "test": {"train_size": 48, "val_size": 16, "eval_size": 24, "mmvp_pairs": 2, "probe_pairs": 2, "shard_size": 32},
    "broad": {},  # every colour and background in training: the defaults
    # the demo: the testbed's fine-tuning world at ten-minute size
    "demo": {
        "train_size": 4000,
        "val_size": 0,
        "train_colors": FINETUNE_COLORS,
        "train_backgrounds": FINETUNE_BACKGROUNDS,
    },
    "large": {"train_size": 100_000, "val_size": 5000, "eval_size": 2000, "mmvp_pairs": 30, "probe_pairs": 50},
}


def heldout_combinations() -> list[tuple[str, str]]:
    """(colour, shape) pairs that never occur in train/val: two shapes per colour, every shape held out
    with three or four colours, so the eval split asks for unseen compositions of seen values."""
    colors, shapes = ATTRIBUTE_BY_NAME["color"].values, ATTRIBUTE_BY_NAME["shape"].values
    n = len(shapes)
    return [(c, s) for i, c in enumerate(colors) for j, s in enumerate(shapes) if (j - i) % n in (0, n // 2)]


def _seen_combinations() -> list[tuple[str, str]]:
    heldout = set(heldout_combinations())
    colors, shapes = ATTRIBUTE_BY_NAME["color"].values, ATTRIBUTE_BY_NAME["shape"].values
    return [(c, s) for c in colors for s in shapes if (c, s) not in heldout]


def world_vocabulary(config: WorldConfig | None = None) -> list[str]:
    """Every word any caption, template, class name or prompt of a world can contain, lowercase, split like
    the HF ``Whitespace`` pre-tokenizer: feed it to ``clipmoe.processing.build_word_tokenizer``. The language
    is fixed by the format version, so every config of it shares this vocabulary."""
    return vocabulary()


def build_manifest(config: WorldConfig) -> dict:
    """The ``world.json`` content for ``config`` (no timestamps: same config, same bytes)."""
    eval_sets = {
        "retrieval_short": {"path": "eval/retrieval_short", "size": config.eval_size, "captions": "short"},
        "retrieval_detailed": {"path": "eval/retrieval_detailed", "size": config.eval_size, "captions": "detailed"},
        **{
            f"cls_{a.name}": {"path": f"eval/cls_{a.name}", "size": config.eval_size, "attribute": a.name}
            for a in ATTRIBUTES
        },
        "mmvp": {"path": "eval/mmvp", "size": config.mmvp_pairs * len(ATTRIBUTES), "unit": "pairs"},
        "probes": {"path": "eval/probes/probes.jsonl", "size": 2 * config.probe_pairs * len(ATTRIBUTES)},
    }
    narrow = {
        "colors": list(config.train_colors or ATTRIBUTE_BY_NAME["color"].values),
        "backgrounds": list(config.train_backgrounds or ATTRIBUTE_BY_NAME["background"].values),
    }
    return {
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "config": json.loads(json.dumps(asdict(config))),  # tuples as lists, as read back
        "image_size": config.image_size,
        "attributes": [
            {
                "name": a.name,
                "difficulty": a.difficulty,
                "values": list(a.values),
                "classnames": a.classnames,
                "keywords": {v: list(k) for v, k in a.keywords.items()},
            }
            for a in ATTRIBUTES
        ],
        "short_attributes": list(SHORT_ATTRIBUTES),
        "web_mention_rate": config.web_rates(),
        "heldout": {"attributes": list(HELDOUT_ATTRIBUTES), "combinations": [list(c) for c in heldout_combinations()]},
        "splits": {
            "train": {
                "path": "train",
                "size": config.train_size,
                "combinations": "seen",
                "templates": "train",
                **narrow,
            },
            "val": {"path": "val", "size": config.val_size, "combinations": "seen", "templates": "train", **narrow},
            "eval": {"path": "eval", "size": config.eval_size, "combinations": "heldout", "templates": "eval"},
        },
        "eval_sets": eval_sets,
        "templates": {
            "short_train": list(SHORT_TRAIN_TEMPLATES),
            "short_eval": list(SHORT_EVAL_TEMPLATES),
            "detailed_train": list(DETAILED_TRAIN_TEMPLATES),
            "detailed_eval": list(DETAILED_EVAL_TEMPLATES),
            "classification": {k: list(v) for k, v in CLASSIFICATION_TEMPLATES.items()},
        },
    }


def _rng(config: WorldConfig, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, _STREAMS[stream], index])


def _sample_attributes(
    rng: np.random.Generator, combinations: Sequence[tuple[str, str]], backgrounds: Sequence[str] = ()
) -> dict[str, str]:
    """Uniform over ``combinations`` of (colour, shape) and over ``backgrounds`` (empty: all), every other
    attribute uniform and independent."""
    color, shape = combinations[rng.integers(len(combinations))]
    attributes = {}
    for a in ATTRIBUTES:
        if a.name in HELDOUT_ATTRIBUTES:
            attributes[a.name] = color if a.name == "color" else shape
        else:
            values = backgrounds if a.name == "background" and backgrounds else a.values
            attributes[a.name] = values[rng.integers(len(values))]
    return attributes


def _other_value(rng: np.random.Generator, attribute: str, value: str) -> str:
    others = [v for v in ATTRIBUTE_BY_NAME[attribute].values if v != value]
    return others[rng.integers(len(others))]


def _image(config: WorldConfig, attributes: dict[str, str], layout: Layout) -> Image.Image:
    return render(
        attributes,
        layout,
        config.image_size,
        config.noise,
        config.dot_radius,
        config.dot_color,
        config.dot_placement,
    )


def _write_captioned_split(
    folder: str, stream: str, size: int, config: WorldConfig, verbose: bool, workers: int = 1
) -> None:
    """img2dataset "files" layout: ``00000/000000000.png`` + ``.txt`` (detailed caption) + ``.json`` (short, web
    and detailed captions, the attributes, and which attributes the web caption names). Every sample depends on
    its index alone, so ``workers`` processes can write disjoint index ranges with the same bytes as one."""
    chunks = [range(start, min(start + _CHUNK, size)) for start in range(0, size, _CHUNK)]
    bar = tqdm(total=size, desc=f"world {stream}", unit="img", disable=not verbose)
    if workers > 1 and len(chunks) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for n in pool.imap_unordered(_write_captioned_chunk, [(folder, stream, c, config) for c in chunks]):
                bar.update(n)
    else:
        for chunk in chunks:
            interrupt.check()
            bar.update(_write_captioned_chunk((folder, stream, chunk, config)))
    bar.close()


def _write_captioned_chunk(job: tuple[str, str, range, WorldConfig]) -> int:
    folder, stream, indices, config = job
    seen = [(c, s) for c, s in _seen_combinations() if not config.train_colors or c in config.train_colors]
    for i in indices:
        rng = _rng(config, stream, i)
        attributes = _sample_attributes(rng, seen, config.train_backgrounds)
        layout = Layout.sample(rng, config.color_jitter)
        short = CaptionPlan.sample(SHORT_TRAIN_TEMPLATES[rng.integers(len(SHORT_TRAIN_TEMPLATES))], rng)
        detailed = CaptionPlan.sample(DETAILED_TRAIN_TEMPLATES[rng.integers(len(DETAILED_TRAIN_TEMPLATES))], rng)
        web, web_names = web_caption(attributes, rng, config.web_rates())
        shard, key = img2dataset_key(i, config.shard_size)
        os.makedirs(os.path.join(folder, shard), exist_ok=True)
        stem = os.path.join(folder, shard, key)
        record = {
            "key": key,
            "short": short.render(attributes),
            "web": web,
            "web_names": web_names,
            "detailed": detailed.render(attributes),
        }
        write_file(stem + ".png", png_bytes(_image(config, attributes, layout)))
        write_file(stem + ".txt", record["detailed"])
        write_file(stem + ".json", json_text({**record, "attributes": attributes}))
    return len(indices)


def _write_eval_pool(folder: str, config: WorldConfig, verbose: bool) -> None:
    """Held-out images shared by the retrieval and per-attribute classification sets (same key, same image)."""
    heldout = heldout_combinations()
    k = config.captions_per_image
    writers = {
        name: ShardedTarWriter(os.path.join(folder, name, "test"), config.shard_size)
        for name in ["retrieval_short", "retrieval_detailed"] + [f"cls_{a.name}" for a in ATTRIBUTES]
    }
    index_lines = []
    for i in tqdm(range(config.eval_size), desc="world eval", unit="img", disable=not verbose):
        rng = _rng(config, "eval", i)
        attributes = _sample_attributes(rng, heldout)
        layout = Layout.sample(rng, config.color_jitter)
        short = [p.render(attributes) for p in sample_captions(SHORT_EVAL_TEMPLATES, k, rng)]
        detailed = [p.render(attributes) for p in sample_captions(DETAILED_EVAL_TEMPLATES, k, rng)]
        key, image = wds_key(i), png_bytes(_image(config, attributes, layout))
        writers["retrieval_short"].add([(f"{key}.png", image), (f"{key}.txt", "\n".join(short).encode())])
        writers["retrieval_detailed"].add([(f"{key}.png", image), (f"{key}.txt", "\n".join(detailed).encode())])
        for a in ATTRIBUTES:
            label = str(a.values.index(attributes[a.name])).encode()
            writers[f"cls_{a.name}"].add([(f"{key}.png", image), (f"{key}.cls", label)])
        index_lines.append(json_text({"key": key, "attributes": attributes}))
    for name, writer in writers.items():
        writer.close()
        root = os.path.join(folder, name)
        if name.startswith("retrieval"):
            write_file(os.path.join(root, "dataset_type.txt"), "retrieval\n")
        else:
            a = ATTRIBUTE_BY_NAME[name.removeprefix("cls_")]
            write_file(os.path.join(root, "classnames.txt"), "\n".join(a.classnames) + "\n")
            templates = "\n".join(CLASSIFICATION_TEMPLATES[a.name]) + "\n"
            write_file(os.path.join(root, "zeroshot_classification_templates.txt"), templates)
    # Ground truth for analyses the benchmark formats cannot carry (e.g. scores per attribute value).
    write_file(os.path.join(folder, "attributes.jsonl"), "".join(line + "\n" for line in index_lines))


def _minimal_pairs(config: WorldConfig, stream: str, per_attribute: int) -> Iterator[tuple]:
    """Per attribute, scenes that differ only in that attribute: (attribute, j, rng, attrs_a, attrs_b, layout,
    plan). Both share the layout and the caption plan, so the images and captions differ in that value only."""
    heldout = heldout_combinations()
    for a_index, a in enumerate(ATTRIBUTES):
        for j in range(per_attribute):
            rng = _rng(config, stream, a_index * per_attribute + j)
            first = _sample_attributes(rng, heldout)
            second = {**first, a.name: _other_value(rng, a.name, first[a.name])}
            layout = Layout.sample(rng, config.color_jitter)
            plan = CaptionPlan.sample(DETAILED_EVAL_TEMPLATES[rng.integers(len(DETAILED_EVAL_TEMPLATES))], rng)
            yield a.name, j, rng, first, second, layout, plan


def _write_mmvp(folder: str, config: WorldConfig, verbose: bool) -> None:
    """MMVP-VLM layout: ``MMVP_VLM_Images/<Type>/<qid>.jpg`` and ``Questions.csv``; question q (odd) and
    q + 1 form a pair, and statement q describes image q. ``Type`` is the attribute that differs."""
    rows = []
    total = config.mmvp_pairs * len(ATTRIBUTES)
    pairs = _minimal_pairs(config, "mmvp", config.mmvp_pairs)
    for n, (attribute, _, _, first, second, layout, plan) in enumerate(
        tqdm(pairs, total=total, desc="world mmvp", unit="pair", disable=not verbose)
    ):
        images = os.path.join(folder, "MMVP_VLM_Images", attribute)
        os.makedirs(images, exist_ok=True)
        for qid, attributes in ((2 * n + 1, first), (2 * n + 2, second)):
            write_file(os.path.join(images, f"{qid}.jpg"), jpeg_bytes(_image(config, attributes, layout)))
            rows.append([str(qid), attribute, plan.render(attributes)])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Question ID", "Type", "Statement"])
    writer.writerows(rows)
    write_file(os.path.join(folder, "Questions.csv"), buf.getvalue())


def _write_probes(folder: str, config: WorldConfig, verbose: bool) -> None:
    """``probes.jsonl``: per attribute, MMVP-style pairs and swaps (the first image of a pair with its
    caption and the same caption with the attribute's value swapped). Paths are relative to ``folder``."""
    os.makedirs(os.path.join(folder, "images"))
    lines = []
    total = config.probe_pairs * len(ATTRIBUTES)
    pairs = _minimal_pairs(config, "probes", config.probe_pairs)
    for attribute, j, rng, first, second, layout, plan in tqdm(
        pairs, total=total, desc="world probes", unit="pair", disable=not verbose
    ):
        paths = [f"images/{attribute}_{j:04d}_{side}.png" for side in "ab"]
        for path, attributes in zip(paths, (first, second)):
            write_file(os.path.join(folder, path), png_bytes(_image(config, attributes, layout)))
        captions = [plan.render(first), plan.render(second)]
        lines.append({"attribute": attribute, "kind": "pair", "images": paths, "captions": captions})
        negative = plan.render({**first, attribute: _other_value(rng, attribute, first[attribute])})
        lines.append(
            {"attribute": attribute, "kind": "swap", "image": paths[0], "positive": captions[0], "negative": negative}
        )
    write_file(os.path.join(folder, "probes.jsonl"), "".join(json_text(line) + "\n" for line in lines))


def is_world(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a generated world's folder (its manifest is written last: the world is complete)."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(world: str | os.PathLike) -> dict:
    """A generated world's manifest (``world.json``) as stored; one ValueError naming the file if it is missing
    or unreadable."""
    path = os.path.join(os.fspath(world), MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
            raise ValueError("no config")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable world manifest: {e}") from e
    return manifest


def manifest_config(manifest: dict) -> dict:
    """A manifest's config with the fields added since the world was made at their defaults."""
    defaults = json.loads(json.dumps(asdict(WorldConfig())))  # tuples as the manifest stores them (lists)
    return {**{k: v for k, v in defaults.items() if k not in manifest["config"]}, **manifest["config"]}


def _comparable(config: dict) -> dict:
    """A config as its world is drawn: the web captions' rates in full, so that ``count=0.3,position=0.3``,
    ``position=0.3,count=0.3`` and a default written out all name the world they make."""
    rates = {name: float(rate) for name, rate in config.get("web_mention_rate", ())}
    return {**config, "web_mention_rate": {**WEB_MENTION_RATE, **rates}}


def _existing_world(out: str, config: WorldConfig) -> dict | None:
    """The manifest of a complete world at ``out`` made with ``config``; None if ``out`` is absent or empty.
    Anything else at ``out`` is an error: the generator never overwrites data it did not make this way."""
    if not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        raise ValueError(f"{out} exists and is not a folder")
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        if os.listdir(out):
            raise ValueError(
                f"{out} exists, is not empty and holds no {MANIFEST}: not a generated world; refusing to write into it"
            )
        return None
    manifest = read_manifest(out)
    old, new = (_comparable(c) for c in (manifest_config(manifest), json.loads(json.dumps(asdict(config)))))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out} holds world format {manifest.get('format_version')}, this is format {FORMAT_VERSION}")
    if old != new:
        diff = ", ".join(
            f"{k}: {old.get(k)!r} there vs {new.get(k)!r} asked"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        )
        raise ValueError(f"{out} holds a world generated with a different config ({diff}); use another folder")
    return manifest


def generate_world(
    out_dir: str | os.PathLike, config: WorldConfig | None = None, *, verbose: bool = True, workers: int = 1
) -> dict:
    """Write a world to ``out_dir`` and return its manifest (``world.json``).

    Everything is written into ``<out_dir>.tmp-*`` and renamed into place at the end, so ``out_dir`` either
    holds a complete world or nothing. Same config (seed included) -> byte-identical files, whatever the
    number of ``workers`` (processes writing the train/val splits). If ``out_dir`` already holds a complete
    world of the same config this is a no-op; a different config is an error.
    """
    config = config or WorldConfig()
    out = os.path.abspath(os.fspath(out_dir))
    existing = _existing_world(out, config)
    if existing is not None:
        if verbose:
            print(f"world: {out} is already complete with this config; nothing to do", file=sys.stderr)
        return existing
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        _write_captioned_split(os.path.join(tmp, "train"), "train", config.train_size, config, verbose, workers)
        if config.val_size:
            _write_captioned_split(os.path.join(tmp, "val"), "val", config.val_size, config, verbose, workers)
        _write_eval_pool(os.path.join(tmp, "eval"), config, verbose)
        _write_mmvp(os.path.join(tmp, "eval", "mmvp"), config, verbose)
        _write_probes(os.path.join(tmp, "eval", "probes"), config, verbose)
        manifest = build_manifest(config)
        write_file(os.path.join(tmp, MANIFEST), json_text(manifest, indent=2) + "\n")
        make_shared(tmp, 0o777)
        try:
            if os.path.isdir(out):
                os.rmdir(out)  # empty (checked above); rename cannot replace a folder portably
            os.rename(tmp, out)
        except OSError:
            # Another process (a second testbed recipe, say) finished the same world meanwhile: keep its copy,
            # which is byte-identical for the same config; anything else at ``out`` is still an error.
            existing = _existing_world(out, config)
            if existing is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return existing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"world: wrote {out}", file=sys.stderr)
    return manifest


# ----------------------------------------------------------------------------------------------- CLI


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="folder to create (must be absent, empty, or a world made with the same config)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="broad",
        help="preset (default: broad; demo = the demo's narrower fine-tuning world; test; large)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    for name, kind, text in [
        ("train-size", int, "training images (short + detailed captions)"),
        ("val-size", int, "in-distribution validation images"),
        ("eval-size", int, "held-out-combination images for retrieval and classification"),
        ("mmvp-pairs", int, "MMVP pairs per attribute"),
        ("probe-pairs", int, "probe pairs (and swaps) per attribute"),
        ("captions-per-image", int, "retrieval captions per image"),
        ("image-size", int, "image side in pixels"),
        ("shard-size", int, "samples per shard folder / tar"),
        ("color-jitter", int, "per-channel colour jitter"),
        ("noise", float, "Gaussian pixel noise std (0-255)"),
        ("dot-radius", float, f"dot radius as a fraction of the image side (default {DOT_RADIUS})"),
        ("train-colors", _names, "comma-separated object colours of train/val images (default: all)"),
        ("train-backgrounds", _names, "comma-separated backgrounds of train/val images (default: all)"),
        (
            "web-mention-rate",
            _rates,
            "how often web captions name attributes, e.g. position=0.3,count=0.3 (default: "
            + ", ".join(f"{k} {v:g}" for k, v in WEB_MENTION_RATE.items())
            + ")",
        ),
    ]:
        parser.add_argument(f"--{name}", type=kind, help=f"{text} (overrides the preset)")
    parser.add_argument(
        "--dot-color",
        choices=DOT_COLORS,
        help="dots black/white against the backdrop (contrast, the default) or in the object's colour (object)",
    )
    parser.add_argument(
        "--dot-placement",
        choices=DOT_PLACEMENTS,
        help="dots in quadrants apart from the object (apart, the default) or a row of spots on it (object)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes writing the train/val splits (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _rates(text: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        name, sep, rate = item.partition("=")
        try:
            value = float(rate) if sep else None
        except ValueError:
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"expected ATTRIBUTE=RATE pairs like position=0.3, got {item!r}")
        pairs.append((name.strip(), value))
    return tuple(pairs)


def run_world(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(WorldConfig) if getattr(args, f.name, None) is not None}
    config = WorldConfig.preset(args.preset, **overrides)
    manifest = generate_world(args.out_dir, config, verbose=not args.quiet, workers=args.workers)
    splits = ", ".join(f"{name} {manifest['splits'][name]['size']}" for name in ("train", "val", "eval"))
    print(f"{args.out_dir}: {splits} images; {len(manifest['eval_sets'])} eval sets")
    return 0
