"""Benchmark one MoE feed-forward layer (4 experts, top-2) against one dense CLIP FFN and a per-expert loop.

Three variants run on the same input, interleaved round by round so that load from other processes hits
all of them alike:

- ``dense``: one HF ``CLIPMLP`` (fc1 -> quick_gelu -> fc2), the FFN the MoE layer replaces;
- ``moe[<dispatch>]``: ``clipmoe.MoEFeedForward`` built from four such FFNs, computing its experts with
  ``dispatch`` (``eager``: the plain layer of moe.py, what saved models run as remote code; ``loop`` and
  ``grouped_mm``: the kernels of moe_kernels.py; ``auto``: what the layer picks by default);
- ``loop``: the official CLIP-MoE / HF Mixtral eager dispatch (``one_hot`` mask, ``torch.where`` per
  expert, ``index_add_`` combine) over an ``nn.ModuleList`` of ``CLIPMLP`` experts, written here.

Each round takes one sample per variant, the best of ``--repeat`` back-to-back calls. Reported times are
medians of those samples over rounds; ratios are medians of the per-round ratios (a round's samples are
taken back to back, so the ratio is steadier than either time). The compute floor of top-2
routing is 2x the dense FFN.

    python benchmarks/bench_moe.py --quick              # < 1 min smoke run
    python benchmarks/bench_moe.py --rounds 9 --json out.json
    python benchmarks/bench_moe.py --dispatch eager auto grouped_mm

CUDA mode (one command on a GPU machine; bf16 weights, ViT-L/14 widths, 1 to 128 images of 257 tokens,
grouped_mm, auto and the loop kernel against the eager loop, the official loop and one dense FFN; about 40 s
on an H100):

    python benchmarks/bench_moe.py --cuda --json moe_cuda.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPMLP

import clipmoe
from clipmoe.model.moe import MoEFeedForward

WIDTHS = {"B/16": (768, 3072), "L/14": (1024, 4096)}  # CLIP ViT (hidden, intermediate)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# ---------------------------------------------------------------- timing shared by the benchmarks


def interleaved_times(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    repeat: int = 1,
    clock: str = "wall",
    warmup: int = 1,
    bar=None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant: one sample per round, the best of ``repeat`` back-to-back calls
    (a burst of load from another process then spoils one call, not the sample), the variants run in an
    order that rotates every round.

    ``clock="cpu"`` counts the process's CPU time instead of wall time: with one thread it ignores the time
    the process spent descheduled, which makes CPU comparisons repeatable on a shared machine.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now = CLOCKS[clock]
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)  # rotate so that no variant always runs right after the same neighbour
        for name in names[shift:] + names[:shift]:
            best = float("inf")
            for _ in range(repeat):
                start = now()
                variants[name]()
                sync()
                best = min(best, now() - start)
            times[name].append(best)
        if bar is not None:
            bar.update(1)
    return times


def median_ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of ``time(name) / time(ref)`` within the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))


def environment() -> dict[str, str]:
    """Where the numbers come from, including how busy the machine was (other processes share it)."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    env = {
        "cpu": f"{cpu} ({os.cpu_count()} logical cores)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "clipmoe": clipmoe.__version__,
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        env["gpu"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    if hasattr(os, "getloadavg"):
        env["load average (1, 5, 15 min)"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return env


# ---------------------------------------------------------------- the three variants


class LoopReference(nn.Module):
    """The official CLIP-MoE (HF Mixtral eager) dispatch: one expert module each, ``where`` + ``index_add_``."""

    def __init__(self, experts: list[nn.Module], router: nn.Linear, top_k: int) -> None:
        super().__init__()
        self.experts, self.router, self.top_k = nn.ModuleList(experts), router, top_k

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        routing = F.softmax(self.router(x.float()), dim=-1)
        routing_weights, selected = torch.topk(routing, self.top_k, dim=-1)
        routing_weights = (routing_weights / routing_weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(expert_mask[e])
            if token.shape[0] == 0:
                continue
            out.index_add_(0, token, expert(x[token]) * routing_weights[token, slot, None])
        return out.view_as(hidden_states)


def build_layers(
    dim: int,
    hidden: int,
    num_experts: int,
    top_k: int,
    dispatches: list[str],
    device: torch.device,
    dtype,
    baseline: type[nn.Module] | None = None,
) -> dict[str, nn.Module]:
    """Dense FFN, the MoE layer per dispatch mode (and ``baseline``'s, another version's MoEFeedForward
    class, with the loop dispatch) and the loop reference, all sharing expert weights."""
    config = CLIPVisionConfig(
        hidden_size=dim, intermediate_size=hidden, num_attention_heads=dim // 64, hidden_act="quick_gelu"
    )
    experts = [CLIPMLP(config) for _ in range(num_experts)]
    router = nn.Linear(dim, num_experts, bias=False)
    # Random router of unit-scale logits for unit-scale inputs: load spreads over all experts.
    nn.init.normal_(router.weight, std=dim**-0.5)
    layers: dict[str, nn.Module] = {"dense": experts[0]}
    # clipmoe's layer takes the activation by its config name (closed forms key on it); versions before the
    # kernel registry (EXPERT_KERNELS) took the module
    versions = [(f"moe[{d}]", MoEFeedForward, d, "quick_gelu") for d in dispatches]
    if baseline is not None:
        by_name = hasattr(sys.modules[baseline.__module__], "EXPERT_KERNELS")
        versions.append(("moe[baseline]", baseline, "loop", "quick_gelu" if by_name else experts[0].activation_fn))
    for name, cls, dispatch, activation in versions:
        moe = cls.from_ffns(
            [(m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias) for m in experts],
            activation,
            top_k=top_k,
            dispatch=dispatch,
        )
        moe.router.load_state_dict(router.state_dict())
        layers[name] = moe
    layers["loop"] = LoopReference(experts, router, top_k)
    for layer in layers.values():
        layer.to(device=device, dtype=dtype)
        if hasattr(layer, "router"):
            layer.router.float()  # routers stay fp32, as in clipmoe
    return layers


def forward_fn(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return layer(x)

    return run


def forward_backward_fn(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(x)

    def run() -> None:
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(grad)

    return run


def profile_ops(variants: dict[str, Callable[[], object]], calls: int) -> dict[str, dict[str, float]]:
    """Self CPU ms per call of every op, largest first, for each variant (torch.profiler)."""
    out = {}
    for name, fn in variants.items():
        fn()  # warm
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
        ops = {e.key: e.self_cpu_time_total / 1e3 / calls for e in prof.key_averages()}
        out[name] = dict(sorted(((k, v) for k, v in ops.items() if v > 0), key=lambda kv: -kv[1]))
    return out


def check_agreement(layers: dict[str, nn.Module], x: torch.Tensor) -> None:
    """Every MoE variant must compute what the loop reference computes before its speed means anything."""
    with torch.no_grad():
        ref = layers["loop"](x).float()
        for name, layer in layers.items():
            if name.startswith("moe"):
                tol = 5e-2 if x.dtype == torch.bfloat16 else 1e-3
                torch.testing.assert_close(layer(x).float(), ref, atol=tol, rtol=tol, msg=name)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: B/16 at 197 and 1536 tokens, 3 rounds")
    p.add_argument(
        "--cuda",
        action="store_true",
        help="GPU run: --device cuda --dtype bf16 --widths L/14 --tokens 257 2056 8224 32896 "
        "--dispatch eager loop grouped_mm auto --rounds 15 --repeat 5 (flags given after it are overridden)",
    )
    p.add_argument("--widths", nargs="+", choices=list(WIDTHS), default=list(WIDTHS))
    p.add_argument("--tokens", nargs="+", type=int, default=[197, 1576, 6304], help="rows per call")
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--dispatch", nargs="+", choices=["eager", "loop", "grouped_mm", "auto"], default=["eager", "auto"])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--repeat", type=int, default=3, help="calls per variant per round; the best one is the sample")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="cpu: process CPU time (see interleaved_times)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every sample and summary to this file")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="CALLS",
        help="after timing, profile CALLS calls of each variant (torch.profiler) and print its top ops",
    )
    p.add_argument(
        "--baseline",
        help="another version's layer, a git revision (e.g. 8efada4) or an old single-file moe.py, timed as "
        "moe[baseline] (its loop path) in the same rounds: before/after ratios of a change",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.tokens, args.rounds, args.repeat = ["B/16"], [197, 1576], 3, 2
    if args.cuda:
        args.device, args.dtype, args.widths, args.tokens = "cuda", "bf16", ["L/14"], [257, 2056, 8224, 32896]
        args.dispatch, args.rounds, args.repeat = ["eager", "loop", "grouped_mm", "auto"], 15, 5
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda / --cuda: torch sees no GPU")
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times CPU work only; use the wall clock on a GPU")
    if "grouped_mm" in args.dispatch and not hasattr(torch, "_grouped_mm"):
        p.error(f"torch {torch.__version__} has no torch._grouped_mm")
    return args


def load_baseline(source: str) -> type[nn.Module]:
    """Another version's ``MoEFeedForward``: a git revision (its ``moe.py`` and, from the plain-layer split on,
    its kernels module, imported as a throwaway package; both the flat and the layered layouts are read) or one
    old ``moe.py`` file."""
    folder = tempfile.mkdtemp(prefix="baseline-moe-")
    package = os.path.join(folder, "baseline_clipmoe")
    os.makedirs(package)
    if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(package, "moe.py"))
    else:
        # (file in the package, where it lives in the layered layout, where it lived in the flat one)
        for name, layered, flat in (
            ("moe.py", "model/moe.py", "moe.py"),
            ("moe_kernels.py", "model/kernels.py", "moe_kernels.py"),
        ):
            for path in (layered, flat):
                show = subprocess.run(["git", "show", f"{source}:src/clipmoe/{path}"], capture_output=True, text=True)
                if show.returncode == 0:
                    with open(os.path.join(package, name), "w") as f:
                        # the layered kernels import the layer as a sibling, like the flat ones
                        f.write(show.stdout)
                    break
            else:
                if name == "moe.py":
                    raise SystemExit(f"--baseline {source}: neither a file nor a git revision with clipmoe's moe.py")
    kernels = os.path.exists(os.path.join(package, "moe_kernels.py"))
    with open(os.path.join(package, "__init__.py"), "w") as f:
        f.write("from . import moe, moe_kernels\n" if kernels else "from . import moe\n")
    sys.path.insert(0, folder)
    return importlib.import_module("baseline_clipmoe").moe.MoEFeedForward


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline) if args.baseline else None
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    configs = [(w, n, pas) for w in args.widths for n in args.tokens for pas in args.passes]
    results, profiles = [], []
    bar = tqdm(total=len(configs) * args.rounds, desc="rounds", unit="round")
    for width, tokens, pas in configs:
        torch.manual_seed(args.seed)
        dim, hidden = WIDTHS[width]
        layers = build_layers(dim, hidden, args.experts, args.top_k, args.dispatch, device, dtype, baseline)
        x = torch.randn(tokens, dim, device=device, dtype=dtype)
        check_agreement(layers, x)
        make = forward_fn if pas == "fwd" else forward_backward_fn
        variants = {n: make(layer, x) for n, layer in layers.items()}
        warmup = 3 if device.type == "cuda" else 1  # cuBLAS / grouped_mm pick their kernels on first calls
        times = interleaved_times(variants, args.rounds, device, args.repeat, args.clock, warmup, bar=bar)
        row = {"width": width, "tokens": tokens, "pass": pas, "ms": {}, "ratios": {}}
        for name, samples in times.items():
            row["ms"][name] = 1e3 * statistics.median(samples)
        for name in times:
            if name.startswith("moe"):
                row["ratios"][f"{name}/dense"] = median_ratio(times, name, "dense")
                row["ratios"][f"{name}/loop"] = median_ratio(times, name, "loop")
        row["ratios"]["loop/dense"] = median_ratio(times, "loop", "dense")
        for name in times:  # each kernel against the plain layer
            if name.startswith("moe[") and name not in ("moe[eager]", "moe[baseline]") and "moe[eager]" in times:
                row["ratios"][f"{name}/moe[eager]"] = median_ratio(times, name, "moe[eager]")
        if baseline is not None:
            for name in args.dispatch:
                row["ratios"][f"moe[{name}]/baseline"] = median_ratio(times, f"moe[{name}]", "moe[baseline]")
        row["samples_s"] = times
        results.append(row)
        if args.profile:
            profiles.append((f"{width}, {tokens} tokens, {pas}", profile_ops(variants, args.profile)))
    bar.close()

    env = environment()
    print(f"\n{env}, device={args.device}, dtype={args.dtype}, experts={args.experts}, top_k={args.top_k}")
    print(f"rounds={args.rounds}, repeat={args.repeat}, clock={args.clock}")
    print("ms = median over rounds of the best of repeat calls; ratios = median of the per-round ratios\n")
    names = list(results[0]["ms"])
    ratio_names = list(results[0]["ratios"])
    print("| width | tokens | pass | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(ratio_names) + " |")
    print("|---" * (3 + len(names) + len(ratio_names)) + "|")
    for r in results:
        cells = [f"{r['ms'][n]:.1f}" for n in names] + [f"{r['ratios'][n]:.2f}x" for n in ratio_names]
        print(f"| {r['width']} | {r['tokens']} | {r['pass']} | " + " | ".join(cells) + " |")
    for title, per_variant in profiles:
        print(f"\nprofile, {title}: ms per call (self CPU time), top ops")
        for name, ops in per_variant.items():
            total = sum(ops.values())
            top = ", ".join(f"{op.removeprefix('aten::')} {ms:.1f}" for op, ms in list(ops.items())[:8])
            print(f"  {name:14s} {total:7.1f}: {top}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
