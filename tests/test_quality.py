"""The quality testbed: its worlds, its pre-registered verdict rule, its routing measure, and a whole tiny run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from clipmoe.apps.quality import (
    FINETUNE_BACKGROUNDS,
    FINETUNE_COLORS,
    SIZES,
    _claim_line,
    compare_quality,
    decide,
    keeps_classification,
    pipeline_config,
    routing_mutual_information,
    run_budgets,
    run_quality,
    world_config,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BENCH_QUALITY = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_quality.py")]
ENV = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}  # the script imports this checkout's clipmoe
NO_TESTBED_RULE = (
    "name neither epoch nor steps: every run trains its baselines under at least one of them, and the other rules "
    "train in forks of that run"
)


def test_verdict_rule_needs_the_same_sign_in_every_seed():
    assert decide([0.5, 2.0, 0.1]) == "holds"
    assert decide([-0.5, -2.0, -0.1]) == "does not hold"
    assert decide([0.5, -2.0, 3.0]) == "within noise"
    assert decide([0.0, 1.0]) == "within noise"  # a tie does not beat
    assert decide([]) == "within noise"
    assert keeps_classification([-0.5, -0.9]) == "holds"  # within 1 point of the base in every seed
    assert keeps_classification([-1.0, -0.5]) == "holds"  # a loss of exactly 1 point is within 1 point
    assert keeps_classification([-0.5, -1.5]) == "within noise"
    # one seed: the rule says a sign, and the report says so; a difference rounding to zero shows its size
    assert (
        _claim_line("c", [0.03], decide([0.03]), 1, "mnats")
        == "| c | +0.03 (+0.03 to +0.03) mnats | **holds, one seed** |"
    )
    assert (
        _claim_line("c", [0.04, 0.06, 0.03], decide([0.04, 0.06, 0.03]), 3)
        == "| c | +0.04 (+0.03 to +0.06) points | **holds** |"
    )
    assert (
        _claim_line("c", [0.5, -1.25], decide([0.5, -1.25]), 2)
        == "| c | -0.4 (-1.2 to +0.5) points | **within noise** |"
    )
    # a row two of three seeds have: the verdict says it rests on two
    assert _claim_line("c", [5.0, 10.0], "holds", 3) == "| c | +7.5 (+5.0 to +10.0) points | **holds, 2 of 3 seeds** |"


def test_routing_mutual_information_is_zero_for_uniform_and_positive_for_specialised_routing():
    def routing(load):
        return {"image": {"groups": {"color": {"names": ["a", "b"], "tokens": [10, 10], "load": load}}}}

    uniform = routing([[[0.5, 0.5], [0.5, 0.5]]])
    specialised = routing([[[1.0, 0.0], [0.0, 1.0]]])
    assert routing_mutual_information(uniform) == pytest.approx(0.0)
    assert routing_mutual_information(specialised) == pytest.approx(np.log(2))
    assert routing_mutual_information({}) is None


def test_finetuning_world_is_narrow_and_config_follows_the_paper_recipe(tmp_path):
    size = SIZES["default"]
    w = world_config(size, 1)
    assert w.seed == 101 and w.train_colors == FINETUNE_COLORS and w.train_backgrounds == FINETUNE_BACKGROUNDS
    cfg = pipeline_config(str(tmp_path), "paper", size, 1, "builtin:tiny-clip", "cpu")
    assert cfg["mcl"]["lr"] == 1e-5 and cfg["route"]["lr"] == 1e-6 and cfg["mcl"]["small_clusters"] == "drop"
    assert cfg["mcl"]["epochs"] == cfg["route"]["epochs"] == 1
    assert cfg["mcl"]["warmup_steps"] == 6  # 13% of a 47-step phase, as 200 is of the paper's ~1,500
    assert cfg["route"]["logit_scale"] == "model"
    rows = ["dense", "upcycle", "wo_mcl", "soup", "random_routers", "uniform"]  # the paper's, soup, controls
    assert cfg["baselines"] == {"enabled": rows, "stages": True, "budgets": ["epoch", "steps"]}
    fork = pipeline_config(str(tmp_path), "paper", size, 1, "builtin:tiny-clip", "cpu", ("flops",), "all")
    assert fork["baselines"] == {
        "enabled": ["dense", "upcycle", "wo_mcl", "clip_up", "fmoe"],
        "stages": False,
        "budgets": ["flops"],
    }
    assert {k: v for k, v in fork.items() if k != "baselines"} == {k: v for k, v in cfg.items() if k != "baselines"}
    assert pipeline_config(str(tmp_path), "paper", size, 1, "builtin:tiny-clip", "cpu", ("flops",))["baselines"][
        "enabled"
    ] == ["dense", "upcycle", "wo_mcl"]  # the default rows that train
    paper_rule = pipeline_config(str(tmp_path), "paper", size, 1, "builtin:tiny-clip", "cpu", ("epoch",))
    assert paper_rule["baselines"] == {"enabled": rows, "stages": True, "budgets": ["epoch"]}


def test_budget_rules_split_into_the_run_and_its_forks_and_a_run_needs_a_testbed_rule(tmp_path):
    assert run_budgets(("flops", "epoch")) == (("epoch",), ("flops",))
    assert run_budgets(("steps", "samples", "epoch", "flops")) == (("epoch", "steps"), ("samples", "flops"))
    out = str(tmp_path / "q")
    with pytest.raises(ValueError, match=re.escape(f"budgets ['flops'] {NO_TESTBED_RULE}")):
        run_quality(out, size="tiny", seeds=(0,), recipes=("tuned",), device="cpu", budgets=("flops",))
    with pytest.raises(ValueError, match=r"unknown budget rule\(s\) \['epochs'\]"):
        run_quality(out, size="tiny", seeds=(0,), recipes=("tuned",), device="cpu", budgets=("epochs",))
    assert not os.path.exists(out)  # refused before anything is written
    done = subprocess.run([*BENCH_QUALITY, "--budgets", "flops", "--out", out], capture_output=True, text=True, env=ENV)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"quality: error: budgets ['flops'] {NO_TESTBED_RULE}"]
    assert not os.path.exists(out)


def test_baselines_are_selectable_and_extraction_times_are_tabled(tmp_path):
    from clipmoe.apps.quality import quality_report
    from clipmoe.dmu.config import config_from_dict

    cfg = pipeline_config(
        str(tmp_path), "tuned", SIZES["tiny"], 0, "builtin:tiny-clip", "cpu", baselines=["clip_up", "fmoe"]
    )
    assert config_from_dict(cfg, check_paths=False).baselines.enabled == ["clip_up", "fmoe"]
    extraction = {"MCL stages": {"stages": [3.0, 5.0], "sum_s": 8.0}, "fusion (1 epoch)": {"sum_s": 6.0, "max_s": 4.0}}
    runs = {f"tuned-seed{s}": {"recipe": "tuned", "seed": s, "results": {}, "extraction": extraction} for s in (0, 1)}
    text = quality_report(runs, "tiny", 0.0)
    assert "| MCL stages | 8.0 | - |" in text and "| fusion (1 epoch) | 6.0 | 4.0 |" in text


def test_report_only_names_the_run_that_was_never_run(tmp_path):
    out = str(tmp_path / "q")
    with pytest.raises(ValueError, match=r"runs/tuned-seed0 does not exist; run it first"):
        run_quality(out, size="tiny", seeds=(0,), recipes=("tuned",), device="cpu", report_only=True)
    assert os.listdir(out) == []  # nothing half-made, and no world generated only to refuse
    with pytest.raises(ValueError, match=r"elsewhere/runs/tuned-seed0 does not exist; run it first"):
        compare_quality(out, str(tmp_path / "elsewhere"), size="tiny", seeds=(0,), recipes=("tuned",))
    assert os.listdir(out) == []  # a comparison of runs that do not exist writes nothing


def test_a_request_the_runs_cannot_honour_is_refused_before_anything_is_written(tmp_path):
    """A baseline the registry does not have (it used to be refused inside the first run, its config already
    written, so that the corrected command met a "changed config"), a seed twice (two processes on one run),
    an --out that is a file; and bench_quality's --jobs 0 is refused, not replaced by the default."""
    out = tmp_path / "q"
    tiny = {"size": "tiny", "recipes": ("tuned",), "device": "cpu"}
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['upcyle'\]; choose from .*dense"):
        run_quality(str(out), seeds=(0,), baselines=("dense", "upcyle"), **tiny)
    with pytest.raises(ValueError, match=r"baseline\(s\) \['dense'\] given more than once"):
        run_quality(str(out), seeds=(0,), baselines=("dense", "dense"), **tiny)
    with pytest.raises(ValueError, match=r"seed\(s\) \[0\] given more than once"):
        run_quality(str(out), seeds=(0, 0), **tiny)
    assert not out.exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="a-file is a file; --out names the folder"):
        run_quality(str(tmp_path / "a-file"), seeds=(0,), **tiny)
    done = subprocess.run([*BENCH_QUALITY, "--jobs", "0", "--out", str(out)], capture_output=True, text=True, env=ENV)
    assert done.stderr.strip().splitlines() == ["quality: error: jobs must be at least 1, got 0"] and not out.exists()
    report = [*BENCH_QUALITY, "--report-only", "--baselines", "dense", "--jobs", "2", "--out", str(out)]
    done = subprocess.run(report, capture_output=True, text=True, env=ENV)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines() == [
        "quality: error: --baselines, --jobs: not used by --report-only, which reads each run's own config"
    ]
    done = subprocess.run(
        [*BENCH_QUALITY, "--compare", str(out), "--device", "cuda"], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "quality: error: --device: not used by --compare, which reads each run's own config"
    ]


def test_a_report_marks_rows_some_seeds_lack_and_tables_rows_no_rule_trains():
    """Seeds run with other --baselines make one report: a row two of three seeds have is averaged and decided
    over those two, and says so; a run whose baselines do not train (soup, controls) still gets its table."""
    from clipmoe.apps.quality import quality_report

    def run(seed, rows):
        results = {r: {"metrics": _AllMeasures(_metrics(*m))} for r, m in rows.items()}
        return {"recipe": "tuned", "seed": seed, "results": results}

    full = {"base": (40, 90, 50), "expert soup": (45, 90, 50), "DMU CLIP-MoE": (50, 90, 50)}
    runs = {
        f"tuned-seed{s}": run(s, full if s < 2 else {k: full[k] for k in ("base", "DMU CLIP-MoE")}) for s in range(3)
    }
    text = quality_report(runs, "tiny", 0.0)
    assert "## Recipe `tuned` (no baseline trains, so no budget rule applies)" in text
    assert "| expert soup | 45.0 (45.0-45.0) [2 of 3 seeds] |" in text
    assert "| DMU CLIP-MoE | 50.0 (50.0-50.0) |" in text  # every seed: no mark


@pytest.mark.slow
def test_tiny_quality_run_writes_tables_for_both_budget_rules_and_resumes(tmp_path):
    out = str(tmp_path / "q")
    path = run_quality(out, size="tiny", seeds=(0,), recipes=("tuned",), device="cpu", baselines="all")
    text = open(path).read()
    assert "budget rule `epoch`" in text and "budget rule `steps`" in text
    for row in ("| base |", "| DMU CLIP-MoE |", "| MCL stage 1 |", "| expert soup |", "| random routers |"):
        assert row in text
    assert "| uniform mixture |" in text and "DMU beats random routers on retrieval" in text
    assert text.count("DMU keeps classification within 1 point of the base") == 2
    assert "| stage | batches | mean batch |" in text
    for row in ("| CLIP-UP upcycling (1 epoch) |", "| cluster-partition fusion (equal steps) |", "| MCL stages |"):
        assert row in text, row
    assert os.path.exists(os.path.join(out, "runs", "tuned-seed0", "eval", "moe_init_routing.json"))
    with open(os.path.join(out, "runs", "tuned-seed0", "eval", "dmu_clip_moe.json")) as f:
        metrics = json.load(f)["metrics"]
    assert any(k.startswith("cls_color/per_class_recall/") for k in metrics)
    mtime = os.path.getmtime(os.path.join(out, "runs", "tuned-seed0", "moe", "model", "model.safetensors"))
    # a report of finished runs reads each run's own config: other --baselines flags (a recipe run by a separate
    # invocation with a subset) neither refuse nor drop the run's rows
    path = run_quality(
        out, size="tiny", seeds=(0,), recipes=("tuned",), device="cpu", report_only=True, baselines=["dense"]
    )
    rows = [line for line in open(path).read().splitlines() if line.startswith("|")]
    assert rows == [line for line in text.splitlines() if line.startswith("|")]
    # finished runs are reported where they were not made: a copy whose snapshot names a CUDA device (there is
    # none here) and data that is not on this machine reads the same (it was refused for the device)
    moved = str(tmp_path / "moved")
    shutil.copytree(os.path.join(out, "runs"), os.path.join(moved, "runs"))
    snapshot = os.path.join(moved, "runs", "tuned-seed0", "config.yaml")
    with open(snapshot) as f:
        config = yaml.safe_load(f)
    config["device"], config["data"]["train"], config["data"]["eval"] = "cuda", "/elsewhere/train", "/elsewhere/eval"
    with open(snapshot, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    path = run_quality(moved, size="tiny", seeds=(0,), recipes=("tuned",), device="cpu", report_only=True)
    assert [line for line in open(path).read().splitlines() if line.startswith("|")] == rows
    # the moved copy's verdicts beside the original's: the same runs, so nothing differs
    path = compare_quality(moved, out, size="tiny", seeds=(0,), recipes=("tuned",))
    table = [line for line in open(path).read().splitlines() if line.startswith("| ")]
    assert table[0] == "| claim | `tuned`, `epoch` | `tuned`, `steps` |" and len(table) > 8
    assert "**" not in "".join(table) and all(" -> " in line for line in table[2:])
    # a run keeps the rules it was started with: dropping one is refused, naming the key, before any work
    with pytest.raises(ValueError, match=r"changed keys: baselines\.budgets"):
        run_quality(
            out, size="tiny", seeds=(0,), recipes=("tuned",), device="cpu", budgets=("epoch", "flops"), baselines="all"
        )
    # rerun with one more budget rule: nothing of the run is retrained; a fork of it trains the baselines under it
    path = run_quality(
        out,
        size="tiny",
        seeds=(0,),
        recipes=("tuned",),
        device="cpu",
        budgets=("epoch", "steps", "flops"),
        baselines="all",
    )
    assert os.path.getmtime(os.path.join(out, "runs", "tuned-seed0", "moe", "model", "model.safetensors")) == mtime
    fork = os.path.join(out, "runs", "tuned-seed0-flops")
    assert os.path.exists(os.path.join(fork, "baselines", "dense-flops", "model", "config.json"))
    assert not os.path.exists(os.path.join(fork, "baselines", "soup"))  # only the rows the rule adds
    text = open(path).read()
    assert "budget rule `steps`" in text and "budget rule `flops` (equal training compute:" in text
    assert "| dense fine-tune (equal FLOPs) |" in text and "| w/o MCL (equal FLOPs) |" in text


@pytest.mark.slow
def test_runs_train_in_parallel_processes_with_a_log_each_and_resume(tmp_path, capsys):
    out = str(tmp_path / "q")
    kw = {"size": "tiny", "seeds": (0, 1), "recipes": ("tuned",), "device": "cpu", "baselines": ["dense"]}
    kw["budgets"] = ("epoch",)  # the paper's rule alone: no baseline trains under the other
    # seed 1's run folder holds a run of another config: that task fails, naming itself and its log; seed 0 trains
    world = os.path.join(out, "worlds", "seed1")
    other = pipeline_config(world, "tuned", SIZES["tiny"], 1, "builtin:tiny-clip", "cpu", ("epoch",), ["dense"])
    other["mcl"]["lr"] = 0.5
    os.makedirs(os.path.join(out, "runs", "tuned-seed1"))
    with open(os.path.join(out, "runs", "tuned-seed1", "config.yaml"), "w") as f:
        yaml.safe_dump(other, f)
    with pytest.raises(RuntimeError, match=r"(?s)1 task\(s\) failed; rerun .*tuned-seed1: .*changed keys: mcl.lr"):
        run_quality(out, jobs=2, **kw)
    printed = capsys.readouterr().out
    assert "quality: 2 tasks in 2 processes of " in printed
    assert re.search(r"quality: tuned-seed0 finished \(\d of 2; log .*logs/tuned-seed0\.log\)", printed)
    assert "started with a different config" in open(os.path.join(out, "logs", "tuned-seed1.log")).read()
    model = os.path.join(out, "runs", "tuned-seed0", "moe", "model", "model.safetensors")
    mtime = os.path.getmtime(model)

    shutil.rmtree(os.path.join(out, "runs", "tuned-seed1"))
    path = run_quality(out, jobs=2, **kw)
    assert os.path.getmtime(model) == mtime  # seed 0 resumed finished: nothing retrained
    for seed in (0, 1):
        log = open(os.path.join(out, "logs", f"tuned-seed{seed}.log")).read()
        assert "mcl stage 1: 100%" in log and "plan: 11 tasks" in log  # its own progress; no dense-steps task
    text = open(path).read()
    assert "seeds [0, 1]" in text and "| dense fine-tune (1 epoch) |" in text
    assert "budget rule `steps`" not in text and "(equal steps)" not in text
    assert not os.path.exists(os.path.join(out, "runs", "tuned-seed0", "baselines", "dense-steps"))


def _stat(pid: int | str) -> list[str]:
    """A process's /proc stat fields after its name (state, ppid, ...); [] once it has ended or been reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []
    return [] if fields[0] == "Z" else fields  # a zombie has ended


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _stat(e)[1:2] == [str(pid)]]


def _gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_stat(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the kernel's parent-death signal")
def test_a_stopped_parallel_run_leaves_no_task_training(tmp_path):
    """SIGTERM (a scheduler, `kill`) stops the tasks with the invocation; SIGKILL of the invocation, which no
    handler sees, still ends its tasks (the kernel's parent-death signal), so no orphan trains on."""
    out = str(tmp_path / "q")
    command = [*BENCH_QUALITY, "--size", "tiny", "--seeds", "0", "1", "--recipes", "tuned", "--device", "cpu"]
    command += ["--budgets", "epoch", "--baselines", "dense", "--jobs", "2", "--out", out]
    for signum in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        deadline = time.monotonic() + 120
        tasks = []
        while time.monotonic() < deadline and proc.poll() is None:
            logs = [os.path.join(out, "logs", f"tuned-seed{s}.log") for s in (0, 1)]
            if all(os.path.exists(p) and os.path.getsize(p) > 0 for p in logs):  # both tasks started their work
                tasks = [p for p in _children(proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
                if len(tasks) == 2:
                    break
            time.sleep(0.2)
        assert len(tasks) == 2, f"the two task processes did not start: {proc.communicate(timeout=60)}"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        # A stopped task dies at once (a tiny task still has tens of seconds of training left at this point)
        assert _gone(tasks, timeout=5), f"task processes outlived the invocation after signal {signum}"
        if signum == signal.SIGTERM:
            assert proc.returncode == 130 and "quality: stopped; rerun the same command to resume" in err
            assert "Traceback" not in err
        else:
            assert proc.returncode == -signal.SIGKILL
    # Tasks that fail are one line each on stderr, with their logs, and exit code 1 (no traceback)
    for seed in (0, 1):  # each run folder holds a run of another config (the stops above may have left none)
        world = os.path.join(out, "worlds", f"seed{seed}")
        other = pipeline_config(world, "tuned", SIZES["tiny"], seed, "builtin:tiny-clip", "cpu", ("epoch",), ["dense"])
        other["mcl"]["lr"] = 0.5
        os.makedirs(os.path.join(out, "runs", f"tuned-seed{seed}"), exist_ok=True)
        with open(os.path.join(out, "runs", f"tuned-seed{seed}", "config.yaml"), "w") as f:
            yaml.safe_dump(other, f)
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "quality: 2 task(s) failed; rerun to resume them:"
    assert all(
        re.search(r"tuned-seed\d: .*changed keys: mcl.lr.* \(log: .*logs/tuned-seed\d\.log\)", x) for x in lines[1:]
    )


def test_a_parallel_run_checks_every_config_before_it_starts_a_process(tmp_path):
    out = str(tmp_path / "q")
    with pytest.raises(
        ValueError, match=r"(?s)the paper-seed0 run's config.*base_model: no such file or folder: /nowhere"
    ):
        run_quality(out, size="tiny", seeds=(0, 1), recipes=("paper",), device="cpu", jobs=2, base_model="/nowhere")
    assert not os.path.exists(os.path.join(out, "logs"))


def _metrics(retrieval: float, known: float, unseen: float) -> dict:
    """Evaluation metrics whose testbed measures are the given numbers (retrieval R@1, known zero-shot,
    unseen colours and backgrounds recall)."""
    m = {
        f"{s}/{d}_R@1": retrieval
        for s in ("retrieval_short", "retrieval_detailed")
        for d in ("image_to_text", "text_to_image")
    }
    m.update({f"cls_{a}/top1": known for a in ("color", "background", "shape")})
    m.update({f"cls_color/per_class_recall/{c}": unseen for c in ("orange", "red")})  # orange unseen, red seen
    m["cls_background/per_class_recall/olive"] = unseen
    return m


class _AllMeasures(dict):
    """Metrics in which the table's other measures (R@5, R@10, MMVP, ...) read 0."""

    def __missing__(self, key: str) -> float:
        return 0.0


def test_every_table_under_a_budget_rule_ends_with_the_pre_registered_pick():
    """Also a report of the paper's rows alone (no router-option variant, no later recipe): it printed the
    pick only beside the recipes x claims table, so the `large` runs' reports had none."""
    from clipmoe.apps.quality import quality_report

    rows = {
        "base": (40, 90, 50),
        "dense fine-tune (1 epoch)": (60, 80, 50),  # most retrieval, loses 10 points of classification
        "uniform mixture": (50, 90.5, 50),
        "DMU CLIP-MoE": (48, 90, 50),
    }
    runs = {
        f"tuned-seed{s}": {
            "recipe": "tuned",
            "seed": s,
            "results": {r: {"metrics": _AllMeasures(_metrics(*m))} for r, m in rows.items()},
        }
        for s in range(3)
    }
    text = quality_report(runs, "tiny", 0.0)
    assert "Recipes x claims" not in text
    assert "Recommended under `epoch` by the pre-registered rule: **uniform mixture**" in text


def test_recipes_x_claims_and_the_pre_registered_recommendation():
    from clipmoe.apps.quality import recipe_claims, recommend

    def run(seed: int, rows: dict) -> dict:
        return {"recipe": "tuned", "seed": seed, "results": {k: {"metrics": _metrics(*v)} for k, v in rows.items()}}

    # per seed: (retrieval, known zero-shot, unseen recall); DMU rows after the baselines, as the report orders them
    runs = {
        f"tuned-seed{s}": run(
            s,
            {
                "base": (20.0, 80.0, 98.0),
                "MCL stage 1": (21.0, 75.0, 90.0),
                "dense fine-tune (1 epoch)": (22.0 + s, 79.5, 80.0),  # best retrieval, keeps classification
                "dense fine-tune (equal steps)": (30.0, 60.0, 70.0),
                "CLIP-UP upcycling (1 epoch)": (23.0 + s, 70.0, 60.0),  # more retrieval, loses classification
                "DMU CLIP-MoE, base-preserving routing": (21.5 + s, 79.8, 97.0),
                "DMU CLIP-MoE": (22.5 + s, 76.0, 93.0),
            },
        )
        for s in (0, 1, 2)
    }
    table = recipe_claims(runs, "tuned", "epoch")
    rows = [line.split(" | ")[0].lstrip("| ") for line in table[2:]]
    assert rows == [
        "dense fine-tune (1 epoch)",
        "CLIP-UP upcycling (1 epoch)",
        "DMU CLIP-MoE, base-preserving routing",
        "DMU CLIP-MoE",
    ]  # no base, no MCL stage, no row of the other rule
    line = {r: table[2 + i] for i, r in enumerate(rows)}
    assert "+1.0: holds" in line["CLIP-UP upcycling (1 epoch)"]  # retrieval vs dense, every seed
    assert "-10.0: does not hold" in line["CLIP-UP upcycling (1 epoch)"]  # known zero-shot vs the base
    assert "-0.5: does not hold" in line["DMU CLIP-MoE, base-preserving routing"]  # retrieval vs dense
    assert "+17.0: holds" in line["DMU CLIP-MoE, base-preserving routing"]  # unseen recall vs dense
    # rows within 1 point of the base's known zero-shot: dense (-0.5) and base-preserving (-0.2); dense retrieves more
    assert "**dense fine-tune (1 epoch)**" in recommend(runs, "tuned", "epoch")
    for r in runs.values():  # no row keeps classification: the best mean of retrieval and known zero-shot wins
        r["results"]["base"]["metrics"] = _metrics(20.0, 95.0, 98.0)
    text = recommend(runs, "tuned", "epoch")
    assert "no row keeps classification" in text and "**dense fine-tune (1 epoch)**" in text


def test_a_comparison_sets_each_verdict_and_pick_beside_the_reference_and_marks_what_changed():
    """The testbed on another base (``--compare``): claims whose verdict differs, and a pick that differs, are
    in bold; a claim one side did not measure says so; columns are the recipes and rules both sides hold."""
    from clipmoe.apps.quality import compare_report

    def runs(dmu: float, dense: float, steps: bool) -> dict:
        rows = {"base": (40.0, 90.0, 90.0), "dense fine-tune (1 epoch)": (dense, 89.5, 80.0)}
        if steps:
            rows["dense fine-tune (equal steps)"] = (60.0, 80.0, 70.0)
        rows["DMU CLIP-MoE"] = (dmu, 90.0, 88.0)
        return {
            f"tuned-seed{s}": {
                "recipe": "tuned",
                "seed": s,
                "results": {k: {"metrics": _metrics(*v)} for k, v in rows.items()},
            }
            for s in range(3)
        }

    text = compare_report(runs(50.0, 45.0, True), runs(50.0, 55.0, False), ("shipped", "other"))
    assert text.startswith("# The testbed's verdicts: shipped -> other")
    header = next(line for line in text.splitlines() if line.startswith("| claim |"))
    assert header == "| claim | `tuned`, `epoch` |"  # `steps` only on the reference's side: not compared
    line = {row.split(" | ")[0][2:]: row for row in text.splitlines() if row.startswith("| ")}
    assert "**holds +5.0 -> does not hold -5.0**" in line["DMU beats direct fine-tuning on retrieval"]
    assert "| holds +0.0 -> holds +0.0 |" in line["DMU keeps classification within 1 point of the base"]
    assert "not measured -> not measured" in line["DMU beats sparse upcycling on retrieval"]
    assert "**DMU CLIP-MoE -> dense fine-tune (1 epoch)**" in line["pre-registered pick"]
    same = compare_report(runs(50.0, 45.0, True), runs(50.0, 45.0, True), ("a", "b"))
    assert "**" not in same and same.count("`tuned`, `") == 2
    with pytest.raises(ValueError, match="share no recipe and budget rule"):
        compare_report(runs(50.0, 45.0, True), {}, ("a", "b"))
