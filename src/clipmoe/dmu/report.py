"""Evaluate the run's models and write the markdown report with its plots.

The table follows the paper's: rows (baselines.rows) are the base model, each MCL stage alone, every baseline
under every budget rule and the DMU CLIP-MoE; columns are retrieval R@1/R@5 in both directions on short and
detailed captions, zero-shot classification per attribute, MMVP-style pairs and attribute probes, plus the
budget rule, trainable/total/active parameters and measured encode throughput.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import time

import torch

from ..eval import evaluate_suite, plot_routing
from ..formats.hub import model_config_path
from ..formats.load import read_config
from ..model.modeling import ClipMoeModel
from ..model.surgery import find_ffns, resolve_layers
from ..utils.io import write_text
from .budgets import BUDGETS
from .config import PipelineConfig

_PLOT_STYLE = {"dpi": 100}


def measure_throughput(model: ClipMoeModel, batch: int = 32, repeats: int = 5) -> dict[str, float]:
    """Images/s and texts/s of ``encode_image`` / ``encode_text`` (median of ``repeats`` timed calls)."""
    model.eval()
    crop = model.image_processor.crop_size
    device = next(model.parameters()).device
    pixels = torch.randn(batch, 3, crop, crop, device=device)
    tc = model.config.text_config

    def special(token_id: int | None) -> int:  # SigLIP configs carry CLIP's bos/eos ids, beyond their vocabulary
        return token_id if token_id is not None and 0 <= token_id < tc.vocab_size else 1

    ids = torch.full((batch, tc.max_position_embeddings), special(tc.pad_token_id))
    ids[:, 0] = special(tc.bos_token_id)
    ids[:, 1:9] = torch.randint(4, tc.vocab_size, (batch, 8))
    ids[:, 9] = special(tc.eos_token_id)
    mask = torch.zeros_like(ids)
    mask[:, :10] = 1
    out = {}
    with torch.no_grad():
        for name, fn in (
            ("images_per_s", lambda: model.encode_image(pixels)),
            ("texts_per_s", lambda: model.encode_text(ids.to(device), mask.to(device))),
        ):
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[name] = batch / statistics.median(times)
    return out


def evaluate_row(model: ClipMoeModel, cfg: PipelineConfig, name: str) -> dict:
    """Everything the report shows about one model: eval metrics, parameter counts, throughput, routing."""
    result: dict = {"name": name, "parameters": model.parameter_counts()}
    result["throughput"] = measure_throughput(model, cfg.eval.throughput_batch)
    if cfg.data.eval:
        result["metrics"] = evaluate_suite(model, cfg.data.eval, batch_size=cfg.eval.batch_size)
    return result


def phase_parameters(cfg: PipelineConfig) -> dict[str, dict[str, int]]:
    """Trainable / total / active parameters of each phase, from the base model's config (no weights read)."""
    config_path = model_config_path(cfg.base_model)  # a hub id: its config.json alone, no weights
    if config_path is None:
        raise ValueError(f"{cfg.base_model} has no config.json (a checkpoint file: convert it to a folder first)")
    model_class, config = read_config(os.path.dirname(config_path))  # CLIP, SigLIP or SigLIP 2
    with torch.device("meta"):
        base = model_class(config)
    total = sum(p.numel() for p in base.parameters())
    ffns = find_ffns(base)
    chosen = resolve_layers(cfg.moe.layers, {t: len(f) for t, f in ffns.items()})
    ffn_all = sum(p.numel() for fs in ffns.values() for f in fs for p in f.module.parameters())
    moe_ffn = sum(p.numel() for t, ids in chosen.items() for i in ids for p in ffns[t][i].module.parameters())
    routers = sum(ffns[t][i].parts()[0].in_features * cfg.moe.experts for t, ids in chosen.items() for i in ids)
    e, k = cfg.moe.experts, cfg.moe.top_k
    moe_total = total + (e - 1) * moe_ffn + routers
    moe_active = total + (k - 1) * moe_ffn + routers
    return {
        "MCL stage": {"trainable": ffn_all, "total": total, "active": total},
        "router training": {"trainable": routers, "total": moe_total, "active": moe_active},
        "dense fine-tune": {"trainable": total, "total": total, "active": total},
        "sparse upcycling": {"trainable": routers + e * moe_ffn, "total": moe_total, "active": moe_active},
    }


# ------------------------------------------------------------------------------------------ report


_TABLES = [
    (
        "Zero-shot retrieval (R@k, %; T→I = text-to-image, I→T = image-to-text)",
        lambda k: k.startswith("retrieval_") and ("R@1" in k or "R@5" in k) and not k.endswith("R@10"),
    ),
    ("Zero-shot classification per attribute (top-1, %)", lambda k: k.startswith("cls_") and k.endswith("/top1")),
    (
        "MMVP-style pairs per attribute (%; a pair counts when both statements pick their image)",
        lambda k: k.startswith("mmvp/pattern/") or k == "mmvp/mean",
    ),
    (
        "Attribute probes (%; pair = MMVP rule, swap = caption with one attribute swapped)",
        lambda k: k in ("probes/pair_mean", "probes/swap_mean") or k.startswith(("probes/pair/", "probes/swap/")),
    ),
]


def _table(results: dict[str, dict], pred) -> list[str]:
    keys = sorted(
        {
            k
            for r in results.values()
            for k, v in r.get("metrics", {}).items()
            if isinstance(v, (int, float)) and pred(k)
        }
    )
    if not keys:
        return []
    lines = ["| model | " + " | ".join(_short(c) for c in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        m = r.get("metrics", {})
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in keys) + " |")
    return lines


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _short(col: str) -> str:
    for old, new in (
        ("retrieval_", ""),
        ("/image_to_text_", " I→T "),
        ("/text_to_image_", " T→I "),
        ("cls_", ""),
        ("/top1", ""),
        ("mmvp/pattern/", ""),
        ("mmvp/mean", "mean"),
        ("probes/", ""),
        ("_mean", " mean"),
        ("/", " "),
    ):
        col = col.replace(old, new)
    return col


def write_report(pipe, results: dict[str, dict], path: str) -> None:
    """report.md with the comparison table, a verdict on the paper's claim, and plots under plots/."""
    run_dir = os.path.dirname(path)
    plots = os.path.join(run_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    lines = ["# CLIP-MoE (DMU) run report", ""]
    lines += [
        f"Run directory: `{run_dir}`  ",
        f"Base model: `{pipe.cfg.base_model}`; {pipe.cfg.moe.experts} experts, "
        f"top-{pipe.cfg.moe.top_k}; training data: `{pipe.cfg.data.train}` (caption: {pipe.cfg.data.caption})  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "",
    ]
    lines += ["## Results", "", "All scores are percentages on held-out evaluation sets.", ""]
    for title, pred in _TABLES:
        table = _table(results, pred)
        if table:
            lines += [f"### {title}", "", *table, ""]
    lines += [
        "## Cost",
        "",
        "Trainable parameters summed over every phase that produced the model; active = parameters used per token.",
        "",
        "| model | budget rule | trainable params | total params | active params | images/s | texts/s |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = pipe.rows()
    trainable = _trainable_by_row(pipe.cfg, rows)
    rules = {row.name: BUDGETS[row.rule].label if row.rule else "-" for row in rows}
    for name, r in results.items():
        p, t = r["parameters"], r["throughput"]
        n = trainable.get(name)
        lines.append(
            f"| {name} | {rules.get(name, '-')} | {f'{n:,}' if n is not None else '-'} | {p['total']:,} | "
            f"{p['active']:,} | {t['images_per_s']:.0f} | {t['texts_per_s']:.0f} |"
        )
    used = [BUDGETS[r] for r in dict.fromkeys(row.rule for row in rows if row.rule)]
    if used:
        lines += ["", "Budget rules of the baseline rows:", ""]
        lines += [f"- **{b.label}** (`{b.key}`): {b.rule}." for b in used]
    compared = [row.name for row in rows if row.compare]
    lines += ["", "## Does this run agree with the paper?", "", *verdict(results, compared), ""]
    lines += _timings(pipe)
    lines += _extraction(pipe, rows)
    lines += ["## Plots", ""]
    for title, png in _plots(pipe, rows, results, plots):
        lines.append(f"- {title}: ![{title}](plots/{png})")
    write_text(path, "\n".join(lines) + "\n")


def _mean_of(metrics: dict, pred) -> float | None:
    vals = [v for k, v in metrics.items() if pred(k) and isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def summary_scores(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Per row: mean retrieval R@1 (both directions, all sets), mean zero-shot top-1, MMVP mean."""
    out = {}
    for name, r in results.items():
        m = r.get("metrics", {})
        out[name] = {
            "retrieval R@1": _mean_of(m, lambda k: k.startswith("retrieval_") and k.endswith("R@1")),
            "zero-shot top-1": _mean_of(m, lambda k: k.startswith("cls_") and k.endswith("/top1")),
            "MMVP": _mean_of(m, lambda k: k.startswith("mmvp") and k.endswith("/mean")),
        }
    return out


def verdict(results: dict[str, dict], compared: list[str]) -> list[str]:
    """Plain statements: does DMU beat the ``compared`` baselines (and the base) on retrieval, and keep zero-shot
    classification near the base? (The paper's claim.)"""
    s = summary_scores(results)
    dmu = s.get("DMU CLIP-MoE", {})
    if dmu.get("retrieval R@1") is None:
        return ["No evaluation sets were configured (`data.eval`), so no comparison can be made."]
    lines = []
    for other in [*compared, "base"]:
        if other in s and s[other]["retrieval R@1"] is not None:
            d = dmu["retrieval R@1"] - s[other]["retrieval R@1"]
            word = "beats" if d > 0 else "does not beat"
            lines.append(
                f"- Retrieval (mean R@1 over all retrieval columns): DMU CLIP-MoE {dmu['retrieval R@1']:.1f} "
                f"{word} {other} {s[other]['retrieval R@1']:.1f} ({d:+.1f})."
            )
    base = s.get("base", {})
    if dmu.get("zero-shot top-1") is not None and base.get("zero-shot top-1") is not None:
        d = dmu["zero-shot top-1"] - base["zero-shot top-1"]
        lines.append(
            f"- Zero-shot classification (mean top-1 over attributes): DMU {dmu['zero-shot top-1']:.1f} vs base "
            f"{base['zero-shot top-1']:.1f} ({d:+.1f}); the paper's claim is that DMU stays near the base."
        )
    for other in compared:
        if other in s and s[other].get("zero-shot top-1") is not None and dmu.get("zero-shot top-1") is not None:
            d = dmu["zero-shot top-1"] - s[other]["zero-shot top-1"]
            lines.append(f"- Zero-shot vs {other}: {d:+.1f} points.")
    if dmu.get("MMVP") is not None and base.get("MMVP") is not None:
        lines.append(f"- MMVP-style pairs: DMU {dmu['MMVP']:.1f} vs base {base['MMVP']:.1f}.")
    return lines


def _trainable_by_row(cfg: PipelineConfig, rows) -> dict[str, int]:
    try:
        phases = phase_parameters(cfg)
    except (OSError, ValueError):
        return {}
    return {row.name: row.trainable(phases, cfg) for row in rows}


def _timings(pipe) -> list[str]:
    path = pipe.timings_path
    if not os.path.exists(path):
        return []
    timings = json.load(open(path))
    lines = ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return [*lines, f"| total | {sum(timings.values()):.1f} |", ""]


def mcl_wall_times(pipe) -> dict | None:
    """The MCL stages' training-loop seconds (their train_stats.json), sequential by construction; None before
    they ran. ``chain_s`` adds the embedding and clustering each stage waits for, where timings.json has them."""
    stages = []
    for s in range(1, pipe.cfg.moe.experts):
        path = pipe.out("mcl", s, "stats")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            stages.append(round(json.load(f)["seconds"], 2))
    out = {"stages": stages, "sum_s": round(sum(stages), 2)}
    if os.path.exists(pipe.timings_path):
        with open(pipe.timings_path) as f:
            timings = json.load(f)
        chain = [f"{t} {s}" for s in range(pipe.cfg.stages) for t in ("embed", "cluster")]
        chain += [f"mcl {s}" for s in range(1, pipe.cfg.moe.experts)]
        if all(t in timings for t in chain):
            out["chain_s"] = round(sum(timings[t] for t in chain), 2)
    return out


def _extraction(pipe, rows) -> list[str]:
    """Expert extraction wall time: the MCL stages (sequential: each needs the previous stage's clusters) beside
    each row that extracts its experts as independent tasks (sum over them, and the slowest one = the wall time
    of running them at once)."""
    parallel = [row for row in rows if row.extraction]
    if not parallel:
        return []
    lines = [
        "## Expert extraction wall time",
        "",
        "Training-loop seconds. MCL stages run one after another (stage s trains on the clusters of stage s-1's "
        "model); partition experts are independent tasks, run one after another here: their sum is this run's "
        "cost, the slowest one the wall time of running them at once.",
        "",
        "| experts of | per expert (s) | sum (s) | slowest (s) |",
        "|---|---|---|---|",
    ]
    mcl = mcl_wall_times(pipe)
    if mcl:
        chain = f" (with embedding and clustering: {mcl['chain_s']:.1f})" if "chain_s" in mcl else ""
        per = ", ".join(f"{v:.1f}" for v in mcl["stages"])
        lines.append(f"| MCL stages (sequential) | {per} | {mcl['sum_s']:.1f}{chain} | - |")
    for row in parallel:
        e = row.extraction
        per = ", ".join(f"{r['train_s']:.1f}" for r in e["parts"])
        lines.append(f"| {row.name} | {per} | {e['sum_s']:.1f} | {e['max_s']:.1f} |")
    return [*lines, ""]


def _plots(pipe, rows, results: dict[str, dict], folder: str) -> list[tuple[str, str]]:
    made = []
    fig = training_curves_figure(pipe, rows)
    fig.savefig(os.path.join(folder, "training_curves.png"), **_PLOT_STYLE)
    made.append(
        ("training curves (MCL stages on single-cluster batches, the rest on random batches)", "training_curves.png")
    )
    # Routing of the MoE rows: one figure per tower.
    slugs = {row.name: row.slug for row in rows}
    for name, r in results.items():
        routing = r.get("metrics", {}).get("routing")
        if routing:
            names = expert_names(routing["num_experts"]) if name == "DMU CLIP-MoE" else None
            for path in plot_routing(routing, os.path.join(folder, f"routing_{slugs[name]}.png"), names, name):
                tower = path.rsplit("_", 1)[1].removesuffix(".png")
                made.append((f"routing of the {tower} tower, {name}", os.path.basename(path)))
    # Cluster sizes of each stage.
    for s in range(pipe.cfg.moe.experts - 1):
        png = os.path.join(pipe.out("cluster", s, "folder"), "cluster_sizes.png")
        if os.path.exists(png):
            dst = f"cluster_sizes_stage{s}.png"
            shutil.copyfile(png, os.path.join(folder, dst))
            made.append((f"cluster sizes after stage {s}", dst))
    return made


def expert_names(num_experts: int) -> list[str]:
    """DMU's experts: expert 0 is the base model's FFN, expert e the FFN trained by MCL stage e."""
    return ["base FFN", *(f"MCL stage {e}" for e in range(1, num_experts))]


def training_curves_figure(pipe, rows):
    """Contrastive loss per step, in two panels: the MCL stages (each batch from one cluster: harder negatives,
    so higher losses) and every phase on random batches (routing, baselines). Losses on different batch kinds
    are not comparable, so they never share axes. Noisy curves get a moving average over the raw values."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state; matplotlib is slow to import

    mcl = [(f"MCL stage {s}", pipe.out("mcl", s, "train")) for s in range(1, pipe.cfg.moe.experts)]
    mcl_folders = {folder for _, folder in mcl}
    random = [c for row in rows for c in row.curves if c[1] not in mcl_folders]
    fig = Figure(figsize=(14, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, curves, kind in (
        (axes[0], mcl, "MCL stages: every batch from one cluster"),
        (axes[1], random, "Random batches over the whole training set"),
    ):
        for label, sub in curves:
            path = os.path.join(sub, "metrics.jsonl")
            if os.path.exists(path):
                recs = [json.loads(line) for line in open(path)]
                _curve(ax, [r["step"] for r in recs], [r["clip"] for r in recs], label)
        ax.set_title(kind, fontsize=11)
        ax.set_xlabel("optimizer step of the phase")
        ax.set_ylabel("contrastive loss")
        if ax.lines:
            ax.legend(fontsize=8, title="phase", title_fontsize=8)
        else:
            ax.text(0.5, 0.5, "no curves in this run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(
        "Training curves (losses on single-cluster and random batches are not comparable: separate panels)",
        fontsize=12,
    )
    return fig


def _curve(ax, steps: list[int], losses: list[float], label: str) -> None:
    window = max(1, len(losses) // 20)
    if window < 3:  # few logged steps: every one shown, with a marker (a single point draws no line)
        ax.plot(steps, losses, label=label, marker="o", markersize=3)
        return
    smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    (line,) = ax.plot(steps, smooth, label=f"{label} (mean of {window} steps)")
    ax.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
