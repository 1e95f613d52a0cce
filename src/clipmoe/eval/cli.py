"""Evaluate a CLIP or CLIP-MoE: retrieval, classification, MMVP-VLM, probes, routing, a whole eval/ suite, or
what it knows, suppresses or lacks of a generated world's attributes.

Writes the results as JSON (--out) and prints a table. --data is, per task: retrieval / classification: a
CLIP_benchmark webdataset folder, a COCO captions JSON or Flickr caption file (images under --images, default
beside it), a CLIP_benchmark COCO/Flickr root, or an ImageFolder; mmvp: an MMVP-VLM folder; probes: a probes
folder or probes.jsonl; suite: a generated world's eval/ folder; routing: an eval/ folder or any retrieval /
classification dataset (classification images and prompts are grouped by class); attributes: a generated
world's folder (``clipmoe world``), with --probe-world a larger one for the probes that tell suppressed from
absent (docs/pretraining.md).
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from ..formats.load import load
from ..utils.dtypes import DTYPE_CHOICES, torch_dtype
from ..utils.io import check_writable_file, write_json
from .attributes import check_worlds, format_attributes, read_attributes
from .classification import class_prompts, evaluate_classification
from .datasets import ClassificationDataset, RetrievalDataset, open_eval_set, wds_splits
from .mmvp import evaluate_mmvp
from .probes import evaluate_probes
from .retrieval import evaluate_retrieval
from .routing import analyze_routing, plot_routing
from .suite import evaluate_suite, find_eval_sets

TASKS = ("retrieval", "classification", "mmvp", "probes", "routing", "suite", "attributes")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="model folder, checkpoint file or Hugging Face id owner/name[@revision] (as clipmoe.load)"
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", required=True, help="dataset or eval/ folder (see above)")
    parser.add_argument("--split", default=None, help="webdataset / Karpathy split (default: test, or the only one)")
    parser.add_argument("--images", default=None, help="image folder for a COCO JSON or Flickr caption file")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--plot",
        default=None,
        help="routing / suite on a CLIP-MoE: write the routing figures, one per tower (PLOT_vision.png, PLOT_text.png)",
    )
    parser.add_argument(
        "--probe-world",
        default=None,
        help="attributes: a generated world drawn like --data, with PROBE_TRAIN_SIZE + PROBE_TEST_SIZE evaluation"
        " images, for the embedding's linear and MLP probes and the patch tokens' MLP probe (the states then come"
        " from the MLP probe) and the caption contrast",
    )
    parser.add_argument(
        "--probe-train-size",
        type=int,
        default=None,
        help="attributes, with --probe-world: probe training images (5000)",
    )
    parser.add_argument(
        "--probe-test-size", type=int, default=None, help="attributes, with --probe-world: probe test images (1000)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="weights and compute dtype")


def run_eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.plot and args.task not in ("routing", "suite"):
        raise ValueError("--plot is for --task routing or suite")
    if args.probe_world and args.task != "attributes":
        raise ValueError("--probe-world is for --task attributes")
    _check_attribute_options(args)
    for path in (args.data, args.probe_world):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"no data at {path}")
    if args.out:
        check_writable_file(args.out, "--out")
    if args.task == "attributes":  # before the model loads
        check_worlds(args.data, args.probe_world, args.probe_train_size, args.probe_test_size)
    dtype = torch_dtype(args.dtype)
    model = load(args.model, device=args.device, dtype=None if dtype == torch.float32 else dtype)
    kw = {"batch_size": args.batch_size, "device": args.device}
    results = _run_task(model, args, kw)
    # the table first: it is shown even if the write below fails
    print(format_attributes(results) if args.task == "attributes" else format_table(results))
    if args.out:
        write_json(args.out, results, indent=2)
    routing = results.get("routing") if args.task == "suite" else results if args.task == "routing" else None
    if args.plot and routing:
        print("routing plots: " + ", ".join(plot_routing(routing, args.plot)))
    return 0


def _check_attribute_options(args: argparse.Namespace) -> None:
    """``--task attributes`` reads a generated world's own sets: options it would ignore are refused; the
    probe sizes default where a probe world is given and belong to it."""
    given = [f"--{name.replace('_', '-')}" for name in ("split", "images") if getattr(args, name) is not None]
    sizes = [
        f"--{name.replace('_', '-')}"
        for name in ("probe_train_size", "probe_test_size")
        if getattr(args, name) is not None
    ]
    if args.task != "attributes":
        if sizes:
            raise ValueError(f"{', '.join(sizes)}: for --task attributes with --probe-world")
        return
    if given or args.num_workers:
        raise ValueError(
            f"{', '.join(given + ['--num-workers'] * bool(args.num_workers))}: not used by --task attributes"
        )
    if sizes and not args.probe_world:
        raise ValueError(f"{', '.join(sizes)}: need --probe-world (the probes they size read that world)")
    for name, default in (("probe_train_size", 5000), ("probe_test_size", 1000)):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        setattr(args, name, default if value is None else value)


def _run_task(model, args: argparse.Namespace, kw: dict) -> dict:
    task = args.task
    if task == "attributes":
        return read_attributes(
            model, args.data, args.probe_world, args.probe_train_size, args.probe_test_size, args.batch_size
        )
    if task == "mmvp":
        return evaluate_mmvp(model, args.data, **kw)
    if task == "probes":
        return evaluate_probes(model, args.data, **kw)
    if task == "suite" or (task == "routing" and _is_eval_folder(args.data)):
        results = evaluate_suite(model, args.data, num_workers=args.num_workers, routing=task == "routing" or None)
        return results["routing"] if task == "routing" else results
    data = open_eval_set(args.data, args.split, args.images)
    kw["num_workers"] = args.num_workers
    if task == "routing":
        if isinstance(data, RetrievalDataset):
            return analyze_routing(model, data.images, [c for caps in data.captions for c in caps], **kw)
        if data.multilabel:
            return analyze_routing(model, data.images, class_prompts(data.classnames, data.templates), **kw)
        names = data.classnames
        return analyze_routing(
            model,
            data.images,
            class_prompts(names, data.templates),
            image_labels={"class": [names[t] for t in data.targets.tolist()]},
            text_labels={"class": [n for n in names for _ in data.templates]},
            **kw,
        )
    expected = RetrievalDataset if task == "retrieval" else ClassificationDataset
    if not isinstance(data, expected):
        other = "classification" if task == "retrieval" else "retrieval"
        raise ValueError(f"{args.data} is a {other} dataset; use --task {other}")
    if task == "retrieval":
        return evaluate_retrieval(model, data, **kw)

    return evaluate_classification(model, data, **kw)


def _is_eval_folder(path: str) -> bool:
    if not os.path.isdir(path) or wds_splits(path):
        return False
    try:
        find_eval_sets(path)
    except ValueError:
        return False
    return True


def format_table(results: dict) -> str:
    """Metrics as aligned ``name  value`` rows; routing statistics as one row per MoE layer."""
    routing = results if "num_experts" in results else results.get("routing")
    rows = [] if routing is results else [(k, _fmt(v)) for k, v in results.items() if k != "routing"]
    if routing:
        for modality in ("image", "text"):
            r = routing.get(modality)
            if not r:
                continue
            for layer, load, entropy in zip(r["layers"], r["load"], r["entropy"]):
                loads = " ".join(f"{x:.2f}" for x in load)
                rows.append((f"routing {modality} block {layer}", f"load {loads}  entropy {entropy:.3f}"))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)
