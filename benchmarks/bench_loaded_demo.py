"""The demo on a quiet machine and beside another 2-thread job: does the CLI's thread choice keep it fast?

Runs ``clipmoe demo`` (a fresh output folder each time) three ways and reports wall times and their ratio to
the quiet run, in the same invocation:

1. quiet: nothing else running (the reference);
2. loaded: beside a 2-thread torch job (matrix products in a loop, started a minute early so the load average
   sees it), with the CLI's default thread choice. The job runs in a session of its own, as another user's
   job or one started from another terminal does (Linux's default scheduler then shares the cores between the
   two sessions, not between their threads); ``--same-session`` starts it in ours instead, as ``job &`` in
   the demo's own shell would (the kernel then shares the cores among the three threads);
3. loaded, ``--src OLD``: the same, with another checkout's ``src`` (e.g. one from before the thread choice),
   when given.

    python benchmarks/bench_loaded_demo.py [--same-session] [--train-size 1000] [--src-before /path/to/old/src]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

LOAD_JOB = """
import torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
while True:
    a = (a @ a).tanh()
"""


def run_demo(src: str, out: str, train_size: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}  # the CLI's own choice
    env["PYTHONPATH"] = src
    cmd = [sys.executable, "-m", "clipmoe.cli", "demo", "--out", out]
    if train_size:
        cmd += ["--train-size", str(train_size)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    with open(out + ".log", "w") as f:  # the demo's own output (its summary table), beside its folder
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"demo failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    threads = next((line for line in proc.stdout.splitlines() if line.startswith("threads:")), "threads: (not printed)")
    print(f"  {seconds:.0f} s; {threads}", flush=True)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=0, help="demo training images (default: the demo's)")
    p.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "src"), help="clipmoe src")
    p.add_argument("--src-before", help="another checkout's src to time under the same load")
    p.add_argument("--same-session", action="store_true", help="start the load job in the demo's session")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="loaded-demo-")
    print(f"{platform.machine()}, {os.cpu_count()} CPU(s), python {platform.python_version()}; outputs in {root}")
    while os.getloadavg()[0] > 0.5:  # the thread choice reads the 1-minute load: let earlier work fade first
        time.sleep(10)
    print("quiet:", flush=True)
    quiet = run_demo(os.path.abspath(a.src), os.path.join(root, "quiet"), a.train_size)
    load = subprocess.Popen(
        [sys.executable, "-c", LOAD_JOB],
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        start_new_session=not a.same_session,
    )
    where = "the demo's session" if a.same_session else "a session of its own"
    try:
        time.sleep(60)  # the 1-minute load average the thread choice reads
        print(f"loaded (beside a 2-thread job in {where}):", flush=True)
        loaded = run_demo(os.path.abspath(a.src), os.path.join(root, "loaded"), a.train_size)
        before = None
        if a.src_before:
            print(f"loaded, {a.src_before}:", flush=True)
            before = run_demo(os.path.abspath(a.src_before), os.path.join(root, "before"), a.train_size)
    finally:
        load.kill()
    print(f"\nquiet {quiet:.0f} s; loaded {loaded:.0f} s = {loaded / quiet:.2f}x quiet", end="")
    print(f"; loaded with --src-before {before:.0f} s = {before / quiet:.2f}x quiet" if before else "")


if __name__ == "__main__":
    main()
