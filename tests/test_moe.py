import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, QuickGELUActivation

from clipmoe.model.moe import (
    MoEFeedForward,
    QuickGELU,
    _activation,
    load_balancing_loss,
    router_z_loss,
)


def reference_moe(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The official code's per-expert loop (one_hot / where / index_add_), written independently."""
    flat = x.reshape(-1, x.shape[-1])
    probs = F.linear(flat.float(), layer.router.weight.float()).softmax(-1)
    w, idx = probs.topk(layer.top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    mask = F.one_hot(idx, layer.num_experts).permute(2, 1, 0)  # [E, k, N]
    for e in range(layer.num_experts):
        slot, tok = torch.where(mask[e])
        h = layer.act(flat[tok] @ layer.w1[e].T + layer.b1[e]) @ layer.w2[e].T + layer.b2[e]
        out.index_add_(0, tok, h * w[tok, slot, None])
    return out.view_as(x)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_loop_dispatch_matches_reference(top_k):
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, top_k, dispatch="loop")
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), reference_moe(layer, x), atol=1e-5, rtol=1e-5)
    assert layer.last_router_logits.shape == (21, 4)
    assert layer.last_router_logits.dtype == torch.float32


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped_mm")
def test_grouped_mm_matches_loop_forward_and_backward():
    torch.manual_seed(0)
    loop = MoEFeedForward(16, 32, 4, 2, dispatch="loop")
    grouped = MoEFeedForward(16, 32, 4, 2, dispatch="grouped_mm")
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(50, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y1, y2 = loop(x), grouped(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for (n, p1), p2 in zip(loop.named_parameters(), grouped.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_identical_experts_reproduce_the_dense_ffn():
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
    layer = MoEFeedForward.from_ffns([(fc1.weight, fc1.bias, fc2.weight, fc2.bias)] * 4, QuickGELU(), top_k=2)
    torch.nn.init.normal_(layer.router.weight, std=3.0)  # any router
    x = torch.randn(4, 9, 16)
    torch.testing.assert_close(layer(x), fc2(QuickGELU()(fc1(x))), atol=1e-5, rtol=1e-5)


def test_unused_expert_gets_zero_gradient_not_none():
    layer = MoEFeedForward(8, 16, 4, 1, dispatch="loop")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 10.0  # every token to expert 0 for positive inputs
    x = torch.rand(5, 8) + 0.1
    layer(x).sum().backward()
    assert layer.w1.grad is not None
    assert layer.w1.grad[1:].abs().sum() == 0 and layer.w1.grad[0].abs().sum() > 0


def test_empty_input():
    layer = MoEFeedForward(8, 16, 4, 2)
    assert layer(torch.empty(0, 3, 8)).shape == (0, 3, 8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(8, 16, 2, 3)
    with pytest.raises(ValueError, match="dispatch"):
        MoEFeedForward(8, 16, 2, 1, dispatch="magic")


def test_load_balancing_loss_values():
    # Perfectly balanced uniform router: f = 1/E per slot, P = 1/E -> loss = E * k * E * (1/E)(1/E) = k.
    logits = torch.zeros(64, 4)
    logits[torch.arange(64), torch.arange(64) % 4] = 1e-3  # break topk ties evenly
    assert load_balancing_loss(logits, top_k=2).item() == pytest.approx(2.0, rel=1e-2)
    # Collapsed router: all tokens to expert 0 with prob ~1 -> loss = E * (1*1 + second slot*~0).
    collapsed = torch.full((64, 4), -20.0)
    collapsed[:, 0] = 20.0
    assert load_balancing_loss(collapsed, top_k=1).item() == pytest.approx(4.0, rel=1e-3)


def test_load_balancing_mask_ignores_padding():
    real = torch.randn(10, 4)
    pad = torch.full((30, 4), -20.0)
    pad[:, 3] = 20.0  # padding all goes to expert 3
    logits = torch.cat([real, pad])
    mask = torch.cat([torch.ones(10), torch.zeros(30)]).bool()
    masked = load_balancing_loss(logits, 2, mask)
    torch.testing.assert_close(masked, load_balancing_loss(real, 2))
    assert load_balancing_loss(logits, 2) > masked  # the unmasked (official) form is still available


def test_router_z_loss():
    assert router_z_loss(torch.zeros(5, 4)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def _grads(layer: MoEFeedForward, fn, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Gradients of ``fn(layer, x)`` against ``g`` for x and every parameter (None where frozen)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    fn(layer, x).backward(g)
    return {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize(("top_k", "tokens", "chunk_bytes"), [(1, 21, None), (2, 21, None), (4, 21, None), (2, 300, 1)])
def test_loop_gradients_match_reference(monkeypatch, top_k, tokens, chunk_bytes):
    """The hand-written backward agrees with autograd through the official loop, for the input, every
    expert weight and bias and the router; chunk_bytes=1 forces several 64-row chunks per expert."""
    if chunk_bytes is not None:
        monkeypatch.setattr("clipmoe.model.moe.CPU_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, top_k, dispatch="loop")
    with torch.no_grad():
        layer.b1.normal_()
        layer.b2.normal_()
    x = torch.randn(tokens, 16, requires_grad=True)
    g = torch.randn(tokens, 16)
    ours = _grads(layer, lambda m, t: m(t), x, g)
    ref = _grads(layer, reference_moe, x, g)
    for name, grad in ref.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_gradcheck_in_float64_with_dropout():
    """Finite differences through routing weights, experts and the dropout mask (re-seeded per call)."""
    torch.manual_seed(0)
    layer = MoEFeedForward(4, 8, 3, 2, expert_dropout=0.3, dispatch="loop").double().train()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def run(x, w1, b1, w2, b2, router):
        torch.manual_seed(1)
        params = dict(zip(("w1", "b1", "w2", "b2", "router.weight"), (w1, b1, w2, b2, router)))
        return torch.func.functional_call(layer, params, (x,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in (layer.w1, layer.b1, layer.w2, layer.b2)))
    router = layer.router.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (*inputs, router), eps=1e-6, atol=1e-5, fast_mode=True)


def test_dropout_acts_in_training_only_and_survives_checkpointing():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 2, expert_dropout=0.5, dispatch="loop")
    x = torch.randn(30, 16, requires_grad=True)
    eval_out = layer.eval()(x)
    layer.train()
    torch.manual_seed(5)
    plain = layer(x)
    assert not torch.allclose(plain, eval_out)
    g = torch.randn_like(plain)
    (gx_plain,) = torch.autograd.grad(plain, x, g)
    torch.manual_seed(5)
    ckpt = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    (gx_ckpt,) = torch.autograd.grad(ckpt, x, g)  # the recompute must redraw the same mask
    torch.testing.assert_close(ckpt, plain)
    torch.testing.assert_close(gx_ckpt, gx_plain)


def test_frozen_experts_cost_no_weight_gradients():
    """Router-only training (set_trainable("router")): expert grads stay None, the router's is exact."""
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 2, dispatch="loop")
    for p in (layer.w1, layer.b1, layer.w2, layer.b2):
        p.requires_grad_(False)
    x = torch.randn(25, 16)  # frozen input too, as for the first block of a frozen tower
    g = torch.randn(25, 16)
    ours = _grads(layer, lambda m, t: m(t), x, g)
    assert ours["x"] is None and all(ours[n] is None for n in ("w1", "b1", "w2", "b2"))
    ref = _grads(layer, reference_moe, x, g)
    torch.testing.assert_close(ours["router.weight"], ref["router.weight"], atol=1e-5, rtol=1e-5)


def test_inference_and_training_forward_agree():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 2, dispatch="loop")
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        inference = layer(x)
    torch.testing.assert_close(layer(x.requires_grad_()), inference, atol=0, rtol=0)


def test_autocast_bf16_on_cpu_computes_in_bf16_and_keeps_fp32_gradients():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 2, dispatch="loop")
    x = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert layer.w1.grad.dtype == torch.float32 and layer.router.weight.grad.dtype == torch.float32


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped_mm")
def test_grouped_mm_matches_loop_in_bf16():
    torch.manual_seed(0)
    loop = MoEFeedForward(32, 64, 4, 2, dispatch="loop").bfloat16()
    grouped = MoEFeedForward(32, 64, 4, 2, dispatch="grouped_mm").bfloat16()
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(60, 32, dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = loop(x1), grouped(x2)
    assert y2.dtype == torch.bfloat16
    torch.testing.assert_close(y2, y1, atol=3e-2, rtol=3e-2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(grouped.w1.grad, loop.w1.grad, atol=1e-1, rtol=3e-2)


def test_grouped_mm_falls_back_to_the_loop(monkeypatch):
    """Unaligned widths (6 fp32 = 24-byte rows) and a torch without the op both run the loop instead."""
    torch.manual_seed(0)
    loop = MoEFeedForward(6, 12, 4, 2, dispatch="loop")
    grouped = MoEFeedForward(6, 12, 4, 2, dispatch="grouped_mm")
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(20, 6)
    torch.testing.assert_close(grouped(x), loop(x), atol=0, rtol=0)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    aligned = MoEFeedForward(16, 32, 4, 2, dispatch="grouped_mm")
    reference = MoEFeedForward(16, 32, 4, 2, dispatch="loop")
    reference.load_state_dict(aligned.state_dict())
    x = torch.randn(20, 16)
    torch.testing.assert_close(aligned(x), reference(x), atol=0, rtol=0)


ACTIVATIONS = {  # the activations CLIP checkpoints use (closed form), and two left to autograd
    "clipmoe QuickGELU": (QuickGELU, True),
    "HF quick_gelu": (QuickGELUActivation, True),
    "nn.GELU": (nn.GELU, True),
    "nn.GELU tanh": (lambda: nn.GELU(approximate="tanh"), True),
    "HF gelu": (GELUActivation, True),
    "HF gelu_pytorch_tanh": (GELUTanh, True),
    "HF gelu_python": (lambda: GELUActivation(use_gelu_python=True), False),
    "nn.SiLU": (nn.SiLU, False),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_closed_form_activations_match_the_module(name):
    """fn(scale z) / scale is the module's output, and backward(g, scale z) autograd's gradient at z."""
    make, closed = ACTIVATIONS[name]
    act = make()
    form = _activation(act)
    assert (form.backward is not None) == closed
    if not closed:
        assert form.fn is act and form.scale == 1.0
        return
    z = torch.linspace(-9, 9, 2001, dtype=torch.float64, requires_grad=True)  # both saturated tails too
    g = torch.randn_like(z)
    out = act(z)
    (expected,) = torch.autograd.grad(out, z, g)
    u = form.scale * z.detach()
    torch.testing.assert_close(form.fn(u) / form.scale, out.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(form.backward(g, u), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_layer_gradients_match_reference_for_every_activation(name):
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 2, activation=ACTIVATIONS[name][0](), expert_dropout=0.0, dispatch="loop")
    x = torch.randn(21, 16, requires_grad=True)
    torch.testing.assert_close(layer(x), reference_moe(layer, x), atol=1e-5, rtol=1e-5)
    g = torch.randn(21, 16)
    ours = _grads(layer, lambda m, t: m(t), x, g)
    ref = _grads(layer, reference_moe, x, g)
    for key, grad in ref.items():
        torch.testing.assert_close(ours[key], grad, atol=1e-4, rtol=1e-4, msg=key)


def _backward(layer: MoEFeedForward, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layer(torch.randn(30, 16, generator=gen)).backward(torch.randn(30, 16, generator=gen))


def _fresh_grads(layer: MoEFeedForward, seed: int) -> dict[str, torch.Tensor]:
    """The gradients of one backward, computed by a copy of the layer (no shared cache)."""
    twin = copy.deepcopy(layer)
    twin.zero_grad(set_to_none=True)
    _backward(twin, seed)
    return {n: p.grad for n, p in twin.named_parameters()}


def test_weight_gradient_memory_is_reused_only_when_nothing_holds_it():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 2, dispatch="loop")
    _backward(layer, 1)
    first = layer.w1.grad
    first_ptr, first_values = first.data_ptr(), first.clone()

    # A caller still holds the old gradient: the next backward must not write into it.
    layer.zero_grad(set_to_none=True)
    _backward(layer, 2)
    assert layer.w1.grad.data_ptr() != first_ptr
    torch.testing.assert_close(first, first_values, atol=0, rtol=0)
    torch.testing.assert_close(layer.w1.grad, _fresh_grads(layer, 2)["w1"], atol=0, rtol=0)

    # Once nothing holds it, the memory serves again (no fresh pages to fault in), with correct values:
    # every element is written, even where the old contents are NaN.
    del first
    for seed in (3, 4):
        layer.zero_grad(set_to_none=True)
        for buf, _ in layer._grad_buffers["w1"] + layer._grad_buffers["w2"]:
            buf.fill_(float("nan"))
        _backward(layer, seed)
        assert layer.w1.grad.data_ptr() == first_ptr
        expected = _fresh_grads(layer, seed)
        for name in ("w1", "w2", "b1", "b2"):
            torch.testing.assert_close(getattr(layer, name).grad, expected[name], atol=0, rtol=0, msg=name)
    assert len(layer._grad_buffers["w1"]) == 2  # param.grad's buffer and one spare, never more


def test_reused_gradient_memory_is_zeroed_for_an_expert_without_tokens():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 1, dispatch="loop")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # with x > 0 below, expert 0 has the top logit for every token
    x = torch.randn(30, 16).abs()
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        for buf, _ in layer._grad_buffers.get("w1", []):
            buf.fill_(float("nan"))
        layer(x).sum().backward()
        assert torch.equal(layer.w1.grad[1:], torch.zeros_like(layer.w1.grad[1:]))
        assert not layer.w1.grad[0].isnan().any()


def test_gradient_accumulation_with_reused_memory_sums_exactly():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 2, dispatch="loop")
    parts = [_fresh_grads(layer, seed) for seed in (1, 2, 3)]
    for _ in range(2):  # the second round runs on cached memory
        layer.zero_grad(set_to_none=True)
        for seed in (1, 2, 3):
            _backward(layer, seed)
        for name in ("w1", "w2"):
            torch.testing.assert_close(getattr(layer, name).grad, sum(p[name] for p in parts), msg=name)


def test_eval_and_copies_drop_the_gradient_cache():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 2, dispatch="loop")
    _backward(layer, 1)
    assert set(layer._grad_buffers) == {"w1", "w2"}
    assert copy.deepcopy(layer)._grad_buffers == {}
    layer.eval()
    assert layer._grad_buffers == {}
    frozen = MoEFeedForward(16, 32, 4, 2, dispatch="loop")
    for p in (frozen.w1, frozen.b1, frozen.w2, frozen.b2):
        p.requires_grad_(False)
    _backward(frozen, 1)  # a router step computes no weight gradient, so caches nothing
    assert frozen._grad_buffers == {}
