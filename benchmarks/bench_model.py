"""Benchmark a whole CLIP-MoE against the dense CLIP it was upcycled from: encoding and training steps.

The dense model is a ViT-B/16-shaped HF ``CLIPModel`` (vision 768/3072 x 12 blocks at 224 px, text 512/2048 x
12 blocks at 77 tokens) with random weights; the MoE model is ``clipmoe.sparse_upcycle(dense, 4, top_k=2)`` with
random routers made to spread the load over all experts, as trained, balanced routers do (routing does not
change the FLOPs of a dropless layer, but the measured expert shares are printed to show it).

- encode: images/s and texts/s of ``encode_image`` / ``encode_text`` (no_grad), MoE vs dense;
- train: one step (forward both towers, CLIP contrastive loss, backward, AdamW) for full fine-tuning of
  the dense model (the reference), an MCL step (dense model, ``set_trainable("ffn")``) and a router step
  (MoE model, ``set_trainable("router")``), plus a sparse-upcycling step (MoE model, routers and every
  expert trainable, ``set_trainable("router+experts")``). After every step the benchmark checks that frozen parameters
  got no gradient, i.e. that their weight gradients were never computed.

Every group is interleaved round by round; ratios are medians of per-round ratios (see bench_moe.py).

    python benchmarks/bench_model.py --quick        # < 1 min smoke run (2 blocks per tower)
    python benchmarks/bench_model.py --json model.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

import clipmoe
from bench_moe import CLOCKS, environment, interleaved_times, median_ratio
from clipmoe.model.modeling import ClipMoeModel


def vit_b16_config(layers: int, **text_overrides: object) -> CLIPConfig:
    """OpenAI ViT-B/16 CLIP shapes (vision 768 wide, text 512 wide, 512-d embedding, quick_gelu);
    ``text_overrides`` replace text-config fields (vocabulary and special token ids of another tokenizer)."""
    vision = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=layers,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        projection_dim=512,
        hidden_act="quick_gelu",
    )
    text_fields = {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "projection_dim": 512,
        "hidden_act": "quick_gelu",
    }
    text = CLIPTextConfig(**{**text_fields, **text_overrides})
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=512)


def build_models(layers: int, seed: int) -> tuple[ClipMoeModel, ClipMoeModel]:
    torch.manual_seed(seed)
    dense = ClipMoeModel(vit_b16_config(layers))
    moe = clipmoe.sparse_upcycle(dense, 4, top_k=2)
    spread_routers(moe, torch.randn(2, 3, 224, 224), torch.randint(0, dense.config.text_config.vocab_size, (8, 77)))
    return dense, moe


def spread_routers(model: ClipMoeModel, pixels: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Random routers that spread the load like trained, balanced ones.

    Each router gets unit-scale random rows, minus their component along the mean of that layer's FFN
    inputs: the text tower's hidden states share a large common direction, which would otherwise give
    every token the same top-2 experts. (The experts are identical copies, so the inputs seen in this one
    calibration pass do not depend on the routers being changed.)
    """
    means = {}

    def record(layer: nn.Module, args: tuple) -> None:
        means[layer] = args[0].reshape(-1, args[0].shape[-1]).float().mean(dim=0)

    hooks = [layer.register_forward_pre_hook(record) for layer in model.moe_layers()]
    with torch.no_grad():
        model.encode_image(pixels)
        model.encode_text(input_ids)
        for h in hooks:
            h.remove()
        for layer, mean in means.items():
            weight = layer.router.weight
            nn.init.normal_(weight, std=weight.shape[1] ** -0.5)
            direction = mean / mean.norm()
            weight -= torch.outer(weight @ direction, direction)


def expert_load(model: ClipMoeModel, tower: str) -> tuple[float, float]:
    """Smallest and largest share of routing slots any expert got in the last forward, over all layers."""
    shares = []
    for layer, logits in zip(model.moe_layers(tower), model.router_logits(tower)):
        chosen = logits.topk(layer.top_k, dim=-1).indices.reshape(-1)
        shares.append(torch.bincount(chosen, minlength=layer.num_experts).float() / chosen.numel())
    stacked = torch.stack(shares)
    return stacked.min().item(), stacked.max().item()


def clip_loss(model: ClipMoeModel, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch, as in CLIP pre-training and the MCL / router stages."""
    image = F.normalize(model.encode_image(pixels), dim=-1)
    text = F.normalize(model.encode_text(input_ids), dim=-1)
    logits = model.logit_scale.exp() * image @ text.t()
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def encode_fn(encode, inputs: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            encode(inputs)

    return run


def train_step_fn(model: ClipMoeModel, mode: str, pixels: torch.Tensor, input_ids: torch.Tensor):
    """One optimisation step with only the ``mode`` parameters trainable (see ClipMoeModel.set_trainable)."""
    model.set_trainable(mode)
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def step() -> None:
        model.set_trainable(mode)  # the dense model is shared by two variants
        model.zero_grad(set_to_none=True)  # also clears what the other variant left on shared weights
        clip_loss(model, pixels, input_ids).backward()
        optimizer.step()
        if any(p.grad is not None for p in frozen):
            raise AssertionError(f"{mode} step computed gradients for frozen parameters")

    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 blocks per tower, small batches, 3 rounds")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks per tower")
    p.add_argument("--images", type=int, default=16, help="images per encode call")
    p.add_argument("--texts", type=int, default=64, help="texts (77 tokens) per encode call")
    p.add_argument("--train-batch", type=int, default=8, help="image-text pairs per training step")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1, help="calls per variant per round; the best one is the sample")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall", help="cpu: process CPU time (see bench_moe.py)")
    p.add_argument("--skip", nargs="*", choices=["encode", "train"], default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every sample and summary to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.images, args.texts, args.train_batch, args.rounds = 2, 4, 16, 4, 3
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, moe = build_models(args.layers, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = dense.config.text_config.vocab_size

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 3, 224, 224, generator=gen), torch.randint(0, vocab, (n, 77), generator=gen)

    groups = {}
    if "encode" not in args.skip:
        pixels, _ = batch(args.images)
        _, input_ids = batch(args.texts)
        for m in (dense, moe):
            m.eval()
        groups["encode image"] = (
            {name: encode_fn(m.encode_image, pixels) for name, m in (("dense", dense), ("moe", moe))},
            args.images,
        )
        groups["encode text"] = (
            {name: encode_fn(m.encode_text, input_ids) for name, m in (("dense", dense), ("moe", moe))},
            args.texts,
        )
    if "train" not in args.skip:
        pixels, input_ids = batch(args.train_batch)
        for m in (dense, moe):
            m.train()
        groups["train step"] = (
            {
                "full (dense)": train_step_fn(dense, "all", pixels, input_ids),
                "MCL ffn (dense)": train_step_fn(dense, "ffn", pixels, input_ids),
                "router (moe)": train_step_fn(moe, "router", pixels, input_ids),
                "router+experts (moe)": train_step_fn(moe, "router+experts", pixels, input_ids),
            },
            args.train_batch,
        )

    results = []
    bar = tqdm(total=len(groups) * args.rounds, desc="rounds", unit="round")
    for group, (variants, items) in groups.items():
        times = interleaved_times(variants, args.rounds, torch.device("cpu"), args.repeat, args.clock, bar=bar)
        ref = next(iter(variants))
        for name, samples in times.items():
            ms = 1e3 * statistics.median(samples)
            results.append(
                {
                    "group": group,
                    "variant": name,
                    "ms": ms,
                    "items_per_s": items / ms * 1e3,
                    "throughput_x_ref": median_ratio(times, ref, name),
                    "time_x_ref": median_ratio(times, name, ref),
                }
            )
        if group.startswith("encode"):
            tower = group.split()[1].replace("image", "vision")
            low, high = expert_load(moe, tower)
            results[-1]["expert_share"] = [low, high]
    bar.close()

    env = environment()
    print(f"\n{env}; {args.layers} blocks per tower; rounds={args.rounds}, repeat={args.repeat}, clock={args.clock}")
    print("ms = median over rounds (best of repeat calls); ratios = medians of per-round ratios to the first row\n")
    print("| group | variant | batch | ms | items/s | throughput x ref | time x ref | expert share min-max |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        share = "{:.2f}-{:.2f}".format(*r["expert_share"]) if "expert_share" in r else ""
        items = groups[r["group"]][1]
        print(
            f"| {r['group']} | {r['variant']} | {items} | {r['ms']:.0f} | {r['items_per_s']:.1f} |"
            f" {r['throughput_x_ref']:.2f}x | {r['time_x_ref']:.2f}x | {share} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
