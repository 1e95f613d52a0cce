"""Sparse Mixture-of-Experts feed-forward layer for CLIP towers, and its auxiliary losses.

This file imports only torch so that it can be copied verbatim next to an exported model
(``trust_remote_code``) and used without clipmoe installed.

Routing follows the CLIP-MoE paper (Eq. 3) and Mixtral: a bias-free linear router, softmax over all
experts in fp32, top-k, then the k weights renormalised to sum to one. Dispatch is dropless: tokens are
sorted by expert, one host sync reads the per-expert counts, and each expert runs one matmul pair on a
contiguous slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISPATCH_MODES = ("auto", "loop", "grouped_mm")


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MoEFeedForward(nn.Module):
    """Top-k routed experts that replace one transformer FFN (``fc1 -> act -> fc2``).

    Experts are stored stacked (``w1: [E, hidden, dim]``, ``w2: [E, dim, hidden]`` plus biases) because
    (a) DDP then sees every expert as used even when one gets no tokens on a rank, (b) a grouped matmul
    needs that layout, and (c) one ``unbind`` per forward avoids the full-size zero gradient that indexing
    ``w1[e]`` in a loop would build for every expert.

    The forward returns a plain tensor, like the MLP it replaces; the router logits of the last call are
    kept in ``last_router_logits`` (overwritten, never appended, so gradient checkpointing's recompute does
    not duplicate them) for the training loop's auxiliary losses.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int = 2,
        activation: nn.Module | None = None,
        expert_dropout: float = 0.0,
        dispatch: str = "auto",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        self.num_experts, self.top_k, self.dispatch = num_experts, top_k, dispatch
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.act = activation if activation is not None else QuickGELU()
        self.expert_dropout = nn.Dropout(expert_dropout)
        self.last_router_logits: torch.Tensor | None = None
        for w in (self.w1, self.w2):
            for e in range(num_experts):
                nn.init.kaiming_uniform_(w.data[e], a=5**0.5)  # nn.Linear's default init

    @classmethod
    def from_ffns(
        cls,
        ffns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        activation: nn.Module,
        top_k: int = 2,
        expert_dropout: float = 0.0,
        dispatch: str = "auto",
    ) -> MoEFeedForward:
        """Build from a list of ``(fc1.weight, fc1.bias, fc2.weight, fc2.bias)``, one per expert."""
        hidden, dim = ffns[0][0].shape
        layer = cls(dim, hidden, len(ffns), top_k, activation, expert_dropout, dispatch)
        ref = ffns[0][0]
        layer.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for e, (w1, b1, w2, b2) in enumerate(ffns):
                layer.w1[e].copy_(w1)
                layer.b1[e].copy_(b1)
                layer.w2[e].copy_(w2)
                layer.b2[e].copy_(b2)
        layer.router.float()  # routers stay fp32 whatever the experts' dtype
        return layer

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E] (fp32), renormalised top-k weights [N, k] and expert ids [N, k]."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # autocast would cast to bf16
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return logits, weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits, weights, experts = self.route(x)
        self.last_router_logits = logits
        if x.shape[0] == 0:
            return hidden_states.clone()

        # Sort the N*k (token, slot) pairs by expert so each expert sees one contiguous slice.
        flat_experts = experts.reshape(-1)
        order = flat_experts.argsort(stable=True)
        token_of_pair = order // self.top_k
        x_sorted = x[token_of_pair]
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        y_sorted = self._experts(x_sorted, counts)

        # Combine without index_add_ (non-deterministic on CUDA): un-permute, then sum over the k slots.
        y_sorted = y_sorted * weights.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
        return y.view(-1, self.top_k, shape[-1]).sum(dim=1).view(shape)

    def _experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self._use_grouped_mm(x_sorted):
            return self._experts_grouped_mm(x_sorted, counts)
        return self._experts_loop(x_sorted, counts)

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.dispatch == "loop" or not hasattr(torch, "_grouped_mm"):
            return False
        if self.dispatch == "grouped_mm":
            return True
        # auto: the fused kernel only pays off on CUDA in bf16 (on CPU a loop is faster; see BENCHMARKS.md)
        return x.is_cuda and self.w1.dtype == torch.bfloat16

    def _experts_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outputs = []
        chunks = x_sorted.split(counts.tolist())  # the layer's one host sync
        for xe, w1, b1, w2, b2 in zip(
            chunks, self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
        ):
            if xe.shape[0] == 0:
                continue
            h = self.expert_dropout(self.act(F.linear(xe, w1, b1)))
            outputs.append(F.linear(h, w2, b2))
        return torch.cat(outputs, dim=0)

    def _experts_grouped_mm(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # grouped_mm has no autocast and no usable bias: cast to the weight dtype, add biases per row.
        x_sorted = x_sorted.to(self.w1.dtype)
        offsets = counts.cumsum(0).to(torch.int32)
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_experts, device=counts.device), counts, output_size=x_sorted.shape[0]
        )
        h = torch._grouped_mm(x_sorted, self.w1.transpose(-2, -1), offs=offsets) + self.b1[expert_of_row]
        h = self.expert_dropout(self.act(h))
        return torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offsets) + self.b2[expert_of_row]

    def extra_repr(self) -> str:
        e, hidden, dim = self.w1.shape
        return f"dim={dim}, hidden={hidden}, num_experts={e}, top_k={self.top_k}, dispatch={self.dispatch}"


def load_balancing_loss(
    router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral balance loss: ``E * sum_e f_e * P_e``, minimum ``top_k`` when perfectly balanced.

    ``router_logits`` is ``[N, E]`` (concatenate several layers along N to reproduce the official code,
    which flattens all MoE layers of a tower together). ``f_e`` is the fraction of the ``N * top_k``
    routing slots that chose expert e, ``P_e`` the mean router probability. ``token_mask`` (``[N]``,
    true = real token) drops padding from both statistics; without it every position counts, as in the
    official CLIP-MoE code.
    """
    num_experts = router_logits.shape[-1]
    probs = router_logits.float().softmax(dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).float()  # [N, k, E]
    if token_mask is None:
        fraction = chosen.mean(dim=0)  # [k, E]
        mean_prob = probs.mean(dim=0)
    else:
        m = token_mask.reshape(-1).to(probs.dtype)
        denom = m.sum().clamp_min(1.0)
        fraction = (chosen * m[:, None, None]).sum(dim=0) / denom
        mean_prob = (probs * m[:, None]).sum(dim=0) / denom
    return num_experts * (fraction * mean_prob[None]).sum()


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-sum-exp of the logits; keeps router logits small."""
    z = torch.logsumexp(router_logits.float(), dim=-1).square()
    if token_mask is None:
        return z.mean()
    m = token_mask.reshape(-1).to(z.dtype)
    return (z * m).sum() / m.sum().clamp_min(1.0)
