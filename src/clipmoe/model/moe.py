"""Sparse Mixture-of-Experts feed-forward layer for CLIP towers, and its auxiliary losses.

This file imports only torch so that it can be copied verbatim next to an exported model
(``trust_remote_code``) and used without clipmoe installed.

Routing follows the CLIP-MoE paper (Eq. 3) and Mixtral: a bias-free linear router, softmax over all
experts in fp32, top-k, then the k weights renormalised to sum to one. Dispatch is dropless: tokens are
sorted by expert, one host sync reads the per-expert counts, and each expert runs one matmul pair on a
contiguous slice (``_LoopExperts``, with a hand-written backward), or all experts run in one
``torch._grouped_mm`` (CUDA + bf16). Measurements and profiles: docs/performance.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

DISPATCH_MODES = ("auto", "loop", "grouped_mm")


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MoEFeedForward(nn.Module):
    """Top-k routed experts that replace one transformer FFN (``fc1 -> act -> fc2``).

    Experts are stored stacked (``w1: [E, hidden, dim]``, ``w2: [E, dim, hidden]`` plus biases) because
    (a) DDP then sees every expert as used even when one gets no tokens on a rank (it gets a zero
    gradient, never None), (b) a grouped matmul needs that layout, and (c) the loop's backward writes each
    expert's weight gradient straight into its slice of one ``[E, ...]`` gradient.

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
        self._grad_buffers: dict[str, list[tuple[torch.Tensor, int]]] = {}  # see _gradient_buffer
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

    def train(self, mode: bool = True) -> MoEFeedForward:
        if not mode:  # evaluation needs no weight gradients: give their cached CPU memory back
            self._grad_buffers.clear()
        return super().train(mode)

    def __getstate__(self) -> dict:
        # deepcopy / pickle: neither the last call's logits (part of a graph, which deepcopy refuses) nor
        # cached gradient memory is state
        return {**self.__dict__, "last_router_logits": None, "_grad_buffers": {}}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E] (fp32 or wider), renormalised top-k weights [N, k] and expert ids [N, k]."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32 (fp64 stays fp64, for gradcheck)
        with torch.autocast(device_type=x.device.type, enabled=False):  # autocast would cast to bf16
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
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
        order, inverse, counts = _sort_by_expert(experts, self.num_experts)
        if self._use_grouped_mm(x):
            y = self._forward_grouped_mm(x, weights, order, inverse, counts)
        else:
            y = self._forward_loop(x, weights, order, inverse, counts)
        return y.view(*shape[:-1], y.shape[-1])

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.dispatch == "loop" or not _grouped_mm_supported(self.w1):
            return False  # an explicit "grouped_mm" falls back to the loop where the op cannot run
        if self.dispatch == "grouped_mm":
            return True
        # auto: the fused kernel only pays off on CUDA in bf16 (on CPU the loop is faster; docs/performance.md)
        return x.is_cuda and self.w1.dtype == torch.bfloat16

    def _forward_loop(
        self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        # Run in the dtype F.linear would use (autocast's, else the weights'), with autocast off inside so
        # that the backward's recompute of the activation sees exactly what the forward saw. The casts sit
        # outside the autograd.Function, so gradients reach fp32 master weights in their own dtype.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.w1.dtype
        params = [p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2)]
        on_cpu = x.device.type == "cpu"
        plan = _ExpertPlan(
            sizes=counts.tolist(),  # the layer's one host sync
            act=_activation(self.act),
            grad_buffers=self._grad_buffers if on_cpu else None,  # CUDA's caching allocator already recycles
            dropout=self.expert_dropout.p if self.training else 0.0,
            # one chunk per expert, except on CPU (see CPU_CHUNK_BYTES)
            max_rows=max(64, CPU_CHUNK_BYTES // (self.w1.shape[1] * params[0].element_size()))
            if on_cpu
            else x.shape[0] * self.top_k,
            for_backward=torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, *params)),
        )
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _LoopExperts.apply(x.to(dtype), weights.to(dtype), order, inverse, *params, plan)

    def _forward_grouped_mm(
        self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        # grouped_mm has no autocast and no usable bias: cast to the weight dtype, add biases per row.
        dtype = self.w1.dtype
        x_sorted = x.to(dtype).index_select(0, order // weights.shape[1])
        offsets = counts.cumsum(0).to(torch.int32)
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_experts, device=counts.device), counts, output_size=x_sorted.shape[0]
        )
        h = torch._grouped_mm(x_sorted, self.w1.transpose(-2, -1), offs=offsets) + self.b1[expert_of_row]
        h = self.expert_dropout(self.act(h))
        y_sorted = torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offsets) + self.b2[expert_of_row]
        return _combine(y_sorted, inverse, weights.to(dtype))[0]

    def extra_repr(self) -> str:
        e, hidden, dim = self.w1.shape
        return f"dim={dim}, hidden={hidden}, num_experts={e}, top_k={self.top_k}, dispatch={self.dispatch}"


def _sort_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the ``N * k`` (token, slot) pairs by expert.

    Returns ``order`` (sorted position -> pair), its inverse (pair -> sorted position) and the per-expert
    counts. Both directions are kept so that every later permutation is a gather (parallel, deterministic)
    rather than a scatter.
    """
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse, torch.bincount(flat, minlength=num_experts)


def _combine(y_sorted: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's routing-weighted sum of its k expert outputs, and those outputs ``[N, k, dim]``.

    A gather back to pair order then one batched ``[1, k] @ [k, dim]`` product: no ``index_add_``
    (non-deterministic on CUDA) and no separate weight multiply, sum and scatter passes over memory.
    """
    n, k = weights.shape
    y_pairs = y_sorted.index_select(0, inverse).view(n, k, -1)
    return torch.bmm(weights.unsqueeze(1), y_pairs).squeeze(1), y_pairs


def _grouped_mm_supported(w1: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` exists and can take this layer: every row stride must be a multiple of
    16 bytes (it raises otherwise, and older CUDA kernels silently returned wrong results)."""
    return hasattr(torch, "_grouped_mm") and all(s * w1.element_size() % 16 == 0 for s in w1.shape[1:])


# On CPU, experts run in row chunks whose activations stay under this size. glibc serves blocks over
# 32 MiB with a fresh mmap whose pages fault in on first write (about twice the cost of the write itself),
# while smaller blocks are recycled from the heap: chunking keeps a big batch as cheap per row as a small
# one (docs/performance.md).
CPU_CHUNK_BYTES = 24 * 2**20


def _chunks(sizes: list[int], max_rows: int):
    """``(expert, row slice, first chunk of that expert?)`` over the expert-sorted rows: each expert's rows
    in equal chunks of at most ``max_rows`` (no small, inefficient tail matmul). An expert without tokens
    still yields one empty chunk, so that its weight gradient is zeroed."""
    start = 0
    for e, n in enumerate(sizes):
        parts = max(1, -(-n // max_rows))  # ceil division
        step = max(1, -(-n // parts))
        for offset in range(0, max(n, 1), step):
            yield e, slice(start + offset, start + min(n, offset + step)), offset == 0
        start += n


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool, alpha: float = 1.0) -> None:
    if first:
        torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)  # beta=0: out's old contents are ignored
    else:
        out.addmm_(a, b, alpha=alpha)


def _sum_into(out: torch.Tensor, a: torch.Tensor, first: bool) -> None:
    if first:
        torch.sum(a, 0, out=out)
    else:
        out.add_(a.sum(0))


@dataclass(frozen=True)
class _Activation:
    """An elementwise activation written as ``fn(scale * z) / scale``.

    The scale folds into the matmuls on either side (addmm's ``alpha``/``beta``), so the layer runs one
    elementwise kernel where quick_gelu's ``x * sigmoid(1.702 x)`` takes three. ``backward(grad, u)`` is
    ``grad * fn'(u)``, one fused kernel; None means differentiate ``fn`` by autograd on a recompute.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    scale: float = 1.0
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def _activation(act: nn.Module) -> _Activation:
    """The closed form of the activations CLIP checkpoints use; any other elementwise module as it is."""
    cls = type(act)
    from_transformers = cls.__module__.startswith("transformers.")
    if isinstance(act, QuickGELU) or (from_transformers and cls.__name__ == "QuickGELUActivation"):
        return _Activation(F.silu, 1.702, torch.ops.aten.silu_backward)  # x sigmoid(1.702 x) = silu(1.702 x)/1.702
    approximate = None
    fn = getattr(act, "act", None)  # transformers' GELUActivation and GELUTanh wrap F.gelu
    if cls is nn.GELU:
        approximate = act.approximate
    elif from_transformers and cls.__name__ == "GELUActivation" and fn is F.gelu:
        approximate = "none"
    elif (
        from_transformers
        and cls.__name__ == "GELUTanh"
        and isinstance(fn, functools.partial)
        and fn.func is F.gelu
        and fn.keywords == {"approximate": "tanh"}
    ):
        approximate = "tanh"
    if approximate is None:
        return _Activation(act)
    return _Activation(
        functools.partial(F.gelu, approximate=approximate),
        backward=functools.partial(torch.ops.aten.gelu_backward, approximate=approximate),
    )


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _gradient_buffer(cache: dict | None, name: str, like: torch.Tensor) -> torch.Tensor:
    """Uninitialised memory for the stacked gradient of weight ``name``, reused across backwards on CPU.

    A stacked ``[E, hidden, dim]`` gradient is large (37.7 MB for one ViT-B/16 layer). glibc serves blocks
    over 32 MiB with a fresh mmap, so a fresh gradient faults in its pages on every backward, which at
    small batches costs more than the matmuls (docs/performance.md). The layer keeps each buffer it
    handed out and hands it out again only when the storage's reference count shows that nothing else
    (``param.grad``, a user's copy, a view, a numpy array) still holds it, so no live tensor is ever
    overwritten. With gradient accumulation ``param.grad`` holds one buffer and a second one serves each
    micro-batch. ``layer.eval()`` (or ``train(False)``) frees the cache.
    """
    if cache is None or not hasattr(torch._C, "_storage_Use_Count"):
        return torch.empty_like(like)
    entries = [e for e in cache.get(name, []) if e[0].shape == like.shape and e[0].dtype == like.dtype]
    for buf, alone in entries:
        if _storage_refs(buf) == alone:
            return buf.view(buf.shape)  # a new tensor on the same memory, which autograd adopts as .grad
    buf = torch.empty_like(like, memory_format=torch.contiguous_format)
    cache[name] = [*entries[-1:], (buf, _storage_refs(buf))]  # at most two: param.grad's and a spare
    return buf.view(buf.shape)


@dataclass(frozen=True)
class _ExpertPlan:
    """The non-tensor inputs of ``_LoopExperts``."""

    sizes: list[int]  # tokens per expert, from the layer's one host sync
    act: _Activation
    grad_buffers: dict | None  # the layer's gradient cache on CPU, else None (see _gradient_buffer)
    dropout: float
    max_rows: int  # rows per expert chunk
    for_backward: bool  # save what the backward needs


class _LoopExperts(torch.autograd.Function):
    """Gather, per-expert matmul pairs, and weighted combine, with a hand-written backward.

    Plain autograd over per-expert ``F.linear`` calls would ``cat`` the expert outputs, ``stack`` full-size
    weight gradients out of ``unbind``, keep every activation temporary alive and scatter-add the input
    gradient. Here each expert chunk writes straight into one preallocated output (``out=``), weight
    gradients go straight into their ``[E, ...]`` slice (of memory reused across steps on CPU, see
    ``_gradient_buffer``), every permutation is a gather, only the pre-activation is saved (the activation
    is recomputed in backward; CLIP's activations are differentiated in closed form, any other elementwise
    ``nn.Module`` by autograd), and gradients of frozen tensors are never computed.
    """

    @staticmethod
    def forward(ctx, x, weights, order, inverse, w1, b1, w2, b2, plan: _ExpertPlan):
        act, dropout = plan.act, plan.dropout
        chunks = list(_chunks(plan.sizes, plan.max_rows))
        x_sorted = x.index_select(0, order // weights.shape[1])
        y_sorted = x_sorted.new_empty(x_sorted.shape[0], w2.shape[1])
        pres, keeps = [], []
        for e, rows, _ in chunks:
            # pre = scale * (x w1^T + b1): the activation's scale rides on the matmul (see _Activation)
            pre = torch.addmm(b1[e], x_sorted[rows], w1[e].t(), beta=act.scale, alpha=act.scale)
            h = act.fn(pre)
            if dropout > 0:
                keep = torch.empty_like(h, dtype=torch.bool).bernoulli_(1 - dropout)
                h = h * keep / (1 - dropout)
                keeps.append(keep)
            torch.addmm(b2[e], h, w2[e].t(), alpha=1 / act.scale, out=y_sorted[rows])
            if plan.for_backward:  # at inference the chunk's buffers are freed (and recycled) right away
                pres.append(pre)
        out, y_pairs = _combine(y_sorted, inverse, weights)
        if plan.for_backward:
            x_sorted = x_sorted if ctx.needs_input_grad[4] else None  # only w1's gradient reads it
            ctx.save_for_backward(x_sorted, weights, order, inverse, w1, w2, y_pairs, *pres, *keeps)
            ctx.chunks, ctx.plan = chunks, plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_sorted, weights, order, inverse, w1, w2, y_pairs, *rest = ctx.saved_tensors
        plan, pres, keeps = ctx.plan, rest[: len(ctx.chunks)], rest[len(ctx.chunks) :] or [None] * len(ctx.chunks)
        need_x, need_weights, _, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:8]
        need_pre = need_x or need_w1 or need_b1
        n, k = weights.shape
        g = dict.fromkeys(("x", "weights", "w1", "b1", "w2", "b2"))
        if need_weights:
            g["weights"] = torch.linalg.vecdot(y_pairs, grad_out.unsqueeze(1))
        if need_pre or need_w2 or need_b2:
            grad_y = grad_out.index_select(0, order // k).mul_(weights.reshape(-1)[order].unsqueeze(-1))  # sorted
            grad_x_sorted = torch.empty_like(grad_y) if need_x else None
            for name, p, need in (("w1", w1, need_w1), ("w2", w2, need_w2)):
                g[name] = _gradient_buffer(plan.grad_buffers, name, p) if need else None
            g["b1"] = w1.new_empty(w1.shape[:2]) if need_b1 else None
            g["b2"] = w2.new_empty(w2.shape[:2]) if need_b2 else None
            for (e, rows, first), pre, keep in zip(ctx.chunks, pres, keeps):
                act = plan.act
                if act.backward is None:
                    with torch.enable_grad():
                        pre = pre.detach().requires_grad_(True)
                        act_out = act.fn(pre)
                    h = act_out.detach()
                else:
                    h = act.fn(pre)  # grad mode is off here: no graph
                scale = None if keep is None else keep / (1 - plan.dropout)
                h = h if scale is None else h * scale
                gy = grad_y[rows]
                if need_w2:
                    _mm_into(g["w2"][e], gy.t(), h, first, alpha=1 / act.scale)
                if need_b2:
                    _sum_into(g["b2"][e], gy, first)
                if not need_pre:
                    continue
                # the scales cancel: d/dz [fn(s z) / s] = fn'(s z), so this is the gradient at z
                grad_h = gy @ w2[e]
                grad_h = grad_h if scale is None else grad_h.mul_(scale)
                if act.backward is None:
                    (grad_pre,) = torch.autograd.grad(act_out, pre, grad_h)
                else:
                    grad_pre = act.backward(grad_h, pre)
                if need_x:
                    torch.mm(grad_pre, w1[e], out=grad_x_sorted[rows])
                if need_w1:
                    _mm_into(g["w1"][e], grad_pre.t(), x_sorted[rows], first)
                if need_b1:
                    _sum_into(g["b1"][e], grad_pre, first)
            if need_x:  # each token's k slot gradients, gathered back to pair order and summed
                g["x"] = grad_x_sorted.index_select(0, inverse).view(n, k, -1).sum(dim=1)
        return g["x"], g["weights"], None, None, g["w1"], g["b1"], g["w2"], g["b2"], None


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
