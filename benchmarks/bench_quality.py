"""The quality testbed (docs/quality.md): does DMU make the base better, and where? Resumable; rerun to continue.

python benchmarks/bench_quality.py                      # default size, seeds 0 1 2, both recipes, one process a core
python benchmarks/bench_quality.py --size large --device cuda
python benchmarks/bench_quality.py --budgets epoch steps samples flops   # + equal samples / equal FLOPs rows
python benchmarks/bench_quality.py --size large --seeds 0 --recipes tuned --budgets epoch   # the paper's rule alone
python benchmarks/bench_quality.py --baselines all       # + the later recipes (CLIP-UP, cluster-partition fusion)
python benchmarks/bench_quality.py --recipes tuned tuned+centroid tuned+distill   # router options vs tuned
python benchmarks/bench_quality.py --base-model MY_CLIP --out q-mine; python benchmarks/bench_quality.py --out q-mine \
    --compare quality-run                              # each claim's verdict on the shipped base -> on MY_CLIP
"""

from __future__ import annotations

import argparse
import sys

from clipmoe.apps.quality import (
    DEFAULT_BASELINES,
    RECIPES,
    SIZES,
    TESTBED_BUDGETS,
    TasksFailed,
    compare_quality,
    default_jobs,
    run_quality,
)
from clipmoe.dmu.budgets import BUDGETS
from clipmoe.utils import interrupt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="testbed size (default: default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument(
        "--recipes",
        nargs="+",
        choices=list(RECIPES),
        default=["paper", "tuned"],
        help="recipes to run (default: paper tuned; the tuned+... variants set one router option each)",
    )
    p.add_argument(
        "--budgets",
        nargs="+",
        choices=list(BUDGETS),
        default=list(TESTBED_BUDGETS),
        help="budget rules of the baseline rows (default: epoch steps; at least one of the two, which each run "
        "trains; samples and flops train in forks of it)",
    )
    p.add_argument("--out", default="quality-run", help="output folder (worlds, runs, quality.md)")
    p.add_argument("--base-model", default="builtin:tiny-clip", help="base CLIP (default: the shipped one)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write quality.md from finished runs (e.g. run per recipe in parallel)",
    )
    p.add_argument(
        "--compare",
        metavar="REFERENCE",
        help="write OUT/compare.md instead of running: each claim's verdict and the pre-registered pick of the "
        "finished runs in REFERENCE (another --out) -> those in --out, in bold where they differ",
    )
    p.add_argument(
        "--baselines",
        nargs="+",
        default=list(DEFAULT_BASELINES),
        help="baseline rows: keys of the pipeline's registry, or all (default: "
        + " ".join(DEFAULT_BASELINES)
        + "; all adds the later recipes clip_up and fmoe)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        help="processes training at once, one per seed and recipe (with its variants); "
        "default: a free core each on a CPU, 1 on a GPU",
    )
    a = p.parse_args()
    if a.report_only or a.compare:  # each finished run's own config says what it was trained with
        ignored = [
            option
            for option, given in (
                ("--base-model", a.base_model != p.get_default("base_model")),
                ("--baselines", a.baselines != p.get_default("baselines")),
                ("--device", a.device != p.get_default("device")),
                ("--jobs", a.jobs is not None),
            )
            if given
        ]
        if ignored:
            print(
                f"quality: error: {', '.join(ignored)}: not used by {'--compare' if a.compare else '--report-only'},"
                " which reads each run's own config",
                file=sys.stderr,
            )
            sys.exit(2)
    baselines = "all" if a.baselines == ["all"] else a.baselines
    interrupt.install()  # a Ctrl-C stops the run at its next step even when a finalizer swallows it
    try:
        if a.compare:
            compare_quality(a.out, a.compare, a.size, tuple(a.seeds), tuple(a.recipes), tuple(a.budgets))
            return
        run_quality(
            a.out,
            a.size,
            tuple(a.seeds),
            tuple(a.recipes),
            a.base_model,
            a.device,
            a.report_only,
            tuple(a.budgets),
            baselines,
            default_jobs(a.device) if a.jobs is None else a.jobs,
        )
    except (ValueError, FileNotFoundError) as e:  # a bad request or config: one clear line, as the CLI's
        print(f"quality: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TasksFailed as e:  # each named with its log; a traceback of the parent would say nothing more
        print(f"quality: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("quality: stopped; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        interrupt.uninstall()


if __name__ == "__main__":
    main()
