"""The evaluation suite on a world's eval/ folder: every distinct image list encoded once, against every set
encoding its own images (the plain path).

A world writes its evaluation images into every retrieval and classification set (as CLIP_benchmark expects):
nine sets, one image list. ``evaluate_suite`` encodes it once; the reference evaluates each set on its own,
as the suite did before. The model is the shipped base, sparse-upcycled (4 experts, top-2, every block): what
a report evaluates for each MoE row. Rounds interleave the two; reported: the median per-round time ratio,
and that both give the same metrics (the routing analysis off in both: it is measured apart).

    python benchmarks/bench_eval_suite.py --eval-size 500 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import clipmoe
from bench_moe import environment, interleaved_times, median_ratio
from clipmoe.data.world import WorldConfig, generate_world
from clipmoe.eval import evaluate_classification, evaluate_retrieval, evaluate_suite, load_wds
from clipmoe.eval.mmvp import evaluate_mmvp, load_mmvp
from clipmoe.eval.probes import evaluate_probes, load_probes
from clipmoe.eval.suite import find_eval_sets


def each_set_alone(model, eval_dir: str, batch_size: int) -> dict:
    """The plain path: every set evaluated by itself, encoding its own images."""
    results = {}
    for name, (kind, path) in find_eval_sets(eval_dir).items():
        if kind == "wds":
            data = load_wds(path)
            evaluate = evaluate_classification if hasattr(data, "classnames") else evaluate_retrieval
            metrics = evaluate(model, data, batch_size=batch_size)
        elif kind == "mmvp":
            metrics = evaluate_mmvp(model, load_mmvp(path), batch_size=batch_size)
        else:
            metrics = evaluate_probes(model, load_probes(path), batch_size=batch_size)
        results.update({f"{name}/{k}": v for k, v in metrics.items()})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-size", type=int, default=500, help="evaluation images of the world (default 500)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        generate_world(tmp, WorldConfig(seed=7, train_size=8, val_size=0, eval_size=a.eval_size), verbose=False)
        eval_dir = f"{tmp}/eval"
        model = clipmoe.sparse_upcycle(clipmoe.load("builtin:tiny-clip"), num_experts=4, top_k=2, noise=0.1, seed=0)
        model.eval()
        sets = len(find_eval_sets(eval_dir))
        same = evaluate_suite(model, eval_dir, batch_size=a.batch_size, routing=False) == each_set_alone(
            model, eval_dir, a.batch_size
        )
        times = interleaved_times(
            {
                "suite": lambda: evaluate_suite(model, eval_dir, batch_size=a.batch_size, routing=False),
                "each set alone": lambda: each_set_alone(model, eval_dir, a.batch_size),
            },
            a.rounds,
            torch.device("cpu"),
        )
    print(" | ".join(f"{k}: {v}" for k, v in environment().items()))
    print(f"world: {a.eval_size} evaluation images, {sets} evaluation sets; batch {a.batch_size}")
    for name, ts in times.items():
        print(f"{name}: median {sorted(ts)[len(ts) // 2]:.1f} s over {len(ts)} rounds")
    print(f"suite / each set alone: {median_ratio(times, 'suite', 'each set alone'):.2f}x the time")
    print(f"same metrics: {same}")


if __name__ == "__main__":
    main()
