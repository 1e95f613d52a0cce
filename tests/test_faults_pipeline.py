"""Issue #17: the pipeline's promises under reruns, kills, concurrent runs and NaNs (items 1-4, 6)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

import clipmoe
from clipmoe.utils.lock import LOCK_FILE, FolderLocked, lock_folder
from conftest import save_world_clip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_world_clip(tmp_path_factory, width=32, image_size=32, context_length=32)


def write_config(tmp_path, world, base_dir, experts=2, name="cfg.yaml", **over):
    train = {"steps": 4, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "min_batch": 4}
    raw = {
        "base_model": str(base_dir),
        "data": {"train": str(world / "train"), "eval": str(world / "eval")},
        "device": "cpu",
        "cluster": {"image_clusters": 2, "text_clusters": 2},
        "mcl": dict(train),
        "moe": {"experts": experts, "top_k": 2},
        "route": {**train, "lr": 1e-2},
        "baselines": {"enabled": [], "stages": False},
        "eval": {"batch_size": 64, "throughput_batch": 4},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def assert_same_models(a_dir, b_dir, atol=1e-6):
    a, b = clipmoe.load(a_dir).state_dict(), clipmoe.load(b_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"{a_dir}: {k}")


CLI = [sys.executable, "-m", "clipmoe.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------ item 3: the lock


def test_lock_is_reentrant_and_a_dead_holders_lock_is_stale(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs, recorded as a killed run would leave it
    (folder / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    lock_folder(str(folder))
    lock_folder(str(folder))  # the same process again: fine
    holder = json.loads((folder / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    probe = "from clipmoe.utils.lock import lock_folder; import sys; lock_folder(sys.argv[1])"
    other = subprocess.run([*CLI[:1], "-c", probe, str(folder)], env=ENV, capture_output=True, text=True)
    assert other.returncode != 0 and "FolderLocked" in other.stderr
    assert f"is in use by process {os.getpid()} on {socket.gethostname()}" in other.stderr
    with pytest.raises(FolderLocked):
        raise FolderLocked("a ValueError subclass, so the CLI prints it as one line")


@pytest.mark.slow
def test_second_run_on_the_same_run_dir_is_refused_and_the_first_is_unharmed(tmp_path, world, base_dir):
    cfg = write_config(tmp_path, world, base_dir, mcl={"steps": 30, "checkpoint_every": 3})
    first = subprocess.Popen(
        [*CLI, "run", cfg, "--run-dir", str(tmp_path / "a")], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not (tmp_path / "a" / "stage0" / "embed").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second started"
    first.send_signal(signal.SIGSTOP)  # paused (holding its lock) while the second tries: deterministic overlap
    try:
        second = subprocess.run(
            [*CLI, "run", cfg, "--run-dir", str(tmp_path / "a")], env=ENV, capture_output=True, text=True, timeout=120
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("clipmoe run: error: ") and f"in use by process {first.pid}" in lines[0]
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    subprocess.run([*CLI, "run", cfg, "--run-dir", str(tmp_path / "clean")], env=ENV, check=True, capture_output=True)
    for rel in ("stage1/model", "moe/model"):
        assert_same_models(tmp_path / "a" / rel, tmp_path / "clean" / rel, atol=0)
    assert (tmp_path / "a" / "report.md").exists()


# ------------------------------------------------------------------------------------------ item 4: NaN


def test_diverging_training_stops_naming_phase_and_step_and_saves_no_nan(tmp_path, world, base_dir, capsys):
    from clipmoe.cli import main

    cfg = write_config(tmp_path, world, base_dir, mcl={"lr": 1000.0, "steps": 40, "checkpoint_every": 5})
    run = tmp_path / "run"
    assert main(["run", cfg, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"clipmoe run: error: mcl stage 1: non-finite (loss \(nan\) at step \d+ of 40; batch keys: \d{5}/\d{7}, .*"
        r"|weights after step \d+ of 40: .*)",
        err,
    ), err
    saved = [os.path.join(d, f) for d, _, fs in os.walk(run) for f in fs if f.endswith((".safetensors", ".pt"))]
    assert saved  # the base and a checkpoint or two: all finite
    for path in saved:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, weights_only=True)["trainable"]
        for k, v in state.items():
            assert torch.isfinite(v).all(), f"{path}: {k}"
    assert not (run / "stage1" / "model").exists() and not (run / "report.md").exists()


def test_a_model_with_nan_is_never_saved(tmp_path, tiny_clip):
    from clipmoe.dmu.pipeline import refuse_nonfinite

    state = tiny_clip.state_dict()
    refuse_nonfinite(state, "ok")
    state["text_projection.weight"] = state["text_projection.weight"].clone()
    state["text_projection.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save x: 1 non-finite values in text_projection.weight \(1\)"):
        refuse_nonfinite(state, "x")


def test_a_base_with_a_nan_weight_is_refused_naming_it(tmp_path, world, base_dir, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from clipmoe.cli import main

    bad = tmp_path / "bad-base"
    shutil.copytree(base_dir, bad)
    state = load_file(bad / "model.safetensors")
    name = next(k for k in state if k.endswith("mlp.fc1.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(tmp_path, world, bad)
    assert main(["run", cfg, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("clipmoe run: error:") and "non-finite" in err and name in err, err
    assert not (tmp_path / "run" / "base").exists()


# ------------------------------------------------------------------------------------------ item 2: exact resume


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing after it runs."""


def _every_phase(cfg_path, run_dir):
    from clipmoe.dmu.pipeline import Pipeline, open_run

    pipe = Pipeline(*open_run(cfg_path, str(run_dir)))
    pipe.prepare()
    pipe.route()  # MCL stage 1, assembly, routing (expert dropout 0.1)
    for run in pipe.baseline_runs():  # dense fine-tuning and sparse upcycling, one epoch each
        pipe.baseline(run.id)
    return pipe


def test_kill_and_resume_is_exact_in_every_training_phase(tmp_path, world, base_dir, monkeypatch):
    from clipmoe.train import loop

    phase = {"steps": 6, "checkpoint_every": 2, "log_every": 1, "min_batch": 4}
    cfg = write_config(
        tmp_path,
        world,
        base_dir,
        mcl=phase,
        route=phase,
        moe={"expert_dropout": 0.1},
        baselines={"enabled": ["dense", "upcycle"], "budgets": ["epoch"]},
    )
    clean = _every_phase(cfg, tmp_path / "clean")

    killed: list[str] = []
    save = loop._save_checkpoint

    def kill_at_step_4(path, *args, **kwargs):
        # The run dies where step 4's checkpoint would be written: it resumes from step 2, and the metrics of
        # steps 3 and 4 are already in metrics.jsonl.
        folder = os.path.dirname(path)
        if args[3] == 4 and folder not in killed:
            killed.append(folder)
            raise Killed
        return save(path, *args, **kwargs)

    monkeypatch.setattr(loop, "_save_checkpoint", kill_at_step_4)
    for _ in range(10):
        try:
            resumed = _every_phase(cfg, tmp_path / "killed")
            break
        except Killed:
            continue
    phases = ["stage1/train", "moe/train", "baselines/dense-epoch/train", "baselines/upcycle-epoch/train"]
    assert sorted(os.path.relpath(k, resumed.run_dir) for k in killed) == sorted(phases)
    for rel in ("stage1/model", "moe/model", "baselines/dense-epoch/model", "baselines/upcycle-epoch/model"):
        assert_same_models(clean.path(rel), resumed.path(rel))
    for rel in phases:
        steps = [json.loads(line)["step"] for line in open(resumed.path(rel, "metrics.jsonl"))]
        assert steps == list(range(1, 7)), (rel, steps)  # no step twice after the resume


# ------------------------------------------------------------------------------------------ item 1: skips


@pytest.fixture(scope="module")
def world_310_with_10_corrupt(tmp_path_factory):
    from clipmoe.data.world import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("w310") / "world"
    generate_world(out, WorldConfig.preset("test", train_size=310), verbose=False)
    images = sorted(p for p in (out / "train").rglob("*.png"))
    assert len(images) == 310
    corrupt = images[5::31][:10]  # spread over every embedding chunk
    for p in corrupt:
        p.write_bytes(p.read_bytes()[:40])  # a PNG cut short: indexed fine, fails to decode
    keys = sorted(str(p.relative_to(out / "train").with_suffix("")) for p in corrupt)
    return out, keys


def _skip_log_keys(path) -> list[str]:
    lines = open(path, encoding="utf-8").read().splitlines()
    assert lines[0] == "key\tpath\treason"
    return sorted(line.split("\t")[0] for line in lines[1:])


def test_too_many_bad_samples_fail_every_rerun_with_the_same_names(
    tmp_path, world_310_with_10_corrupt, base_dir, capsys
):
    from clipmoe.cli import main

    world, keys = world_310_with_10_corrupt
    cfg = write_config(tmp_path, world, base_dir, embed={"chunk_size": 64, "batch_size": 32})
    errors = []
    for _ in range(4):  # runs 1..4: the finished chunks keep their skips, so no rerun gets further
        assert main(["run", cfg, "--run-dir", str(tmp_path / "run")]) == 2
        errors.append(capsys.readouterr().err.strip().splitlines()[-1])
        assert _skip_log_keys(tmp_path / "run" / "stage0" / "embed" / "skipped.log") == keys
    assert len(set(errors)) == 1, errors
    assert "skipped 10 of 310 samples (3.23%, limit 1.00%)" in errors[0]
    assert all(k in errors[0] for k in keys[:5])
    assert not (tmp_path / "run" / "stage0" / "embed" / "DONE").exists()
    assert not (tmp_path / "run" / "report.md").exists()


def test_a_resumed_training_phase_keeps_the_skips_before_its_checkpoint(
    tmp_path, world_310_with_10_corrupt, base_dir, monkeypatch
):
    from clipmoe.dmu.pipeline import Pipeline, open_run
    from clipmoe.train import loop

    world, keys = world_310_with_10_corrupt
    # 10 of 310 allowed here: the phase passes, and its stats and skipped.log must name all of them
    over = {"data": {"max_skipped_fraction": 0.05}, "embed": {"chunk_size": 64}}
    phase = {"steps": 8, "checkpoint_every": 4}
    cfg = write_config(tmp_path, world, base_dir, route=phase, **over)
    pipe = Pipeline(*open_run(cfg, str(tmp_path / "clean")))
    pipe.prepare()
    pipe.route()

    def names(stats_path):  # a reason may quote an object address; the names are what must match
        return [s.partition(":")[0] for s in json.load(open(stats_path))["skipped_samples"]]

    clean = names(pipe.path("moe/train_stats.json"))
    assert clean and set(clean) <= set(keys)

    save = loop._save_checkpoint

    def kill_after_step_4(path, *args, **kwargs):
        save(path, *args, **kwargs)
        if "moe" in path:
            raise Killed

    monkeypatch.setattr(loop, "_save_checkpoint", kill_after_step_4)
    pipe = Pipeline(*open_run(cfg, str(tmp_path / "killed")))
    pipe.prepare()
    with pytest.raises(Killed):
        pipe.route()
    monkeypatch.setattr(loop, "_save_checkpoint", save)
    pipe = Pipeline(*open_run(cfg, str(tmp_path / "killed")))  # a new process: a fresh dataset and skip log
    pipe.route()
    assert names(pipe.path("moe/train_stats.json")) == clean
    assert _skip_log_keys(pipe.path("moe/train/skipped.log")) == _skip_log_keys(
        tmp_path / "clean/moe/train/skipped.log"
    )


# ------------------------------------------------------------------------------------------ item 6: data identity


def test_data_changed_between_stages_is_refused_naming_what_changed(tmp_path, world, base_dir, capsys):
    import shutil

    from clipmoe.cli import main
    from clipmoe.dmu.identity import DataChanged
    from clipmoe.dmu.pipeline import Pipeline, open_run

    shutil.copytree(world / "train", tmp_path / "world" / "train")
    cfg = write_config(tmp_path, tmp_path / "world", base_dir, data={"eval": str(world / "eval")})
    pipe = Pipeline(*open_run(cfg, str(tmp_path / "run")))
    pipe.prepare()
    pipe.cluster(0)  # embeds stage 0 first; both record the data they read
    assert (tmp_path / "run" / "stage0" / "embed" / "dataset.json.gz").exists()
    train = tmp_path / "world" / "train"
    gone = sorted(train.rglob("*.png"))[3]
    key = str(gone.relative_to(train).with_suffix(""))
    gone.unlink()
    gone.with_suffix(".txt").unlink()
    caption = sorted(train.rglob("*.txt"))[10]
    caption.write_text(caption.read_text() + " and more")
    with pytest.raises(DataChanged) as e:
        Pipeline(*open_run(cfg, str(tmp_path / "run"))).mcl(1)
    text = str(e.value)
    assert "the training data changed since stage0/embed read it (96 -> 95 samples: 1 sample(s) removed" in text
    assert key in text and str(caption.relative_to(train).with_suffix("")) in text
    assert main(["run", cfg, "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 2
    assert main(["run", cfg, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("clipmoe run: error: the training data changed since stage0/embed")
    assert not (tmp_path / "run" / "stage1").exists()
