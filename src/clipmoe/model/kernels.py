"""Fast versions of ``MoEFeedForward``'s expert computation, chosen at run time.

``moe.py`` is the plain layer that ships with every saved model; its ``EXPERT_KERNELS`` registry maps a
``dispatch`` name to ``fn(layer, x, weights, experts) -> [N, dim]``. Importing this module (``import
clipmoe`` does) adds:

- ``"loop"``: the experts on sorted, contiguous token slices inside one ``autograd.Function`` with a
  hand-written backward: closed-form activations, weight gradients written in place and their memory reused
  across steps on CPU, row chunks that stay clear of glibc's mmap threshold. The fastest path on CPU.
- ``"grouped_mm"``: every expert in one ``torch._grouped_mm`` per matmul, autograd (CUDA + bf16); the
  per-expert bias add has its own backward (``_RowBias``).
- ``"auto"`` (the default): on CUDA in bf16 ``grouped_mm`` for calls of up to ``GROUPED_MM_MAX_TOKENS``
  tokens and ``loop`` above; ``loop`` on CPU; ``eager`` otherwise (CUDA in fp32).

Each is tested against ``moe.eager_experts`` (forward and gradients; in bf16 against a float64 truth) in
tests/test_moe.py; timings and profiles are in docs/performance.md. The layer's routing options (capacity
with token dropping, the always-on base expert) change only what ``route`` hands the kernels: zero weights for
dropped pairs, and one more slot per token (expert 0) for the base, so the slot count is ``weights.shape[1]``,
not ``top_k`` (tests/test_recipes.py checks both against the plain path).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .moe import EXPERT_KERNELS, MoEFeedForward, compute_dtype, eager_experts

# ---------------------------------------------------------------- selection


# Up to how many tokens a call grouped_mm is the fastest path on CUDA in bf16. Measured at ViT-L/14 widths,
# 4 experts, top-2, on an H100 (docs/performance.md, "On a GPU"): a training step at 257 and 2,056 tokens takes
# 0.62x and 0.61x the plain layer's time with grouped_mm (the loop kernel 0.80x, 0.76x); at 8,224 and 32,896
# tokens grouped_mm takes 1.07x and 1.25x, the loop kernel 0.73x and 0.74x. The bound sits between the pairs.
GROUPED_MM_MAX_TOKENS = 4096


def choose_kernel(layer: MoEFeedForward, x: torch.Tensor) -> str:
    """What ``dispatch="auto"`` runs for this call (``x`` is ``[tokens, dim]``)."""
    dtype = compute_dtype(layer, x)
    if x.is_cuda and dtype == torch.bfloat16:
        if x.shape[0] <= GROUPED_MM_MAX_TOKENS and grouped_mm_supported(layer.w1, dtype):
            return "grouped_mm"  # small calls: one fused kernel instead of one launch per expert
        return "loop"  # large calls, and widths grouped_mm cannot take
    if x.device.type == "cpu":
        return "loop"  # as fast as eager forward, 1-27% faster with backward (docs/performance.md, table 1a)
    return "eager"


def auto_experts(layer: MoEFeedForward, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
    return EXPERT_KERNELS[choose_kernel(layer, x)](layer, x, weights, experts)


# ---------------------------------------------------------------- helpers shared by the fast paths


def _sort_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the ``N * k`` (token, slot) pairs by expert.

    Returns ``order`` (sorted position -> pair), its inverse (pair -> sorted position) and the per-expert
    counts. Both directions are kept so that every later permutation is a gather (parallel, deterministic)
    rather than a scatter. The counts come from ``scatter_add_``: ``bincount`` would sync with a GPU.
    """
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, inverse, counts


def _combine(y_sorted: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's routing-weighted sum of its k expert outputs, and those outputs ``[N, k, dim]``.

    A gather back to pair order then one batched ``[1, k] @ [k, dim]`` product: no ``index_add_``
    (non-deterministic on CUDA) and no separate weight multiply, sum and scatter passes over memory.
    """
    n, k = weights.shape
    y_pairs = y_sorted.index_select(0, inverse).view(n, k, -1)
    return torch.bmm(weights.unsqueeze(1), y_pairs).squeeze(1), y_pairs


# ---------------------------------------------------------------- grouped_mm


def grouped_mm_supported(w1: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether ``torch._grouped_mm`` exists and can take these weights in ``dtype``: every row stride must be
    a multiple of 16 bytes (it raises otherwise, and older CUDA kernels silently returned wrong results)."""
    size = (dtype or w1.dtype).itemsize
    return hasattr(torch, "_grouped_mm") and all(s * size % 16 == 0 for s in w1.shape[1:])


def grouped_mm_experts(layer: MoEFeedForward, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
    """All experts in one ``torch._grouped_mm`` per matmul; eager where the op cannot run."""
    dtype = compute_dtype(layer, x)
    if x.shape[0] == 0 or not grouped_mm_supported(layer.w1, dtype):
        return eager_experts(layer, x, weights, experts)
    order, inverse, counts = _sort_by_expert(experts, layer.num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    rows = order.shape[0]
    expert_of_row = torch.repeat_interleave(torch.arange(layer.num_experts, device=x.device), counts, output_size=rows)
    # grouped_mm is not covered by autocast and its bias argument is not usable: cast to the compute dtype
    # ourselves (as F.linear under autocast would) and add the biases per row.
    with torch.autocast(device_type=x.device.type, enabled=False):
        w1, w2 = layer.w1.to(dtype), layer.w2.to(dtype)
        x_sorted = x.to(dtype).index_select(0, order // weights.shape[1])
        h = _RowBias.apply(torch._grouped_mm(x_sorted, w1.transpose(-2, -1), offs=offsets), layer.b1, expert_of_row)
        h = layer.expert_dropout(layer.act(h))
        y_sorted = _RowBias.apply(torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets), layer.b2, expert_of_row)
        return _combine(y_sorted, inverse, weights.to(dtype))[0]


class _RowBias(torch.autograd.Function):
    """``y + bias[expert_of_row]``, whose bias gradient is one small matmul instead of the gather's backward.

    The gather's own backward adds every row into its expert's bias row: on CUDA an atomic add per element,
    all rows contending for E bias rows (grouped_mm's training step took 3.9x the plain layer's time at 33k
    tokens on an H100: docs/performance.md, "On a GPU"), and in bf16 every partial sum is rounded (8x
    F.linear's error at 300 tokens: tests/test_moe.py's bf16 tests). ``one_hot(expert_of_row)^T @ grad`` is
    deterministic, accumulates in fp32 inside the matmul and rounds once, as F.linear's bias gradient does.
    """

    @staticmethod
    def forward(ctx, y, bias, expert_of_row):
        ctx.save_for_backward(expert_of_row)
        ctx.experts = bias.shape[0]
        ctx.bias_dtype = bias.dtype
        return y + bias.to(y.dtype)[expert_of_row]

    @staticmethod
    def backward(ctx, grad):
        (expert_of_row,) = ctx.saved_tensors
        grad_bias = None
        if ctx.needs_input_grad[1]:
            rows_of_expert = F.one_hot(expert_of_row, ctx.experts).to(grad.dtype).t()
            grad_bias = (rows_of_expert @ grad).to(ctx.bias_dtype)
        return grad, grad_bias, None


# ---------------------------------------------------------------- activations in closed form


@dataclass(frozen=True)
class Activation:
    """An elementwise activation written as ``fn(scale * z) / scale``.

    The scale folds into the matmuls on either side (addmm's ``alpha``/``beta``), so the layer runs one
    elementwise kernel where quick_gelu's ``x * sigmoid(1.702 x)`` takes three. ``backward(grad, u)`` is
    ``grad * fn'(u)``, one fused kernel; None means differentiate ``fn`` by autograd on a recompute.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    scale: float = 1.0
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


_GELU = Activation(F.gelu, backward=torch.ops.aten.gelu_backward)
_GELU_TANH = Activation(
    functools.partial(F.gelu, approximate="tanh"),
    backward=functools.partial(torch.ops.aten.gelu_backward, approximate="tanh"),
)
_SILU = Activation(F.silu, backward=torch.ops.aten.silu_backward)

# Closed forms by transformers ``hidden_act`` name (what a CLIP config says; ACT2FN builds the module from
# it). Each is tested against ``ACT2FN[name]`` in float64. Other names are differentiated by autograd.
CLOSED_FORMS: dict[str, Activation] = {
    "quick_gelu": Activation(F.silu, 1.702, torch.ops.aten.silu_backward),  # x sigmoid(1.702 x) = silu(1.702 x)/1.702
    "gelu": _GELU,
    "gelu_python": _GELU,
    "gelu_pytorch_tanh": _GELU_TANH,
    "gelu_new": _GELU_TANH,
    "silu": _SILU,
    "swish": _SILU,
    "relu": Activation(F.relu, backward=lambda grad, u: torch.ops.aten.threshold_backward(grad, u, 0)),
}


def activation_of(layer: MoEFeedForward) -> Activation:
    """The closed form for the layer's ``hidden_act``, else its activation module as it is."""
    return CLOSED_FORMS.get(layer.hidden_act) or Activation(layer.act)


# ---------------------------------------------------------------- the CPU fast path ("loop")

# On CPU, experts run in row chunks whose activations stay under this size. glibc serves blocks over
# 32 MiB with a fresh mmap whose pages fault in on first write (about twice the cost of the write itself),
# while smaller blocks are recycled from the heap: chunking keeps a big batch as cheap per row as a small
# one (docs/performance.md).
CPU_CHUNK_BYTES = 24 * 2**20

# Weight-gradient memory kept per layer (CPU only, see _gradient_buffer). Weak keys: a dropped layer frees
# its memory, and a deepcopy of a layer starts with none.
_GRAD_BUFFERS: weakref.WeakKeyDictionary[MoEFeedForward, dict] = weakref.WeakKeyDictionary()


def _storage_refs(t: torch.Tensor) -> int | None:
    """How many tensors share ``t``'s memory, or None where this torch cannot tell."""
    # Private API, the only way to ask (PyTorch's own tests use it). Without it no memory is reused.
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(t.untyped_storage()._cdata)


def _gradient_buffer(cache: dict | None, name: str, like: torch.Tensor) -> torch.Tensor:
    """Uninitialised memory for the stacked gradient of weight ``name``, reused across backwards on CPU.

    A stacked ``[E, hidden, dim]`` gradient is large (37.7 MB for one ViT-B/16 layer). glibc serves blocks
    over 32 MiB with a fresh mmap, so a fresh gradient faults in its pages on every backward, which at
    small batches costs more than the matmuls (docs/performance.md). The cache keeps each buffer it
    handed out and hands it out again only when the storage's reference count shows that nothing else
    (``param.grad``, a user's copy, a view, a numpy array) still holds it, so no live tensor is ever
    overwritten. With gradient accumulation ``param.grad`` holds one buffer and a second one serves each
    micro-batch. An inference call of the layer frees the cache.
    """
    if cache is None or _storage_refs(like) is None:
        return torch.empty_like(like)
    entries = [e for e in cache.get(name, []) if e[0].shape == like.shape and e[0].dtype == like.dtype]
    for buf, alone in entries:
        if _storage_refs(buf) == alone:
            return buf.view(buf.shape)  # a new tensor on the same memory, which autograd adopts as .grad
    buf = torch.empty_like(like, memory_format=torch.contiguous_format)
    cache[name] = [*entries[-1:], (buf, _storage_refs(buf))]  # at most two: param.grad's and a spare
    return buf.view(buf.shape)


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
class _ExpertPlan:
    """The non-tensor inputs of ``_LoopExperts``."""

    sizes: list[int]  # tokens per expert, from the layer's one host sync
    act: Activation
    grad_buffers: dict | None  # the layer's gradient cache on CPU, else None (see _gradient_buffer)
    dropout: float
    max_rows: int  # rows per expert chunk
    for_backward: bool  # save what the backward needs


def loop_experts(layer: MoEFeedForward, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
    """The experts on expert-sorted token slices with a hand-written backward (``_LoopExperts``)."""
    if x.shape[0] == 0:
        return eager_experts(layer, x, weights, experts)
    order, inverse, counts = _sort_by_expert(experts, layer.num_experts)
    # Run in the dtype F.linear would use, with autocast off inside so that the backward's recompute of the
    # activation sees exactly what the forward saw. The casts sit outside the autograd.Function, so
    # gradients reach fp32 master weights in their own dtype.
    dtype = compute_dtype(layer, x)
    params = [p.to(dtype) for p in (layer.w1, layer.b1, layer.w2, layer.b2)]
    on_cpu = x.device.type == "cpu"
    for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, *params))
    if not for_backward:  # inference needs no weight gradients: give their cached memory back
        _GRAD_BUFFERS.pop(layer, None)
    plan = _ExpertPlan(
        sizes=counts.tolist(),  # the layer's one host sync
        act=activation_of(layer),
        grad_buffers=_GRAD_BUFFERS.setdefault(layer, {}) if on_cpu and for_backward else None,
        dropout=layer.expert_dropout.p if layer.training else 0.0,
        # one chunk per expert, except on CPU (see CPU_CHUNK_BYTES)
        max_rows=max(64, CPU_CHUNK_BYTES // (layer.w1.shape[1] * params[0].element_size()))
        if on_cpu
        else x.shape[0] * weights.shape[1],
        for_backward=for_backward,
    )
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _LoopExperts.apply(x.to(dtype), weights.to(dtype), order, inverse, *params, plan)


class _LoopExperts(torch.autograd.Function):
    """Gather, per-expert matmul pairs, and weighted combine, with a hand-written backward.

    Plain autograd over per-expert ``F.linear`` calls would ``cat`` the expert outputs, ``stack`` full-size
    weight gradients out of ``unbind``, keep every activation temporary alive and scatter-add the input
    gradient. Here each expert chunk writes straight into one preallocated output (``out=``), weight
    gradients go straight into their ``[E, ...]`` slice (of memory reused across steps on CPU, see
    ``_gradient_buffer``), every permutation is a gather, only the pre-activation is saved (the activation
    is recomputed in backward, in closed form where ``CLOSED_FORMS`` has one, else by autograd), and
    gradients of frozen tensors are never computed.
    """

    @staticmethod
    def forward(ctx, x, weights, order, inverse, w1, b1, w2, b2, plan: _ExpertPlan):
        act, dropout = plan.act, plan.dropout
        chunks = list(_chunks(plan.sizes, plan.max_rows))
        x_sorted = x.index_select(0, order // weights.shape[1])
        y_sorted = x_sorted.new_empty(x_sorted.shape[0], w2.shape[1])
        pres, keeps = [], []
        for e, rows, _ in chunks:
            # pre = scale * (x w1^T + b1): the activation's scale rides on the matmul (see Activation)
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


EXPERT_KERNELS.update(loop=loop_experts, grouped_mm=grouped_mm_experts, auto=auto_experts)
