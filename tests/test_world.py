"""The generated world: determinism, every sample's captions against its attributes and pixels, and the
on-disk layouts (img2dataset, CLIP_benchmark webdataset, MMVP-VLM, probes) other modules read."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import tarfile
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from clipmoe.data import world as world_module
from clipmoe.data.processing import build_word_tokenizer
from clipmoe.data.world import (
    WorldConfig,
    add_world_arguments,
    generate_world,
    heldout_combinations,
    run_world,
    world_vocabulary,
)
from clipmoe.data.world_language import (
    ATTRIBUTE_BY_NAME,
    DETAILED_TRAIN_TEMPLATES,
    MMVP_PROMPT,
    SLOT_RE,
    WEB_MENTION_RATE,
    CaptionPlan,
    web_caption,
    words,
)
from clipmoe.data.world_probe import probe_world
from clipmoe.data.world_render import (
    BACKGROUND_RGB,
    OBJECT_RGB,
    QUADRANTS,
    SIZE_FRACTION,
    Layout,
    dot_rgb,
    render,
    spot_rgb,
)

CONFIG = WorldConfig.preset("test")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("worlds") / "w")
    return out, generate_world(out, CONFIG, verbose=False)


def all_files(root: str) -> dict[str, bytes]:
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def parse(caption: str, manifest: dict) -> dict[str, set[str]]:
    """Which values of which attributes a caption names, from the manifest's keywords alone."""
    joined = f" {' '.join(words(caption))} "
    found: dict[str, set[str]] = {}
    for attr in manifest["attributes"]:
        for value, phrases in attr["keywords"].items():
            if any(f" {' '.join(words(p))} " in joined for p in phrases):
                found.setdefault(attr["name"], set()).add(value)
    return found


def assert_describes(caption: str, attributes: dict, manifest: dict, names: list[str]) -> None:
    """The caption names exactly ``attributes[name]`` for each of ``names`` and nothing of the others."""
    assert parse(caption, manifest) == {n: {attributes[n]} for n in names}, caption


def template_regex(template: str) -> re.Pattern:
    """A caption rendered from ``template`` (slots -> any of their phrasings; a/an; capitalisation)."""
    parts, last = [], 0
    for m in SLOT_RE.finditer(template):
        parts.append(re.escape(template[last : m.start()]))
        options = {p for per_value in ATTRIBUTE_BY_NAME[m.group(1)].forms[m.group(2)].values() for p in per_value}
        parts.append("(?:" + "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True)) + ")")
        last = m.end()
    parts.append(re.escape(template[last:]))
    pattern = re.sub(r"(?<![a-z])a(?=\\ )", "an?", "".join(parts))
    return re.compile(pattern, re.IGNORECASE)


def matching(caption: str, templates: list[str]) -> list[str]:
    return [t for t in templates if template_regex(t).fullmatch(caption)]


def read_tar(path: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples(root: str) -> list[dict]:
    with open(os.path.join(root, "test", "nshards.txt")) as f:
        nshards = int(f.read())
    assert sorted(os.listdir(os.path.join(root, "test"))) == sorted(
        ["nshards.txt"] + [f"{i}.tar" for i in range(nshards)]
    )
    records: list[dict] = []
    for shard in range(nshards):
        for info, data in read_tar(os.path.join(root, "test", f"{shard}.tar")):
            assert (info.mtime, info.uid, info.gid, info.mode, info.uname) == (0, 0, 0, 0o644, "")
            key, ext = info.name.split(".", 1)
            if not records or records[-1]["key"] != key:
                records.append({"key": key})
            records[-1][ext] = data
    return records


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    out, _ = world
    again = str(tmp_path / "again")
    generate_world(again, CONFIG, verbose=False)
    reference = all_files(out)
    assert all_files(again) == reference
    generate_world(str(tmp_path / "seed1"), WorldConfig.preset("test", seed=1), verbose=False)
    other = all_files(str(tmp_path / "seed1"))
    assert other.keys() == reference.keys()  # same layout ...
    changed = [k for k in reference if k != "world.json" and other[k] != reference[k]]
    assert len(changed) > 0.9 * (len(reference) - 1)  # ... different content nearly everywhere


def test_every_training_sample_matches_its_captions_and_split(world):
    out, manifest = world
    short_names = manifest["short_attributes"]
    all_names = [a["name"] for a in manifest["attributes"]]
    heldout = {tuple(c) for c in manifest["heldout"]["combinations"]}
    for split, size in (("train", CONFIG.train_size), ("val", CONFIG.val_size)):
        records = sorted(glob.glob(os.path.join(out, split, "*", "*.json")))
        assert len(records) == size
        for i, path in enumerate(records):
            shard, key = divmod(i, CONFIG.shard_size)
            assert path.endswith(os.path.join(f"{shard:05d}", f"{shard * 100 + key:07d}.json"))  # img2dataset keys
            with open(path) as f:
                record = json.load(f)
            assert sorted(record) == ["attributes", "detailed", "key", "short", "web", "web_names"]
            assert record["key"] == os.path.basename(path)[:-5]
            with open(path[:-5] + ".txt") as f:
                assert f.read() == record["detailed"]
            attributes = record["attributes"]
            assert {a["name"]: attributes[a["name"]] in a["values"] for a in manifest["attributes"]} == dict.fromkeys(
                all_names, True
            )
            assert_describes(record["detailed"], attributes, manifest, all_names)
            assert_describes(record["short"], attributes, manifest, short_names)
            assert_describes(record["web"], attributes, manifest, record["web_names"])
            assert (attributes["color"], attributes["shape"]) not in heldout
            assert len(matching(record["detailed"], manifest["templates"]["detailed_train"])) >= 1, record["detailed"]
            assert not matching(record["detailed"], manifest["templates"]["detailed_eval"])
            assert len(matching(record["short"], manifest["templates"]["short_train"])) >= 1, record["short"]
            assert not matching(record["short"], manifest["templates"]["short_eval"])


SIDE = {"circle": 1.0, "square": 0.85}  # side of the drawn shape / the size's extent (no sharp tips to blur)


def near(pixels: np.ndarray, rgb, tolerance: int) -> np.ndarray:
    return (np.abs(pixels.astype(int) - np.asarray(rgb)) <= tolerance).all(axis=-1)


def test_pixels_show_the_attributes(world):
    """Background is the most common colour, the object's colour sits only in its quadrant, dots are in
    ``count`` other quadrants, and a solid or hollow circle or square spans its size."""
    out, _ = world
    tol, half = CONFIG.color_jitter + 2, CONFIG.image_size // 2
    for path in sorted(glob.glob(os.path.join(out, "train", "*", "*.json"))):
        with open(path) as f:
            a = json.load(f)["attributes"]
        with Image.open(path[:-5] + ".png") as image:
            assert image.size == (CONFIG.image_size, CONFIG.image_size) and image.mode == "RGB"
            pixels = np.asarray(image)
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        assert near(colours[counts.argmax()], BACKGROUND_RGB[a["background"]], CONFIG.color_jitter).all()
        own = QUADRANTS.index(a["position"])
        dotted = 0
        for q in range(4):
            quadrant = pixels[(q // 2) * half : (q // 2 + 1) * half, (q % 2) * half : (q % 2 + 1) * half]
            object_pixels = near(quadrant, OBJECT_RGB[a["color"]], tol)
            assert object_pixels.any() == (q == own), (path, q)
            dotted += q != own and near(quadrant, dot_rgb(a["background"]), 8).any()
            if q == own and a["texture"] in ("solid", "hollow") and a["shape"] in SIDE:
                rows, cols = np.nonzero(object_pixels)
                extent = max(np.ptp(rows), np.ptp(cols)) + 1
                expected = SIDE[a["shape"]] * SIZE_FRACTION[a["size"]] * CONFIG.image_size
                # Edge pixels are blends, so the fully coloured extent is up to 1.5 px short, never long.
                assert -1.6 <= extent - expected <= 0.6, (path, extent, expected)
        assert dotted == {"one": 1, "two": 2, "three": 3}[a["count"]], path


def test_eval_sets_layout_and_consistency(world):
    out, manifest = world
    eval_dir = os.path.join(out, "eval")
    with open(os.path.join(eval_dir, "attributes.jsonl")) as f:
        truth = [json.loads(line) for line in f]
    assert [t["key"] for t in truth] == [f"s{i:07d}" for i in range(CONFIG.eval_size)]
    heldout = set(heldout_combinations())
    assert all((t["attributes"]["color"], t["attributes"]["shape"]) in heldout for t in truth)
    images = {}
    for kind, names, templates in (
        ("short", manifest["short_attributes"], manifest["templates"]["short_eval"]),
        ("detailed", [a["name"] for a in manifest["attributes"]], manifest["templates"]["detailed_eval"]),
    ):
        root = os.path.join(eval_dir, f"retrieval_{kind}")
        with open(os.path.join(root, "dataset_type.txt")) as f:
            assert f.read().strip() == "retrieval"
        records = samples(root)
        assert [r["key"] for r in records] == [t["key"] for t in truth]
        for record, t in zip(records, truth):
            assert sorted(record) == ["key", "png", "txt"]
            captions = record["txt"].decode().splitlines()
            assert len(captions) == len(set(captions)) == CONFIG.captions_per_image
            for caption in captions:
                assert_describes(caption, t["attributes"], manifest, names)
                assert len(matching(caption, templates)) >= 1, caption
            images.setdefault(record["key"], record["png"])
            assert record["png"] == images[record["key"]]  # one image per key across sets
    for attr in manifest["attributes"]:
        root = os.path.join(eval_dir, f"cls_{attr['name']}")
        assert not os.path.exists(os.path.join(root, "dataset_type.txt"))  # absent means classification
        with open(os.path.join(root, "classnames.txt")) as f:
            assert f.read().splitlines() == attr["classnames"]
        with open(os.path.join(root, "zeroshot_classification_templates.txt")) as f:
            prompts = f.read().splitlines()
        assert prompts and all("{c}" in p for p in prompts)
        for record, t in zip(samples(root), truth, strict=True):
            assert sorted(record) == ["cls", "key", "png"] and record["png"] == images[record["key"]]
            assert attr["values"][int(record["cls"])] == t["attributes"][attr["name"]]


def test_mmvp_pairs_differ_in_exactly_their_type(world):
    out, manifest = world
    root = os.path.join(out, "eval", "mmvp")
    with open(os.path.join(root, "Questions.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Question ID", "Type", "Statement"]
    rows = rows[1:]
    names = [a["name"] for a in manifest["attributes"]]
    assert [int(r[0]) for r in rows] == list(range(1, 2 * CONFIG.mmvp_pairs * len(names) + 1))
    assert [r[1] for r in rows[::2]] == [n for n in names for _ in range(CONFIG.mmvp_pairs)]
    for (q1, t1, s1), (q2, t2, s2) in zip(rows[0::2], rows[1::2]):
        assert t1 == t2 and int(q1) % 2 == 1 and int(q2) == int(q1) + 1
        p1, p2 = parse(s1, manifest), parse(s2, manifest)
        assert set(p1) == set(p2) == set(names) and all(len(v) == 1 for v in [*p1.values(), *p2.values()])
        assert {n for n in names if p1[n] != p2[n]} == {t1}, (s1, s2)
        pixels = []
        for q in (q1, q2):
            with Image.open(os.path.join(root, "MMVP_VLM_Images", t1, f"{q}.jpg")) as image:
                assert image.format == "JPEG"
                pixels.append(np.asarray(image.convert("RGB"), dtype=int))
        assert np.abs(pixels[0] - pixels[1]).max() > 40  # visibly different images


def test_probes_pairs_and_swaps(world):
    out, manifest = world
    root = os.path.join(out, "eval", "probes")
    with open(os.path.join(root, "probes.jsonl")) as f:
        probes = [json.loads(line) for line in f]
    names = [a["name"] for a in manifest["attributes"]]
    for kind in ("pair", "swap"):
        assert [p["attribute"] for p in probes if p["kind"] == kind] == [
            n for n in names for _ in range(CONFIG.probe_pairs)
        ]
    pair_captions = {}
    for p in probes:
        if p["kind"] == "pair":
            assert sorted(p) == ["attribute", "captions", "images", "kind"]
            first, second = (parse(c, manifest) for c in p["captions"])
            with (
                Image.open(os.path.join(root, p["images"][0])) as a,
                Image.open(os.path.join(root, p["images"][1])) as b,
            ):
                assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 40
            pair_captions[p["images"][0]] = p["captions"][0]
        else:
            assert sorted(p) == ["attribute", "image", "kind", "negative", "positive"]
            assert os.path.isfile(os.path.join(root, p["image"])) and pair_captions[p["image"]] == p["positive"]
            first, second = parse(p["positive"], manifest), parse(p["negative"], manifest)
        assert set(first) == set(second) == set(names)
        assert {n for n in names if first[n] != second[n]} == {p["attribute"]}


def test_vocabulary_tokenizes_every_caption_and_prompt(world):
    out, manifest = world
    tokenizer = build_word_tokenizer(world_vocabulary(CONFIG), context_length=64)
    texts = []
    for path in glob.glob(os.path.join(out, "train", "*", "*.json")):
        with open(path) as f:
            record = json.load(f)
        texts += [record["short"], record["detailed"]]
    for kind in ("short", "detailed"):
        texts += [
            c for r in samples(os.path.join(out, "eval", f"retrieval_{kind}")) for c in r["txt"].decode().splitlines()
        ]
    with open(os.path.join(out, "eval", "mmvp", "Questions.csv"), newline="") as f:
        texts += [MMVP_PROMPT + row[2] for row in list(csv.reader(f))[1:]]
    with open(os.path.join(out, "eval", "probes", "probes.jsonl")) as f:
        for p in map(json.loads, f):
            texts += p.get("captions", []) + [p[k] for k in ("positive", "negative") if k in p]
    for attr in manifest["attributes"]:
        texts += [
            t.format(c=c) for t in manifest["templates"]["classification"][attr["name"]] for c in attr["classnames"]
        ]
    ids = tokenizer(texts)["input_ids"]
    unknown = [t for t, row in zip(texts, ids) if tokenizer.unk_token_id in row]
    assert not unknown
    assert max(len(row) for row in ids) <= 40  # fits a small text context
    # Held-out templates recombine words training uses; they add no word a model never saw.
    template_words = {
        k: {w for t in v for w in words(SLOT_RE.sub(" ", t))}
        for k, v in manifest["templates"].items()
        if k != "classification"
    }
    assert template_words["short_eval"] <= template_words["short_train"]
    assert template_words["detailed_eval"] <= template_words["detailed_train"]


def test_heldout_combinations_cover_every_value():
    pairs = heldout_combinations()
    colors = ATTRIBUTE_BY_NAME["color"].values
    shapes = ATTRIBUTE_BY_NAME["shape"].values
    assert len(set(pairs)) == len(pairs) == 2 * len(colors)
    assert all(sum(c == color for c, _ in pairs) == 2 for color in colors)  # each colour keeps 4 seen shapes
    assert {s for _, s in pairs} == set(shapes)


def test_rerun_is_a_noop_and_a_different_config_is_an_error(world, tmp_path, capsys):
    out, manifest = world
    before = os.stat(os.path.join(out, "world.json")).st_mtime_ns
    assert generate_world(out, CONFIG) == manifest
    assert "nothing to do" in capsys.readouterr().err
    assert os.stat(os.path.join(out, "world.json")).st_mtime_ns == before
    with pytest.raises(ValueError, match="train_size: 48 there vs 49 asked"):
        generate_world(out, WorldConfig.preset("test", train_size=49), verbose=False)
    rates = WorldConfig.preset("test").web_rates()  # the defaults written out, in any order: the same world
    written_out = (("count", rates["count"]), ("position", rates["position"]))
    assert generate_world(out, WorldConfig.preset("test", web_mention_rate=written_out), verbose=False) == manifest
    with pytest.raises(ValueError, match="web_mention_rate"):
        generate_world(out, WorldConfig.preset("test", web_mention_rate=(("count", 0.9),)), verbose=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a generated world"):
        generate_world(str(foreign), CONFIG, verbose=False)
    assert os.listdir(foreign) == ["notes.txt"]


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(world_module, "_write_probes", fail)
    with pytest.raises(OSError, match="disk full"):
        generate_world(str(tmp_path / "w"), CONFIG, verbose=False)
    assert os.listdir(tmp_path) == []  # neither the world nor its temporary folder


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 16}, "image_size"),
        ({"captions_per_image": 9}, "captions_per_image"),
        ({"train_size": 0}, "train_size"),
        ({"train_colors": ("red", "mauve")}, "train_colors"),
        ({"train_backgrounds": ("white", "white")}, "train_backgrounds"),
        ({"web_mention_rate": (("position", 1.5),)}, "web_mention_rate"),
        ({"web_mention_rate": (("location", 0.3),)}, "web_mention_rate"),
        ({"web_mention_rate": (("count", 0.2), ("count", 0.3))}, "web_mention_rate"),
        ({"noise": float("inf")}, "noise=inf must be >= 0 and finite"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig.preset("test", **overrides)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="unknown world preset 'huge'"):
        WorldConfig.preset("huge")


def test_cli_applies_preset_and_overrides(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_world_arguments(parser)
    out = str(tmp_path / "cli")
    args = parser.parse_args([out, "--preset", "test", "--seed", "3", "--train-size", "10", "--quiet"])
    assert run_world(args) == 0
    with open(os.path.join(out, "world.json")) as f:
        manifest = json.load(f)
    assert manifest["config"] == json.loads(json.dumps(asdict(WorldConfig.preset("test", seed=3, train_size=10))))
    assert len(glob.glob(os.path.join(out, "train", "*", "*.png"))) == 10
    assert "train 10" in capsys.readouterr().out


def _generate_after(barrier, out):
    barrier.wait()  # both processes find no world, then both write one
    generate_world(out, CONFIG, verbose=False)


def test_two_processes_writing_the_same_world_at_once_both_succeed(world, tmp_path):
    """The testbed runs one process per recipe on the same worlds: the one that finishes second keeps the
    first one's (byte-identical) copy instead of failing on the rename."""
    import multiprocessing

    out = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_generate_after, args=(barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(os.listdir(tmp_path)) == ["shared"]  # no temporary folder left behind
    assert all_files(out) == all_files(world[0])


def test_web_mention_rates_are_a_world_option_recorded_in_the_manifest(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_world_arguments(parser)
    out = str(tmp_path / "web")
    rates = "position=1,count=0"
    args = parser.parse_args([out, "--preset", "test", "--train-size", "40", "--web-mention-rate", rates, "--quiet"])
    assert run_world(args) == 0
    with open(os.path.join(out, "world.json")) as f:
        manifest = json.load(f)
    assert manifest["web_mention_rate"] == {**WEB_MENTION_RATE, "position": 1.0, "count": 0.0}
    assert manifest["config"]["web_mention_rate"] == [["position", 1.0], ["count", 0.0]]
    named = []
    for path in glob.glob(os.path.join(out, "train", "*", "*.json")):
        with open(path) as f:
            named.append(json.load(f)["web_names"])
    assert len(named) == 40 and all("position" in n and "count" not in n for n in named)
    # The same images as the default world: only the web captions, drawn last, change.
    default = generate_world(str(tmp_path / "default"), WorldConfig.preset("test", train_size=40), verbose=False)
    assert default["web_mention_rate"] == WEB_MENTION_RATE
    images = sorted(glob.glob(os.path.join(out, "train", "*", "*.png")))
    for path in images[:5]:
        with open(path, "rb") as a, open(path.replace(out, str(tmp_path / "default")), "rb") as b:
            assert a.read() == b.read()
    with pytest.raises(SystemExit):
        parser.parse_args([out, "--web-mention-rate", "position:0.3"])
    assert "expected ATTRIBUTE=RATE pairs like position=0.3, got 'position:0.3'" in capsys.readouterr().err


def test_dot_radius_is_a_world_option_recorded_in_the_manifest(tmp_path):
    parser = argparse.ArgumentParser()
    add_world_arguments(parser)
    out = str(tmp_path / "big-dots")
    assert (
        run_world(parser.parse_args([out, "--preset", "test", "--train-size", "20", "--dot-radius", "0.09", "--quiet"]))
        == 0
    )
    with open(os.path.join(out, "world.json")) as f:
        assert json.load(f)["config"]["dot_radius"] == 0.09
    default = str(tmp_path / "default")
    generate_world(default, WorldConfig.preset("test", train_size=20), verbose=False)
    first = sorted(glob.glob(os.path.join(out, "train", "*", "*.png")))[0]
    big, small = (np.asarray(Image.open(p)) for p in (first, first.replace(out, default)))
    assert (big != small).any()  # the dots differ ...
    with open(first.replace(".png", ".json")) as a, open(first.replace(out, default).replace(".png", ".json")) as b:
        assert a.read() == b.read()  # ... and nothing else: same scene, same captions


def test_a_world_written_before_a_config_field_existed_is_still_the_same_world(world):
    out, manifest = world
    old = {**manifest, "config": {k: v for k, v in manifest["config"].items() if k != "web_mention_rate"}}
    with open(os.path.join(out, "world.json"), "w") as f:
        json.dump(old, f)
    try:
        assert generate_world(out, CONFIG, verbose=False)["config"] == old["config"]  # a no-op, not "different"
    finally:
        with open(os.path.join(out, "world.json"), "w") as f:
            json.dump(manifest, f, indent=2)


def test_pixel_probe_reports_every_attribute(world):
    out, manifest = world
    results = probe_world(out, epochs=10)
    assert list(results) == [a["name"] for a in manifest["attributes"]]
    for attr in manifest["attributes"]:
        r = results[attr["name"]]
        assert r["chance"] == pytest.approx(1 / len(attr["values"]))
        assert 0.0 <= r["linear"] <= 1.0 and 0.0 <= r["cnn"] <= 1.0
    assert results["background"]["linear"] >= 0.75  # the easiest attribute is read even from 48 images


def _plain_layout(jitter: tuple[float, float]) -> Layout:
    """The object moved by ``jitter`` in its quadrant; dots centred in theirs; no tints, no noise."""
    return Layout(
        jitter=jitter,
        dot_order=(0, 1, 2, 3),
        dot_jitter=((0.0, 0.0),) * 4,
        object_tint=(0, 0, 0),
        background_tint=(0, 0, 0),
        noise_seed=0,
    )


@pytest.mark.parametrize("size", ["small", "medium", "large"])
@pytest.mark.parametrize("shape", ["circle", "square"])
@pytest.mark.parametrize("texture", ["solid", "hollow"])
def test_render_draws_the_size_asked(size, shape, texture):
    layout = _plain_layout(jitter=(0.3, -0.7))
    attributes = {
        "color": "red",
        "background": "white",
        "shape": shape,
        "size": size,
        "position": "lower right",
        "texture": texture,
        "count": "two",
    }
    pixels = np.asarray(render(attributes, layout, CONFIG.image_size))
    rows, cols = np.nonzero(near(pixels, OBJECT_RGB["red"], 2))
    assert rows.min() >= CONFIG.image_size // 2 and cols.min() >= CONFIG.image_size // 2  # lower right quadrant
    extent = max(np.ptp(rows), np.ptp(cols)) + 1
    assert -1.6 <= extent - SIDE[shape] * SIZE_FRACTION[size] * CONFIG.image_size <= 0.6
    centre = pixels[rows.min() + (np.ptp(rows) // 2), cols.min() + (np.ptp(cols) // 2)]
    assert near(centre, OBJECT_RGB["red"] if texture == "solid" else BACKGROUND_RGB["white"], 2)


@pytest.mark.parametrize("radius", [0.045, 0.09])
def test_dot_radius_sets_the_dots_area_and_nothing_else(radius):
    """``dot_radius`` (the count's salience) draws each dot as a disc of that radius, in the quadrants the
    layout gives it, and leaves the object's pixels as they were."""
    layout = _plain_layout(jitter=(0.0, 0.0))
    attributes = {
        "color": "red",
        "background": "white",
        "shape": "square",
        "size": "small",
        "position": "lower right",
        "texture": "solid",
        "count": "three",
    }
    size = CONFIG.image_size
    pixels = np.asarray(render(attributes, layout, size, dot_radius=radius))
    dots = near(pixels, dot_rgb("white"), 120)  # pixels at least half covered by a dot
    half = size // 2
    for q, (r0, c0) in enumerate([(0, 0), (0, half), (half, 0)]):  # the three quadrants the object leaves
        covered = dots[r0 : r0 + half, c0 : c0 + half].sum()
        assert abs(covered - np.pi * (radius * size) ** 2) <= 2 * np.pi * radius * size + 2, (q, covered)
    assert not dots[half:, half:].any()  # no dot in the object's quadrant
    plain = np.asarray(render(attributes, layout, size))
    assert (pixels[half:, half:] == plain[half:, half:]).all()


def test_object_coloured_dots_change_only_the_dots_colour():
    """``dot_color="object"`` draws the same dots, in the same places, in the object's colour (with its tint);
    the object's quadrant is untouched."""
    layout = _plain_layout(jitter=(0.0, 0.0))
    attributes = {
        "color": "blue",
        "background": "white",
        "shape": "square",
        "size": "small",
        "position": "upper left",
        "texture": "solid",
        "count": "two",
    }
    size, half = CONFIG.image_size, CONFIG.image_size // 2
    contrast = np.asarray(render(attributes, layout, size, dot_radius=0.09))
    coloured = np.asarray(render(attributes, layout, size, dot_radius=0.09, dot_color="object"))
    black = near(contrast, dot_rgb("white"), 120)
    blue = near(coloured, OBJECT_RGB["blue"], 120)
    blue[:half, :half] = False  # the object's own quadrant
    assert black.sum() > 0 and (black == blue).all()  # the same dot pixels, now blue
    assert (contrast[:half, :half] == coloured[:half, :half]).all()
    assert not near(coloured, dot_rgb("white"), 120).any()  # no black dot left
    with pytest.raises(ValueError, match=r"dot_color 'red' must be one of \('contrast', 'object'\)"):
        render(attributes, layout, size, dot_color="red")


def _world_option_changes_only_the_images(tmp_path, field: str, value: str) -> tuple[argparse.ArgumentParser, str]:
    """``clipmoe world --FIELD VALUE`` records the value in the manifest and draws the default world's scenes
    differently, with the same captions. Returns the parser and the world's folder."""
    parser = argparse.ArgumentParser()
    add_world_arguments(parser)
    out = str(tmp_path / f"{field}-{value}")
    flag = "--" + field.replace("_", "-")
    assert run_world(parser.parse_args([out, "--preset", "test", "--train-size", "20", flag, value, "--quiet"])) == 0
    with open(os.path.join(out, "world.json")) as f:
        assert json.load(f)["config"][field] == value
    default = str(tmp_path / "default")
    generate_world(default, WorldConfig.preset("test", train_size=20), verbose=False)
    first = sorted(glob.glob(os.path.join(out, "train", "*", "*.png")))[0]
    assert (np.asarray(Image.open(first)) != np.asarray(Image.open(first.replace(out, default)))).any()
    with open(first.replace(".png", ".json")) as a, open(first.replace(out, default).replace(".png", ".json")) as b:
        assert a.read() == b.read()  # same scene, same captions
    return parser, out


def test_dot_color_is_a_world_option_recorded_in_the_manifest_and_checked(tmp_path, capsys):
    parser, out = _world_option_changes_only_the_images(tmp_path, "dot_color", "object")
    with pytest.raises(ValueError, match=r"WorldConfig.dot_color='grey' must be one of \('contrast', 'object'\)"):
        WorldConfig(dot_color="grey")
    with pytest.raises(SystemExit):
        parser.parse_args([out, "--dot-color", "grey"])
    assert "invalid choice: 'grey'" in capsys.readouterr().err


def test_spots_on_the_object_show_the_count_on_it_and_nothing_apart():
    """``dot_placement="object"``: a row of ``count`` spots inside the object, in the colour that stands out
    against both object and backdrop; the quadrants apart from the object are bare backdrop."""
    layout = _plain_layout(jitter=(0.0, 0.0))
    size, half = 96, 48  # twice the test world's side, so each spot is several pixels across
    for count, n in (("one", 1), ("two", 2), ("three", 3)):
        attributes = {
            "color": "yellow",
            "background": "white",
            "shape": "square",
            "size": "large",
            "position": "lower right",
            "texture": "solid",
            "count": count,
        }
        pixels = np.asarray(render(attributes, layout, size, dot_placement="object"))
        spots = near(pixels, spot_rgb("yellow", "white"), 60)
        assert spot_rgb("yellow", "white") == (15, 15, 15)  # black stands out on yellow and on white
        assert not spots[:half].any() and not spots[:, :half].any()  # nothing outside the object's quadrant
        row = spots[spots.sum(axis=1).argmax()]  # the row through the spots' centres
        runs = np.count_nonzero(np.diff(row.astype(int)) == 1)
        assert runs == n, (count, runs)
        bare = near(pixels[:half, :half], BACKGROUND_RGB["white"], 1)
        assert bare.all()  # the quadrants the dots used to take are backdrop
    assert spot_rgb("blue", "navy") == (250, 250, 250)
    with pytest.raises(ValueError, match=r"dot_placement 'inside' must be one of \('apart', 'object'\)"):
        render(attributes, layout, size, dot_placement="inside")
    with pytest.raises(ValueError, match="dot_radius and dot_color apply to dots apart"):
        render(attributes, layout, size, dot_radius=0.09, dot_placement="object")


def test_dot_placement_is_a_world_option_recorded_in_the_manifest_and_checked(tmp_path):
    _world_option_changes_only_the_images(tmp_path, "dot_placement", "object")
    with pytest.raises(ValueError, match=r"WorldConfig.dot_placement='inside' must be one of \('apart', 'object'\)"):
        WorldConfig(dot_placement="inside")
    for field in ({"dot_radius": 0.09}, {"dot_color": "object"}):
        with pytest.raises(ValueError, match=r"WorldConfig.dot_placement='object' draws black or white spots"):
            WorldConfig(dot_placement="object", **field)


def test_dot_radius_out_of_range_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"WorldConfig.dot_radius=0.3 must be at most 0.2"):
        WorldConfig(dot_radius=0.3)
    with pytest.raises(ValueError, match=r"WorldConfig.dot_radius=0.03 .* 2 px across or more at image_size 32"):
        WorldConfig(image_size=32, dot_radius=0.03)
    WorldConfig(image_size=32)  # the default dots, 2.9 px across at the smallest image size


def test_web_captions_name_what_the_corpus_promises():
    """Web alt-text: the easy attributes almost always, the hidden ones rarely but not never, and what a
    caption names is exactly what it says it names."""
    rng = np.random.default_rng(0)
    values = {a.name: a.values for a in ATTRIBUTE_BY_NAME.values()}
    manifest = {
        "attributes": [
            {"name": a.name, "keywords": {v: list(k) for v, k in a.keywords.items()}}
            for a in ATTRIBUTE_BY_NAME.values()
        ]
    }
    counts = dict.fromkeys(values, 0)
    draws = 3000
    for _ in range(draws):
        attributes = {name: vs[rng.integers(len(vs))] for name, vs in values.items()}
        caption, named = web_caption(attributes, rng)
        assert parse(caption, manifest) == {n: {attributes[n]} for n in named}, caption
        for n in named:
            counts[n] += 1
    for name, rate in WEB_MENTION_RATE.items():
        assert abs(counts[name] / draws - rate) < 0.03, (name, counts[name] / draws)
    assert all(counts[n] / draws < 0.15 for n in ("size", "position", "texture", "count"))


def test_web_captions_train_every_text_position_detailed_captions_use():
    """Pretraining on web captions must reach every token position that the fine-tuning (detailed) captions
    occupy, or those positions' embeddings stay at their random initialisation."""
    rng = np.random.default_rng(1)
    values = {a.name: a.values for a in ATTRIBUTE_BY_NAME.values()}
    web, detailed = [], []
    for _ in range(3000):
        attributes = {name: vs[rng.integers(len(vs))] for name, vs in values.items()}
        web.append(len(words(web_caption(attributes, rng)[0])))
        template = DETAILED_TRAIN_TEMPLATES[rng.integers(len(DETAILED_TRAIN_TEMPLATES))]
        detailed.append(len(words(CaptionPlan.sample(template, rng).render(attributes))))
    longest = max(detailed)
    # every position up to the longest detailed caption is reached by at least 1% of web captions
    assert np.mean(np.asarray(web) >= longest) >= 0.01, (longest, np.percentile(web, [50, 99, 100]))


def test_narrow_train_distribution_and_broad_evaluation(tmp_path):
    config = WorldConfig.preset("test", train_colors=("red", "blue"), train_backgrounds=("white",), train_size=40)
    out = str(tmp_path / "narrow")
    manifest = generate_world(out, config, verbose=False)
    assert manifest["splits"]["train"]["colors"] == ["red", "blue"]
    for path in glob.glob(os.path.join(out, "train", "*", "*.json")) + glob.glob(
        os.path.join(out, "val", "*", "*.json")
    ):
        with open(path) as f:
            attributes = json.load(f)["attributes"]
        assert attributes["color"] in ("red", "blue") and attributes["background"] == "white"
    with open(os.path.join(out, "eval", "attributes.jsonl")) as f:
        seen = [json.loads(line)["attributes"] for line in f]
    assert {a["color"] for a in seen} - {"red", "blue"} and {a["background"] for a in seen} - {"white"}
    assert generate_world(out, config, verbose=False) == manifest  # same config: recognised as complete


def test_parallel_generation_writes_the_same_bytes(tmp_path):
    config = WorldConfig.preset("test", train_size=600)  # several chunks of 256 samples
    generate_world(str(tmp_path / "one"), config, verbose=False)
    generate_world(str(tmp_path / "two"), config, verbose=False, workers=2)
    assert all_files(str(tmp_path / "one")) == all_files(str(tmp_path / "two"))


@pytest.mark.parametrize("content", ["{not json", "[]", '{"attributes": []}', '{"config": 3}'])
def test_an_unreadable_manifest_is_one_error_naming_it(tmp_path, content):
    from clipmoe.data.world import read_manifest

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "world.json").write_text(content)
    message = rf"{tmp_path}/w/world.json is not a readable world manifest"
    with pytest.raises(ValueError, match=message):
        read_manifest(tmp_path / "w")
    with pytest.raises(ValueError, match=message):  # the generator refuses to take it for a world
        generate_world(str(tmp_path / "w"), CONFIG, verbose=False)
