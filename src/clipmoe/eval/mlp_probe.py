"""A supervised probe stronger than the linear one: a one-hidden-layer MLP on frozen features.

A linear probe near chance can mean the attribute is absent from the features, or present but not linearly
readable from the examples at hand. Before calling an attribute *absent*, ask a stronger reader: more labelled
examples and a small MLP (standardised features, one GELU hidden layer, full-batch AdamW, a fixed seed).
An attribute no probe reads above chance is absent; one a probe reads far above what zero-shot gets is
suppressed. Numbers are percentages.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def mlp_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    hidden: int = 256,
    steps: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> float:
    """Top-1 accuracy (%) on the test features of an MLP probe fitted on the training features."""
    x = train_features.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    generator = torch.Generator().manual_seed(seed)
    linear = functools.partial(nn.utils.skip_init, nn.Linear)  # no draw from the global RNG: it is not used
    net = nn.Sequential(linear(x.shape[1], hidden), nn.GELU(), linear(hidden, num_classes))
    with torch.no_grad():  # seeded init, independent of the global random state, which it leaves as it was
        for layer in (net[0], net[2]):
            bound = layer.in_features**-0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    y = train_labels.long()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(net((x - mean) / std), y).backward()
            opt.step()
    with torch.no_grad():
        pred = net((test_features.float() - mean) / std).argmax(dim=1)
    return 100.0 * (pred == test_labels.long()).double().mean().item()
