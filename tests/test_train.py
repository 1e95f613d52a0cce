import copy
import json

import numpy as np
import pytest
import torch

from clipmoe import sparse_upcycle
from clipmoe.train.config import TrainConfig
from clipmoe.train.loop import CHECKPOINT, METRICS, train
from clipmoe.train.loss import ClipLoss
from clipmoe.train.samplers import GlobalBatchSampler
from conftest import WORDS, make_tiny_clip


class Synthetic(torch.utils.data.Dataset):
    """Random images with captions; ``fail_at`` raises on the n-th item to simulate a crash."""

    def __init__(self, n=48, fail_at=None):
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(n, 3, 32, 32, generator=g)
        self.captions = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(4)) for i in range(n)]
        self.fail_at, self.calls = fail_at, 0

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        return self.pixels[i], self.captions[i]


def make_collate(model):
    def collate(items):
        text = model.tokenizer([c for _, c in items])
        return {
            "pixel_values": torch.stack([p for p, _ in items]),
            **text,
            "valid": torch.ones(len(items), dtype=torch.bool),
        }

    return collate


def cfg(**kw):
    base = dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=2, log_every=1, min_batch=4)
    base.update(kw)
    return TrainConfig(**base)


def test_ffn_only_training_changes_only_ffns(tmp_path):
    model = make_tiny_clip()
    before = copy.deepcopy(model.state_dict())
    train(model, Synthetic(), make_collate(model), cfg(trainable="ffn"), str(tmp_path))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".mlp." in k for k in changed)
    records = [json.loads(line) for line in open(tmp_path / METRICS)]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_router_training_with_balance_loss(tmp_path):
    moe = sparse_upcycle(make_tiny_clip(), 4, top_k=2, noise=0.01)
    before = copy.deepcopy(moe.state_dict())
    train(moe, Synthetic(), make_collate(moe), cfg(trainable="router", balance_weight=0.01), str(tmp_path))
    changed = {k for k, v in moe.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("router.weight") for k in changed)
    records = [json.loads(line) for line in open(tmp_path / METRICS)]
    assert all(r["balance"] >= 2.0 - 1e-4 for r in records)  # top-2 balance loss is >= k


def test_learnable_temperature_loss_decreases(tmp_path):
    model = make_tiny_clip()
    train(
        model,
        Synthetic(16),
        make_collate(model),
        cfg(steps=30, batch_size=16, logit_scale=None, label_smoothing=0.0),
        str(tmp_path),
    )
    losses = [json.loads(line)["clip"] for line in open(tmp_path / METRICS)]
    assert losses[-1] < 0.5 * losses[0]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    ref = make_tiny_clip()
    train(ref, Synthetic(), make_collate(ref), cfg(), str(tmp_path / "ref"))

    model = make_tiny_clip()
    with pytest.raises(KeyboardInterrupt):
        train(model, Synthetic(fail_at=8 * 5), make_collate(model), cfg(), str(tmp_path / "run"))
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["step"] == 4
    model = make_tiny_clip()  # a fresh process starts from the base again
    train(model, Synthetic(), make_collate(model), cfg(), str(tmp_path / "run"))
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


def test_changed_settings_refuse_to_resume(tmp_path):
    model = make_tiny_clip()
    with pytest.raises(KeyboardInterrupt):
        train(model, Synthetic(fail_at=8 * 3), make_collate(model), cfg(), str(tmp_path))
    with pytest.raises(ValueError, match="different training settings.*lr"):
        train(make_tiny_clip(), Synthetic(), make_collate(model), cfg(lr=5e-4), str(tmp_path))


def test_invalid_settings():
    with pytest.raises(ValueError, match="precision='fp16'"):
        TrainConfig(precision="fp16")


def test_cluster_sampler_batches_come_from_one_cluster():
    labels = np.repeat(np.arange(5), [40, 25, 9, 3, 23])
    s = GlobalBatchSampler(len(labels), 8, labels, world_size=2, seed=3, min_batch=4)
    plan = s.plan(0)
    assert all(len(np.unique(labels[b])) == 1 for b in plan)
    assert all(len(b) % 2 == 0 and len(b) >= 4 for b in plan)
    assert s.plan(0) is plan and [b.tolist() for b in s.plan(1)] != [b.tolist() for b in plan]
    stats = s.stats()
    assert stats.clusters_dropped == 1 and stats.samples + stats.dropped == 100  # cluster of 3 < min_batch
    ranks = [
        list(GlobalBatchSampler(len(labels), 8, labels, world_size=2, rank=r, seed=3, min_batch=4).local_batches(0))
        for r in (0, 1)
    ]
    for b, r0, r1 in zip(plan, *ranks):
        assert sorted(r0 + r1) == sorted(b.tolist())
    drop = GlobalBatchSampler(len(labels), 8, labels, small_clusters="drop")
    assert all(len(b) == 8 for b in drop.plan(0))


def test_clip_loss_masks_invalid_samples():
    torch.manual_seed(0)
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    valid = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    for s in (0.0, 0.1):
        masked = ClipLoss(s)(img, txt, 10.0, valid)
        torch.testing.assert_close(masked, ClipLoss(s)(img[valid], txt[valid], 10.0))


def test_grad_checkpointing_gives_the_same_step(tmp_path):
    results = []
    for ckpt in (False, True):
        moe = sparse_upcycle(make_tiny_clip(), 4, top_k=2, noise=0.01)
        train(
            moe,
            Synthetic(),
            make_collate(moe),
            cfg(steps=2, trainable="router+experts", balance_weight=0.01, grad_checkpointing=ckpt),
            str(tmp_path / str(ckpt)),
        )
        results.append(moe.state_dict())
    for k, v in results[0].items():
        torch.testing.assert_close(v, results[1][k], atol=1e-6, rtol=0, msg=k)


def test_logit_scale_model_keeps_the_bases_temperature_fixed(tmp_path):
    model = make_tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    train(model, Synthetic(), make_collate(model), cfg(steps=2, logit_scale="model"), str(tmp_path))
    assert model.logit_scale.item() == 2.0
    with pytest.raises(ValueError, match="logit_scale='base'"):
        TrainConfig(logit_scale="base")
