import pytest
import torch
import torch.nn.functional as F

from clipmoe.moe import MoEFeedForward, QuickGELU, load_balancing_loss, router_z_loss


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
