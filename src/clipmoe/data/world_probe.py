"""Are a world's attributes learnable from its pixels? Supervised probes on ``train/`` scored on ``val/``.

Two readers per attribute: a linear one (softmax regression on raw pixels), which shows how *easy* an
attribute is (a colour is a linear read-out; a shape anywhere in the image is not), and a small CNN trained
on all attributes at once, which shows each attribute *can* be read at the world's resolution. An attribute
a CLIP fails to encode while the CNN reads it was suppressed, not invisible.

    python -m clipmoe.data.world_probe WORLD_DIR [--epochs 10]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from .world import read_manifest

BATCH_SIZE = 128
LEARNING_RATE = 3e-3  # peak of a one-cycle schedule: converges in ~10 epochs


def load_split(world_dir: str | os.PathLike, split: str, attributes: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, H, W, 3]`` uint8 and value indices ``[N, attributes]`` of an img2dataset split."""
    records = sorted(glob.glob(os.path.join(os.fspath(world_dir), split, "*", "*.json")))
    if not records:
        raise FileNotFoundError(f"{world_dir} has no {split}/ samples")
    images, labels = [], []
    for path in records:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)["attributes"]
        with Image.open(path[: -len(".json")] + ".png") as image:
            images.append(np.asarray(image.convert("RGB")))
        labels.append([a["values"].index(values[a["name"]]) for a in attributes])
    return np.stack(images), np.asarray(labels, dtype=np.int64)


class _Heads(nn.Module):
    """A feature extractor and one linear head per attribute, trained jointly (the heads share nothing but
    the features, so with an identity body this is one multinomial logistic regression per attribute)."""

    def __init__(self, body: nn.Module, classes: list[int]) -> None:
        super().__init__()
        self.body = body
        self.heads = nn.ModuleList(nn.LazyLinear(n) for n in classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.body(x)
        return [head(h) for head in self.heads]


def _small_cnn() -> nn.Module:
    """Three conv blocks at full, 1/2 and 1/4 resolution (batch norm, so a few epochs suffice); the first
    block sees single pixels, so 2 px stripes and 4 px dots are within its reach."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.Flatten(), nn.LazyLinear(128), nn.ReLU())


def fit_heads(
    body: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    classes: list[int],
    epochs: int,
    desc: str,
) -> list[float]:
    """Per-attribute validation accuracy of ``body`` + linear heads trained on ``train`` with Adam."""
    torch.manual_seed(0)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0)

    xs, ys, xv = tensor(train[0]), torch.from_numpy(train[1]), tensor(val[0])
    mean = xs.mean(dim=0, keepdim=True)  # centring makes the raw-pixel linear probe converge in a few epochs
    xs, xv = xs - mean, xv - mean
    model = _Heads(body, classes)
    model(xs[:1])  # materialise the lazy heads before the optimiser sees the parameters
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    steps = epochs * -(-len(xs) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LEARNING_RATE, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    for _ in tqdm(range(epochs), desc=desc, unit="epoch"):
        model.train()
        for batch in torch.randperm(len(xs), generator=generator).split(BATCH_SIZE):
            logits = model(xs[batch])
            loss = sum(nn.functional.cross_entropy(lg, ys[batch, i]) for i, lg in enumerate(logits))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predictions = [torch.cat(p) for p in zip(*(model(b) for b in xv.split(512)))]
    return [float((p.argmax(1).numpy() == val[1][:, i]).mean()) for i, p in enumerate(predictions)]


def probe_world(world_dir: str | os.PathLike, epochs: int = 10) -> dict[str, dict[str, float]]:
    """``{attribute: {"chance", "linear", "cnn"}}`` accuracies on the world's ``val/`` split."""
    attributes = read_manifest(world_dir)["attributes"]
    classes = [len(a["values"]) for a in attributes]
    train, val = load_split(world_dir, "train", attributes), load_split(world_dir, "val", attributes)
    linear = fit_heads(nn.Flatten(), train, val, classes, epochs, "linear probe")
    cnn = fit_heads(_small_cnn(), train, val, classes, epochs, "cnn probe")
    return {
        a["name"]: {"chance": 1.0 / n, "linear": lin, "cnn": c}
        for a, n, lin, c in zip(attributes, classes, linear, cnn)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world_dir")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = probe_world(args.world_dir, args.epochs)
    print("| attribute | chance | linear (pixels) | small CNN |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['chance']:.1%} | {r['linear']:.1%} | {r['cnn']:.1%} |")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
