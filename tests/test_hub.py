"""Hugging Face Hub ids wherever a model is named (formats/hub.py), tested offline against a hub cache the test
lays out exactly as huggingface_hub does (``models--owner--name/{refs,snapshots,blobs}``), checked by
huggingface_hub's own ``scan_cache_dir``. huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported,
so everything that resolves an id runs in a fresh Python process with those variables set."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from clipmoe.dmu.config import config_from_dict
from clipmoe.formats.hub import parse_repo_id
from test_convert import openai_state_dict

REPO = "tiny-owner/tiny-clip"
COMMIT = hashlib.sha1(b"tiny-clip commit").hexdigest()
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
PAPER_CONFIGS = sorted(
    os.path.join(os.path.dirname(SRC), "configs", f)
    for f in os.listdir(os.path.join(os.path.dirname(SRC), "configs"))
    if f.startswith("paper-")
)


def write_hub_cache(hf_home: str, repo_id: str, folder: str, commit: str = COMMIT) -> str:
    """Put ``folder``'s files into ``hf_home``'s hub cache as the ``main`` revision of ``repo_id``, as
    ``hf_hub_download`` leaves them: content-addressed blobs (git blob sha1, sha256 for LFS weights), the
    snapshot's files as relative symlinks to them, and ``refs/main`` holding the commit. Returns the snapshot."""
    storage = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            data = open(os.path.join(root, name), "rb").read()
            lfs = name.endswith((".safetensors", ".bin"))
            blob = (
                hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            )
            blob_path = os.path.join(storage, "blobs", blob)
            with open(blob_path, "wb") as f:
                f.write(data)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob_path, os.path.dirname(link)), link)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def run_python(code: str, hf_home: str, cwd: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, offline, with ``hf_home`` as HF_HOME (huggingface_hub's constants are
    read at import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=hf_home, HF_HUB_OFFLINE="1", PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def results(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def hub_home(tmp_path, tiny_clip, tiny_clip_dir):
    """An HF_HOME whose cache holds the tiny CLIP as ``tiny-owner/tiny-clip`` (plus an OpenAI-format checkpoint,
    for ``convert --file``), and one repo of which only config.json is cached (as after a dry run)."""
    from safetensors.torch import save_file

    home = str(tmp_path / "hf-home")
    folder = tmp_path / "repo"
    shutil.copytree(tiny_clip_dir, folder)
    save_file(openai_state_dict(seed=3), str(folder / "openai-format.safetensors"))
    write_hub_cache(home, REPO, str(folder))
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(os.path.join(tiny_clip_dir, "config.json"), config_only / "config.json")
    write_hub_cache(home, "tiny-owner/config-only", str(config_only))
    return home


def test_repo_ids_are_told_from_paths():
    assert parse_repo_id("openai/clip-vit-large-patch14") == ("openai/clip-vit-large-patch14", None)
    assert parse_repo_id("google/siglip2-base-patch16-naflex@v1.0") == ("google/siglip2-base-patch16-naflex", "v1.0")
    for path in ("/abs/owner/name", "./owner/name", "../x/y", "a/b/c", "name", "weights/ViT-L-14.pt", "a--b/c"):
        assert parse_repo_id(path) is None, path
    # A config keeps a repo id as written unless a folder of that name exists next to the config (local wins).
    raw = {"base_model": "owner/model", "data": {"train": "t"}}
    assert config_from_dict(raw, check_paths=False, base_dir="/nowhere").base_model == "owner/model"


def test_the_test_cache_is_a_valid_huggingface_hub_cache(hub_home):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(os.path.join(hub_home, "hub"))
    assert not info.warnings
    repo = next(r for r in info.repos if r.repo_id == REPO)
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.file_name for f in revision.files}


def test_a_cached_id_loads_offline_and_a_missing_one_names_id_cache_and_offline(hub_home, tmp_path, tiny_clip_dir):
    world = tmp_path / "images"  # an ImageFolder (class = folder), for index and eval
    for i, colour in enumerate(("red", "blue", "green")):
        (world / colour).mkdir(parents=True)
        Image.new("RGB", (40, 40), (80 * i, 20, 200)).save(world / colour / f"{i}.png")
    proc = run_python(
        f"""
        import json, torch
        import clipmoe
        from clipmoe.cli import main
        from clipmoe.formats.hub import ModelNotCachedError, resolve_model

        local = clipmoe.load({tiny_clip_dir!r})
        out = {{}}
        pixels = torch.randn(2, 3, 32, 32)
        for name in ({REPO!r}, {REPO + "@main"!r}, {REPO + "@" + COMMIT!r}):
            model = clipmoe.load(name)
            out[name] = torch.equal(model.encode_image(pixels), local.encode_image(pixels))
        out["snapshot"] = resolve_model({REPO!r})
        out["tokenizer"] = clipmoe.load({REPO!r}).tokenizer is not None
        for missing in ("nobody/missing-clip", "tiny-owner/config-only"):
            try:
                clipmoe.load(missing)
                out[missing] = None
            except ModelNotCachedError as e:
                out[missing] = str(e)
        out["convert"] = main(["convert", {REPO!r}, {str(tmp_path / "converted")!r}, "--file",
                               "openai-format.safetensors", "--tokenizer", {REPO!r}])
        converted = clipmoe.load({str(tmp_path / "converted")!r})
        direct = clipmoe.load({str(tmp_path / "repo" / "openai-format.safetensors")!r})  # converted on load
        out["converted_equal"] = torch.equal(converted.encode_image(pixels), direct.encode_image(pixels))
        out["converted_tokenizer"] = converted.tokenizer is not None
        out["index"] = main(["index", {str(world)!r}, "--model", {REPO!r}, "--out", {str(tmp_path / "idx")!r}])
        out["eval"] = main(["eval", {REPO!r}, "--task", "classification", "--data", {str(world)!r}, "--device",
                            "cpu", "--out", {str(tmp_path / "eval.json")!r}])
        out["convert_without_file"] = main(["convert", {REPO!r}, {str(tmp_path / "c2")!r}])
        print(json.dumps(out))
        """,
        hub_home,
        str(tmp_path),
    )
    out = results(proc)
    assert out[REPO] and out[REPO + "@main"] and out[REPO + "@" + COMMIT] and out["tokenizer"]
    cache = os.path.join(hub_home, "hub", "models--tiny-owner--tiny-clip")
    assert out["snapshot"] == os.path.join(cache, "snapshots", COMMIT)
    missing = out["nobody/missing-clip"]
    assert "nobody/missing-clip" in missing and "HF_HUB_OFFLINE" in missing
    assert os.path.join(hub_home, "hub", "models--nobody--missing-clip") in missing
    partial = out["tiny-owner/config-only"]  # a snapshot with config.json only: no puzzling "no weights" later
    assert "tiny-owner/config-only" in partial and "holds no weights" in partial and "HF_HUB_OFFLINE" in partial
    assert out["convert"] == 0 and out["converted_equal"] and out["converted_tokenizer"]
    assert out["index"] == 0
    with open(tmp_path / "idx" / "index.json") as f:
        assert json.load(f)["model"] == out["snapshot"]  # the pinned snapshot the index was built with
    with open(tmp_path / "eval.json") as f:
        assert out["eval"] == 0 and json.load(f)  # clipmoe eval on the id: results written
    assert out["convert_without_file"] == 2 and "name the checkpoint file in it with --file" in proc.stderr


@pytest.fixture
def world(tmp_path_factory):
    from clipmoe.data.world import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("w") / "world"
    generate_world(out, WorldConfig.preset("test", train_size=24), verbose=False)
    return out


def test_a_cached_id_is_a_pipeline_base_model(hub_home, tmp_path, world):
    def config(name: str, **moe) -> str:
        path = tmp_path / f"{name}.yaml"
        raw = {
            "base_model": REPO,
            "data": {"train": str(world / "train")},
            "device": "cpu",
            "mcl": {"batch_size": 8},
            "route": {"batch_size": 8},
            "moe": {"experts": 2, **moe},
        }
        path.write_text(json.dumps(raw))
        return str(path)

    good, deep = config("good"), config("deep", layers=[5])
    proc = run_python(
        f"""
        import json
        from clipmoe.cli import main

        out = {{"dry": main(["run", {good!r}, "--run-dir", "run", "--dry-run"])}}
        print("=== end of dry run")
        out["deep"] = main(["run", {deep!r}, "--run-dir", "run-deep", "--dry-run"])
        out["prepare"] = main(["prepare", {good!r}, "--run-dir", "run"])
        print(json.dumps(out))
        """,
        hub_home,
        str(tmp_path),
    )
    out = results(proc)
    dry = proc.stdout.split("=== end of dry run")[0]
    assert out["dry"] == 0 and f"base model: {REPO}" in dry and "would download" not in dry
    assert "MCL stage" in dry and "trainable" in dry  # parameter counts: the config came from the cache
    # the depth came from the cached config.json: layer 5 of a 2-block tower is refused before any work
    assert out["deep"] == 2 and "block indices [5] out of range (the base model's vision tower has 2 blocks)" in (
        proc.stderr
    )
    assert out["prepare"] == 0 and os.path.isfile(tmp_path / "run" / "base" / "model.safetensors")
    with open(tmp_path / "run" / "config.yaml") as f:
        assert f"base_model: {REPO}" in f.read()  # the snapshot keeps the id, so it reruns from anywhere


def _fill_paper_data(folder: str, config_path: str) -> None:
    """Tiny data at the paths a paper config names (relative to its folder): 8 images with captions."""
    from clipmoe.dmu.config import read_yaml

    data = read_yaml(config_path)["data"]
    train = os.path.join(folder, data["train"])
    if data["format"] == "files":  # img2dataset layout
        os.makedirs(train)
        for i in range(8):
            Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(os.path.join(train, f"{i:05d}.jpg"))
            with open(os.path.join(train, f"{i:05d}.txt"), "w") as f:
                f.write(f"a picture number {i}")
        return
    root = os.path.join(folder, data["root"])
    os.makedirs(os.path.join(root, "coco"), exist_ok=True)
    records = []
    for i in range(8):
        Image.new("RGB", (16, 16), (0, 30 * i, 0)).save(os.path.join(root, "coco", f"{i}.jpg"))
        turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"picture {i}"}]
        records.append({"id": str(i), "image": f"coco/{i}.jpg", "conversations": turns})
    with open(train, "w") as f:
        json.dump(records, f)


def test_paper_configs_dry_run_without_weights_with_an_empty_offline_cache(tmp_path):
    assert len(PAPER_CONFIGS) >= 4
    home = str(tmp_path / "empty-hf-home")
    cases = []
    for path in PAPER_CONFIGS:
        name = os.path.basename(path).removesuffix(".yaml")
        bare, filled = tmp_path / "bare" / name, tmp_path / "filled" / name
        for d in (bare, filled):
            d.mkdir(parents=True)
            shutil.copy(path, d / "config.yaml")
        _fill_paper_data(str(filled), path)
        cases.append((name, str(bare / "config.yaml"), str(filled / "config.yaml")))
    proc = run_python(
        f"""
        import json, sys
        from clipmoe.cli import main

        out = {{}}
        for name, bare, filled in {cases!r}:
            for call, args in (
                ("dry", ["run", filled, "--run-dir", filled + "-run", "--dry-run"]),
                ("bare", ["run", bare, "--run-dir", bare + "-run", "--dry-run"]),
                ("run", ["run", filled, "--run-dir", filled + "-run"]),
            ):
                for stream in (sys.stdout, sys.stderr):
                    print(f"=== {{name}}/{{call}}", file=stream, flush=True)
                out[f"{{name}}/{{call}}"] = main(args)
        print("=== end")
        print(json.dumps(out))
        """,
        home,
        str(tmp_path),
    )
    out = results(proc)
    stdout = {chunk.split("\n", 1)[0]: chunk for chunk in proc.stdout.split("=== ")[1:]}
    stderr = {chunk.split("\n", 1)[0]: chunk for chunk in proc.stderr.split("=== ")[1:]}
    for name, bare, filled in cases:
        base = next(line.split()[1] for line in open(bare) if line.startswith("base_model:"))
        assert parse_repo_id(base), (name, base)
        # with the data present, the dry run passes and says what it cannot check yet
        assert out[f"{name}/dry"] == 0, stderr[f"{name}/dry"]
        dry = stdout[f"{name}/dry"]
        assert f"would download {base} (config not cached; layers checked at run time)" in dry
        assert "HF_HUB_OFFLINE" in dry
        # data paths that do not exist here are refused exactly as before, and the base model is not blamed
        refused = stderr[f"{name}/bare"]
        assert out[f"{name}/bare"] == 2 and "data.train: no such file or folder" in refused
        assert "base_model" not in refused
        # a real run cannot start without the weights: one clear refusal naming id, cache and HF_HUB_OFFLINE
        run = stderr[f"{name}/run"]
        assert out[f"{name}/run"] == 2 and f"base_model: {base} is not a local file or folder" in run
        assert "HF_HUB_OFFLINE" in run and os.path.join(home, "hub", "models--") in run
        assert not os.path.exists(filled + "-run")  # and nothing written
