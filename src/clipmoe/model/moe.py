"""Sparse Mixture-of-Experts feed-forward layer for CLIP towers, and its two auxiliary losses.

This is the plain, readable layer. It is also the file saved next to every model (the remote code behind
``AutoModel.from_pretrained(folder, trust_remote_code=True)``), so it imports only torch and transformers.
Faster versions of the expert computation (a CPU path with a hand-written backward, ``torch._grouped_mm``
for CUDA) live in clipmoe's ``model/kernels.py``; they register in ``EXPERT_KERNELS`` and are tested equal
to ``eager_experts`` below, forward and backward. Measurements: docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class MoEFeedForward(nn.Module):
    """Top-k routed experts that replace one transformer FFN (``fc1 -> act -> fc2``).

    Routing follows the CLIP-MoE paper (Eq. 3) and Mixtral: a bias-free linear router, softmax over all
    experts in fp32, top-k, and the k weights renormalised to sum to one. Two options change that:

    - ``capacity_factor`` > 0 (Switch / GShard token dropping): each expert takes at most
      ``ceil(capacity_factor * tokens * top_k / routed experts)`` (token, slot) pairs per call, first slots of
      all tokens first, then second slots, each in token order; a pair past its expert's capacity gets weight
      zero (its output for that slot is zero and the block's residual carries the token). It applies while
      training, and at inference too only with ``capacity_at_inference``. ``last_dropped`` holds the fraction
      of routed pairs dropped by the last call.
    - ``always_on_base`` (a fusion gate that keeps expert 0, the base FFN): the top-k is chosen among experts
      1..E-1 and their softmax probabilities (over all E logits, not renormalised) weigh them; the base FFN
      takes the rest, ``1 - sum`` of the chosen ones, so the output is ``base(x) + sum_e p_e (E_e(x) - base(x))``.

    Experts are stored stacked
    (``w1: [E, hidden, dim]``, ``w2: [E, dim, hidden]`` plus biases): DDP then sees every expert as used
    even when one gets no tokens on a rank (a zero gradient, never None), and a grouped matmul needs it.
    ``dispatch`` names the expert computation in ``EXPERT_KERNELS``; it is a run-time choice, not config.

    ``uniform=True`` is the uniform-mixture control: no routing, every token goes through every expert and
    their outputs are averaged with equal weights (``top_k`` must then be ``num_experts``). The router is
    kept, unused, so that the layer's parameters are the same in both modes.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int = 2,
        activation: str | nn.Module = "quick_gelu",
        expert_dropout: float = 0.0,
        dispatch: str = "auto",
        uniform: bool = False,
        capacity_factor: float = 0.0,
        capacity_at_inference: bool = False,
        always_on_base: bool = False,
    ) -> None:
        super().__init__()
        routed = num_experts - int(always_on_base)
        if not 1 <= top_k <= (num_experts if uniform else routed):
            raise ValueError(
                f"top_k must be in [1, {routed}] ({num_experts} experts"
                + (", expert 0 always on" if always_on_base else "")
                + f"), got {top_k}"
            )
        if uniform and (top_k != num_experts or always_on_base):
            raise ValueError(
                f"a uniform mixture sends every token to all {num_experts} experts: top_k must be {num_experts} "
                f"and there is no always-on base, got top_k={top_k}, always_on_base={always_on_base}"
            )
        if dispatch != "auto" and dispatch not in EXPERT_KERNELS:
            raise ValueError(f"dispatch must be 'auto' or one of {sorted(EXPERT_KERNELS)}, got {dispatch!r}")
        if capacity_factor < 0:
            raise ValueError(f"capacity_factor must be >= 0 (0 = no capacity limit), got {capacity_factor}")
        self.num_experts, self.top_k, self.dispatch, self.uniform = num_experts, top_k, dispatch, uniform
        self.capacity_factor, self.capacity_at_inference = float(capacity_factor), capacity_at_inference
        self.always_on_base = always_on_base
        self.last_dropped: torch.Tensor | None = None
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        # An activation given by its config name (CLIP's ``hidden_act``) is built as HF's CLIPMLP builds it;
        # the kernels look the name up for a closed form. Any other elementwise module works as it is.
        self.hidden_act = activation if isinstance(activation, str) else None
        self.act = ACT2FN[activation] if isinstance(activation, str) else activation
        self.expert_dropout = nn.Dropout(expert_dropout)
        self.last_router_logits: torch.Tensor | None = None
        for w in (self.w1, self.w2):
            for e in range(num_experts):
                nn.init.kaiming_uniform_(w.data[e], a=5**0.5)  # nn.Linear's default init

    @classmethod
    def from_ffns(
        cls,
        ffns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        activation: str | nn.Module = "quick_gelu",
        top_k: int = 2,
        expert_dropout: float = 0.0,
        dispatch: str = "auto",
        **options,
    ) -> MoEFeedForward:
        """Build from a list of ``(fc1.weight, fc1.bias, fc2.weight, fc2.bias)``, one per expert; ``options``:
        ``uniform``, ``capacity_factor``, ``capacity_at_inference``, ``always_on_base``."""
        hidden, dim = ffns[0][0].shape
        layer = cls(dim, hidden, len(ffns), top_k, activation, expert_dropout, dispatch, **options)
        layer.to(device=ffns[0][0].device, dtype=ffns[0][0].dtype)
        with torch.no_grad():
            for e, ffn in enumerate(ffns):
                for param, value in zip((layer.w1, layer.b1, layer.w2, layer.b2), ffn):
                    param[e].copy_(value)
        layer.router.float()  # routers stay fp32 whatever the experts' dtype
        return layer

    def __getstate__(self) -> dict:
        # deepcopy / pickle: the last call's logits are part of a graph (which deepcopy refuses), not state
        return {**self.__dict__, "last_router_logits": None, "last_dropped": None}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E] (fp32 or wider), the combine weights [N, s] and expert ids [N, s].

        Plainly s = k: the renormalised top-k. With ``always_on_base`` s = k + 1, slot 0 being expert 0 (the
        base FFN) with weight ``1 - sum`` of the k others; the logits then have expert 0's column at -inf,
        so that the balance and z losses and the routing analysis see the routed experts only. Pairs dropped
        by the capacity have weight zero."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32 (fp64 stays fp64, for gradcheck)
        if self.uniform:  # every expert, weight 1/E; zero logits are the router probabilities this stands for
            n, e = x.shape[0], self.num_experts
            experts = torch.arange(e, device=x.device).expand(n, e)
            return x.new_zeros(n, e, dtype=dtype), x.new_full((n, e), 1 / e, dtype=dtype), experts
        with torch.autocast(device_type=x.device.type, enabled=False):  # autocast would route in bf16
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        probs = logits.softmax(dim=-1)
        if self.always_on_base:
            weights, experts = probs[:, 1:].topk(self.top_k, dim=-1)
            experts = experts + 1
            logits = logits.masked_fill(torch.arange(self.num_experts, device=x.device) == 0, float("-inf"))
        else:
            weights, experts = probs.topk(self.top_k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        factor = self.capacity_factor if (self.training or self.capacity_at_inference) else 0.0
        if factor > 0:
            keep = capacity_mask(
                experts - int(self.always_on_base), self.num_experts - int(self.always_on_base), factor
            )
            self.last_dropped = 1.0 - keep.float().mean().detach()
            weights = weights * keep
        else:
            self.last_dropped = None
        if self.always_on_base:
            base = (1.0 - weights.sum(dim=-1, keepdim=True), torch.zeros_like(experts[:, :1]))
            weights, experts = torch.cat([base[0], weights], dim=-1), torch.cat([base[1], experts], dim=-1)
        return logits, weights, experts

    @property
    def active_experts(self) -> int:
        """Experts each token runs through: top_k, plus the base with ``always_on_base``."""
        return self.top_k + int(self.always_on_base)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits, weights, experts = self.route(x)
        # Kept for the training loop's auxiliary losses. Overwritten, never appended: gradient checkpointing
        # runs this forward again during backward and must not count a layer twice.
        self.last_router_logits = logits
        kernel = EXPERT_KERNELS.get(self.dispatch, eager_experts)  # "auto" without kernels: eager
        return kernel(self, x, weights, experts).view(hidden_states.shape)

    def extra_repr(self) -> str:
        e, hidden, dim = self.w1.shape
        extra = ", uniform=True" if self.uniform else ""
        extra += f", capacity_factor={self.capacity_factor}" if self.capacity_factor else ""
        extra += ", always_on_base=True" if self.always_on_base else ""
        return f"dim={dim}, hidden={hidden}, num_experts={e}, top_k={self.top_k}, dispatch={self.dispatch}{extra}"


def capacity_mask(experts: torch.Tensor, num_experts: int, factor: float) -> torch.Tensor:
    """Which (token, slot) pairs of ``experts`` ([N, k] ids in [0, num_experts)) fit their expert's capacity
    ``ceil(factor * N * k / num_experts)``: slot-major priority (every token's first choice before any second
    choice), token order within a slot, as GShard and Switch do. Returns a bool [N, k]."""
    n, k = experts.shape
    capacity = math.ceil(factor * n * k / num_experts)
    flat = experts.t().reshape(-1)  # slot-major
    onehot = F.one_hot(flat, num_experts)
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # place of each pair in its expert's queue
    return (position < capacity).view(k, n).t()


def compute_dtype(layer: MoEFeedForward, x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute in: autocast's if it is on, else the expert weights'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return layer.w1.dtype


def eager_experts(layer: MoEFeedForward, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The reference expert computation: each token's routing-weighted sum of its k experts' FFN outputs.

    ``x`` is ``[N, dim]``, ``weights`` and ``experts`` are ``[N, s]`` (``route``'s slots). Loop over experts: gather the tokens
    routed to it, run its FFN, scale by the routing weight and add the result back into those rows.
    """
    x = x.to(compute_dtype(layer, x))
    out = torch.zeros(x.shape[0], layer.w2.shape[1], dtype=x.dtype, device=x.device)
    slots = weights.shape[1]  # top_k, or top_k + 1 with the always-on base
    # Sort the N*k (token, slot) pairs by expert so that each expert's tokens are one contiguous slice;
    # the counts are read to the host once per layer (every expert's slice size) rather than once per expert.
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=layer.num_experts).tolist()
    tokens = (order // slots).split(counts)
    pair_weights = weights.reshape(-1)[order].split(counts)
    # unbind once: indexing w1[e] inside the loop would make backward build a full-size zero gradient per expert
    w1, b1, w2, b2 = (p.unbind(0) for p in (layer.w1, layer.b1, layer.w2, layer.b2))
    for e in range(layer.num_experts):
        if counts[e] == 0:
            continue  # an expert without tokens still gets a zero gradient, through unbind
        h = layer.act(F.linear(x.index_select(0, tokens[e]), w1[e], b1[e]))
        y = F.linear(layer.expert_dropout(h), w2[e], b2[e])
        out.index_add_(0, tokens[e], y * pair_weights[e].to(y.dtype).unsqueeze(-1))
    return out


# name -> fn(layer, x, weights, experts) -> [N, dim]. clipmoe's model/kernels.py adds "loop", "grouped_mm"
# and "auto"; a copy of this file saved next to a model (remote code) runs eager_experts only.
EXPERT_KERNELS: dict[str, Callable[..., torch.Tensor]] = {"eager": eager_experts}


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
