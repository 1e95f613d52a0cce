"""Training FLOPs per sample of one phase, estimated from the model's config: what the ``flops`` budget rule counts.

Torch-free arithmetic on the config's dict (``model.config.to_dict()`` or a loaded config.json). A matmul of
an ``[n, a]`` by an ``[a, b]`` operand costs ``2 n a b`` FLOPs. Per image-text pair, in each tower (width ``d``,
FFN size ``h``, ``T`` tokens: the image's patches plus its class token for CLIP, no class token for SigLIP;
the text context length for text, an upper bound since batches pad to their longest caption):

- forward, per block: attention projections ``8 T d^2`` (q, k, v, out), attention products ``4 T^2 d``
  (scores and the weighted sum), FFN ``4 T d h``; an MoE block instead runs its router (``2 T d E``) and
  ``top_k`` experts (``top_k x 4 T d h``; a uniform mixture saves top_k = E). Per tower: the patch embedding
  ``2 (C p^2) d`` per patch and the final projection ``2 d P`` (one pooled token).
- backward: every trainable weight's gradient costs its forward again, and the gradient with respect to an
  operation's input costs its forward again (the weight-free attention products: twice, one per operand),
  for every operation of the tower *above its lowest trainable parameter* (below it nothing needs a
  gradient; a tower with no trainable parameter gets no backward at all). So a frozen block that gradients
  pass through costs forward + input gradient, a trained one forward + input gradient + weight gradient.

Not counted (small next to the matmuls at CLIP sizes): norms, activations, softmaxes, residual adds, the
contrastive loss, SigLIP's pooling head, the optimizer, and the recompute of gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAINABLE_MODES = ("all", "ffn", "router", "router+experts")  # as model.set_trainable takes them


@dataclass(frozen=True)
class _Op:
    forward: float  # FLOPs per sample
    trained: float = 0.0  # FLOPs per sample of the forward matmuls whose weights train (their gradient's cost)
    trains: bool = False  # has a trainable parameter (the text embedding trains with no matmul FLOPs)
    products: bool = False  # weight-free (attention products): the input gradient costs twice the forward


def _weights(forward: float, trains: bool) -> _Op:
    return _Op(forward, forward if trains else 0.0, trains)


def _tower_ops(cfg: dict, tower: str, moe: dict, trainable: str, last_n_blocks: int | None, cls_token: bool):
    d, h, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    everything = trainable == "all"
    first_trained = 0 if last_n_blocks is None else max(0, layers - last_n_blocks)  # as set_trainable counts
    ops = []
    if tower == "vision":
        patches = cfg.get("num_patches") or (cfg["image_size"] // cfg["patch_size"]) ** 2  # NaFlex: num_patches
        tokens = patches + (1 if cls_token else 0)
        patch = 2 * cfg.get("num_channels", 3) * cfg["patch_size"] ** 2 * d * patches
        ops.append(_weights(patch, everything))
    else:
        tokens = cfg["max_position_embeddings"]
        ops.append(_weights(0.0, everything))  # the token embedding: a lookup, no FLOPs
    moe_blocks = set(moe.get("layers", {}).get(tower, [])) if moe else set()
    for i in range(layers):
        in_scope = everything or i >= first_trained
        ops.append(_weights(8 * tokens * d * d, everything))
        ops.append(_Op(4 * tokens * tokens * d, products=True))
        experts_train = in_scope and trainable in ("all", "ffn", "router+experts")
        if i in moe_blocks:
            router_trains = in_scope and trainable in ("all", "router", "router+experts")
            router = 2 * tokens * d * moe["num_experts"]
            experts = moe["top_k"] * 4 * tokens * d * h
            trained = (router if router_trains else 0.0) + (experts if experts_train else 0.0)
            ops.append(_Op(router + experts, trained, router_trains or experts_train))
        else:
            ops.append(_weights(4 * tokens * d * h, experts_train))  # a dense FFN trains as the experts would
    ops.append(_weights(2 * d * cfg["projection_dim"], everything))
    return ops


def training_flops_per_sample(config: dict, trainable: str, last_n_blocks: int | None = None) -> float:
    """Forward + backward FLOPs of one training sample (an image-text pair) of a phase that trains
    ``trainable`` (``model.set_trainable``'s mode, with its ``last_n_blocks``) of the model ``config``
    describes (``model.config.to_dict()``: its towers' configs and its ``moe`` section). See the module
    docstring for the formula."""
    if trainable not in TRAINABLE_MODES:
        raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {trainable!r}")
    moe = config.get("moe") or {}
    cls_token = "siglip" not in str(config.get("model_type", ""))  # SigLIP towers have no class token
    total = 0.0
    for tower in ("vision", "text"):
        cfg = config[f"{tower}_config"]
        # CLIP's projection width; SigLIP's text head (its vision head is attention pooling, not counted)
        cfg = {**cfg, "projection_dim": config.get("projection_dim") or cfg.get("projection_size", cfg["hidden_size"])}
        below_trained = False  # is there a trainable parameter below this operation (in the forward order)?
        for op in _tower_ops(cfg, tower, moe, trainable, last_n_blocks, cls_token):
            total += op.forward + op.trained
            if below_trained:
                total += op.forward * (2 if op.products else 1)
            below_trained = below_trained or op.trains
    return total
