"""Supervised linear probes on frozen features: how much of an attribute a model's features hold.

Zero-shot accuracy says what the image and text towers agree on; a linear probe on the same image features
says what the image features contain at all (``eval.attributes.attribute_state`` names what the two say
together: known, suppressed, unaligned or absent). Multinomial logistic regression
on standardised features, full-batch L-BFGS, a little weight decay; numbers are percentages.
"""

from __future__ import annotations

import torch
from torch import nn


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-3, steps: int = 200
) -> nn.Module:
    """A linear classifier (with the standardisation folded in front) fitted to ``features`` -> ``labels``."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    # allocated without its random init (it starts at zero): fitting a probe leaves the global RNG as it was,
    # so a curve measured during training cannot change the training run
    head = nn.utils.skip_init(nn.Linear, x.shape[1], num_classes, dtype=torch.float64)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    y = labels.long()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return nn.Sequential(_Standardise(mean, std), head).eval()


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / self.std


@torch.no_grad()
def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
) -> float:
    """Top-1 accuracy (%) on the test features of a probe fitted on the training features."""
    probe = fit_linear_probe(train_features, train_labels, num_classes)
    pred = probe(test_features).argmax(dim=1)
    return 100.0 * (pred == test_labels.long()).double().mean().item()
