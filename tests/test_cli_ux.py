"""What a person sees from the command line: the thread choice, Ctrl-C, the end of a run, readable plots."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from clipmoe.dmu.config import load_config
from clipmoe.dmu.pipeline import Pipeline
from clipmoe.dmu.report import expert_names, training_curves_figure
from clipmoe.eval import analyze_routing
from clipmoe.eval.routing import routing_figures
from clipmoe.utils.threads import ThreadChoice, apply_threads, choose_threads
from conftest import make_tiny_clip
from test_eval_data import noise_image
from test_pipeline import write_config

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

# ------------------------------------------------------------------------------------------ threads


@pytest.mark.parametrize(
    ("cores", "load", "requested", "env", "threads", "passive"),
    [
        (2, 0.1, None, {}, 2, False),  # idle: every core
        (16, 0.2, None, {}, 16, False),
        (16, 4.2, None, {}, 11, False),  # the cores the load leaves free
        (2, 2.3, None, {}, 1, True),  # busy: one thread, passive waiting
        (2, 7.9, None, {}, 1, True),
        (2, 2.3, None, {"OMP_WAIT_POLICY": "ACTIVE"}, 1, False),  # the user's wait policy is kept
        (8, 0.0, None, {"OMP_NUM_THREADS": "3"}, 3, False),  # the user's thread count is kept
        (8, 9.0, None, {"OMP_NUM_THREADS": "3"}, 3, True),
        (8, 9.0, 5, {"OMP_NUM_THREADS": "3"}, 5, True),  # --threads wins
        (16, 0.0, None, {"LOCAL_WORLD_SIZE": "4"}, 4, False),  # torchrun: the cores shared among its processes
        (4, None, None, {}, 4, False),  # no load average (not Linux)
    ],
)
def test_thread_choice(cores, load, requested, env, threads, passive):
    choice = choose_threads(cores, load, requested, env)
    assert (choice.threads, choice.passive) == (threads, passive)
    assert choice.line().startswith(f"threads: {threads}") and "--threads" in choice.line()
    assert ("passive OpenMP waiting" in choice.line()) == passive


def test_thread_choice_refuses_zero_threads():
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        choose_threads(2, 0.0, 0)


def test_apply_threads_sets_the_environment_and_torch():
    before = torch.get_num_threads()
    env = {"OMP_WAIT_POLICY": "ACTIVE", "MKL_NUM_THREADS": "2"}
    try:
        apply_threads(ThreadChoice(1, True, "test"), env)
        assert torch.get_num_threads() == 1
        assert env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's policy stays
        assert env["MKL_NUM_THREADS"] == "1"  # else torch would run with 2 where the CLI says 1
        env = {}
        apply_threads(ThreadChoice(2, True, "test"), env)
        assert env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    finally:
        torch.set_num_threads(before)


def _clipmoe(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = SRC
    return subprocess.run(
        [sys.executable, "-m", "clipmoe.cli", *args], env=env, capture_output=True, text=True, timeout=300, **kw
    )


def test_threads_option_reaches_torch_and_help_stays_fast(tmp_path):
    assert _clipmoe(["--help"]).returncode == 0
    # --help stays fast: it answers without importing torch (checked, not timed: a busy machine varies)
    code = "import sys\nfrom clipmoe.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    code += "print('torch' in sys.modules)"
    helped = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and helped.stdout.splitlines()[-1] == "False", helped.stdout + helped.stderr
    # `clipmoe world` computes: it prints its choice, and torch (imported after the choice) runs with it.
    code = "import sys; from clipmoe.cli import main; main(sys.argv[1:]); import torch; print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    world_args = [str(tmp_path / "w"), "--preset", "test", "--train-size", "8", "--eval-size", "8", "--quiet"]
    out = subprocess.run(
        [sys.executable, "-c", code, "world", *world_args, "--threads", "1"],
        env={**env, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (
        re.match(r"threads: 1(, passive OpenMP waiting)? \(from --threads", out.stdout)
        and out.stdout.splitlines()[-1] == "1"
    )
    status = _clipmoe(["status", str(tmp_path / "none.yaml")])  # computes nothing: no thread line
    assert status.returncode == 2 and "threads:" not in status.stdout + status.stderr


# ------------------------------------------------------------------------------------------ Ctrl-C, end of a run


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_then_the_rerun_resumes(tmp_path, world, base_dir):
    cfg = write_config(
        tmp_path,
        world,
        base_dir,
        experts=2,
        mcl={"steps": 30, "checkpoint_every": 3},
        baselines={"enabled": [], "stages": False},
    )
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "clipmoe.cli", "run", cfg, "--run-dir", str(run_dir), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": SRC}
    # A shell without job control starts background commands with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the run the default disposition a terminal's process has.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    ckpt = run_dir / "stage1" / "train" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists() and proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    stopped = [line for line in re.split(r"[\r\n]", out) if "stopped" in line]
    assert len(stopped) == 1, out
    assert re.fullmatch(
        r"clipmoe run: stopped at mcl 1 \(mcl stage 1\) step \d+ of 30; rerun the same command to resume", stopped[0]
    ), stopped[0]
    assert "plan: 7 tasks, 0 already done" in out and re.search(r"threads: 1.* \(from --threads", out)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "plan: 7 tasks, 3 already done" in out  # prepare, embed 0, cluster 0
    assert "mcl stage 1: resuming from its last checkpoint" in out
    assert re.search(r"^estimate: about \d+ (s|min) of embedding and training left", out, re.MULTILINE), out
    assert "Writing model shards" not in out and "Loading weights" not in out
    named = dict(re.findall(r"^(final model \(DMU CLIP-MoE\)|report|plots)[^:\n]*:\s+(\S+)$", out, re.MULTILINE))
    assert set(named) == {"final model (DMU CLIP-MoE)", "report", "plots"}, out
    for path in named.values():
        assert os.path.exists(path), path
    assert os.path.samefile(named["final model (DMU CLIP-MoE)"], run_dir / "moe" / "model")
    assert "1 threads" in open(named["report"]).read()


def test_the_ctrl_c_handler_respects_an_ignored_sigint_and_uninstalls_cleanly():
    import threading

    from clipmoe.utils import interrupt

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job of a shell without job control
        interrupt.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        thread = threading.Thread(target=interrupt.install)  # only the main thread may set a handler
        thread.start()
        thread.join()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        interrupt.install()
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()  # still pending: the work stops, not just one loop
        interrupt.uninstall()
        interrupt.check()  # nothing pending
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        interrupt.uninstall()
        signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_that_a_finalizer_swallows_still_stops_the_work():
    """Python raises KeyboardInterrupt in whatever frame runs when SIGINT arrives; in a finalizer it is printed as
    "Exception ignored" and lost (CI once saw a run go to its end that way). The CLI's handler records it, and
    the long loops' ``interrupt.check()`` raises it at their next step."""
    script = """
import os, signal, weakref
from clipmoe.utils import interrupt
interrupt.install()
class Thing:
    pass
def finalizer(_):
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(200000))  # the handler runs here, inside the finalizer
thing = Thing()
ref = weakref.ref(thing, finalizer)
del thing
print("after the finalizer", flush=True)
interrupt.check()
print("not stopped", flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert "Exception ignored" in done.stderr and "KeyboardInterrupt" in done.stderr, done.stderr  # it was swallowed
    assert "after the finalizer" in done.stdout and "not stopped" not in done.stdout, done.stdout
    assert done.returncode != 0 and done.stderr.rstrip().endswith("KeyboardInterrupt"), done.stderr


# ------------------------------------------------------------------------------------------ plots


@pytest.fixture(scope="module")
def routing():
    import clipmoe

    moe = clipmoe.sparse_upcycle(make_tiny_clip(), num_experts=3, top_k=2, noise=0.2, seed=1)
    images = [noise_image(i) for i in range(6)]
    texts = ["red cube", "a small green cone on the left", "blue sphere"]
    return analyze_routing(
        moe,
        images,
        texts,
        image_labels={"color": ["red", "blue"] * 3, "shape": ["cube", "cone", "cube"] * 2},
        text_labels={"length": ["short", "long", "short"]},
    )


def _heatmaps(fig):
    return [ax for ax in fig.axes if ax.images]


def test_routing_figures_one_per_tower_with_named_experts_and_labels(routing):
    figures = routing_figures(routing, expert_names(3), "DMU CLIP-MoE")
    assert list(figures) == ["vision", "text"]
    for tower, fig, groups in (("vision", figures["vision"], 2), ("text", figures["text"], 1)):
        assert 1200 <= fig.get_figwidth() * 100 <= 1600  # page width at the saved 100 dpi
        assert f"{tower} tower of DMU CLIP-MoE" in fig.get_suptitle() and "top-2 of 3" in fig.get_suptitle()
        heatmaps = _heatmaps(fig)
        assert len(heatmaps) == 2 + groups  # load per layer, chosen together, one per label set
        for ax in heatmaps:
            assert [t.get_text() for t in ax.get_xticklabels()] == ["base FFN", "MCL stage 1", "MCL stage 2"]
            assert ax.get_xlabel() == "expert" and ax.get_ylabel() and ax.get_title()
            bar = ax.images[0].colorbar
            assert bar is not None and bar.ax.get_ylabel(), ax.get_title()  # every colour bar says what it shows
        entropy = [ax for ax in fig.axes if not ax.images and ax.lines and ax.get_title().startswith("Router entropy")]
        assert len(entropy) == 1 and entropy[0].get_xlabel() and "nats" in entropy[0].get_ylabel()
        titles = " | ".join(ax.get_title() for ax in heatmaps)
        assert "Expert load per MoE layer" in titles and "Chosen together" in titles
    assert "Load per color" in " ".join(ax.get_title() for ax in figures["vision"].axes)
    with pytest.raises(ValueError, match="2 expert names for 3 experts"):
        routing_figures(routing, ["a", "b"])
    default = _heatmaps(routing_figures(routing)["vision"])[0]
    assert [t.get_text() for t in default.get_xticklabels()] == ["expert 0", "expert 1", "expert 2"]


def test_training_curves_keep_batch_kinds_apart(tmp_path, world, base_dir):
    cfg = load_config(write_config(tmp_path, world, base_dir, experts=3, baselines={"enabled": ["dense"]}))
    pipe = Pipeline(cfg, str(tmp_path / "run"))
    rows = pipe.rows()
    folders = [folder for row in rows for _, folder in row.curves]
    for i, folder in enumerate(folders):
        os.makedirs(folder)
        with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
            for step in range(1, 5 + 60 * (i == 0)):  # the first (MCL stage 1) long enough to be smoothed
                f.write(json.dumps({"step": step, "clip": 5.0 - 0.01 * step + i}) + "\n")
    fig = training_curves_figure(pipe, rows)
    mcl, rand = fig.axes[:2]
    assert "one cluster" in mcl.get_title() and "Random batches" in rand.get_title()
    assert "not comparable" in fig.get_suptitle()
    assert _legend(mcl) == ["MCL stage 1 (mean of 3 steps)", "MCL stage 2"]
    assert _legend(rand) == ["dense fine-tune (1 epoch)", "dense fine-tune (equal steps)", "DMU routing"]
    for ax in (mcl, rand):
        assert ax.get_xlabel() and ax.get_ylabel() == "contrastive loss"


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]
