"""Distributed training on 2 CPU processes (gloo) against one process on the same global batches; then faults
under DDP (a kill and resume with dropout, NaNs met on one rank, a NaN model at save, too many bad samples in
embedding and training, a k-means failure on rank 0) in two more launches.

One torchrun launch runs every scenario of dist_worker.py while this process runs the same scenarios as a
single process, the reference. Tolerances, fp32 (measured values in docs/distributed.md):

- loss of the first global batch: 1e-6 relative;
- gradients of every optimizer step: max |difference| <= 1e-4 x max |gradient| of that tensor, + 1e-6;
- updated weights: 1e-6 absolute (lr 1e-4, so each weight moves by about 1e-4 per step), except where a step's
  gradient was below 1e-6: Adam divides by |g| + 1e-8, so there rounding noise decides the update;
- bf16 autocast: the gradient of the first step within 5% (relative norm): bf16 features rounded differently
  for a 2-sample than for a 4-sample matmul, amplified by the logit scale of 100.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import clipmoe
import dist_worker
from clipmoe.model.moe import load_balancing_loss, router_z_loss
from clipmoe.train.distributed import DistEnv
from clipmoe.train.loss import global_router_losses
from clipmoe.train.samplers import GlobalBatchSampler

WORLD = 2
TIMEOUT_S = 300  # the run takes about 20 s; a hang (a collective that never matches) ends here
WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


@dataclass
class Runs:
    out: str
    reference: dict
    returncode: int | None  # None: killed at the timeout

    def ranks(self, name: str) -> list[dict]:
        results = []
        for rank in range(WORLD):
            path = os.path.join(self.out, name, f"rank{rank}")
            if not os.path.exists(path + ".pt"):
                problem = "timed out" if self.returncode is None else f"exited with {self.returncode}"
                error = open(path + ".error").read() if os.path.exists(path + ".error") else self.log_tail()
                pytest.fail(f"rank {rank} left no result for {name!r}: the 2-process run {problem}\n{error}")
            results.append(torch.load(path + ".pt", weights_only=False))
        return results

    def log_tail(self) -> str:
        with open(os.path.join(self.out, "torchrun.log")) as f:
            return "".join(line for line in f.readlines()[-40:] if "step/s" not in line)


def launch(out: str, *scenarios: str, **env: str) -> subprocess.Popen:
    """torchrun with 2 ranks of dist_worker.py writing into ``out`` (its log: out/torchrun.log); ``env`` is
    added to the workers' environment."""
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", WORKER, out]
    with open(os.path.join(out, "torchrun.log"), "a") as log:
        # Own session, so that a timeout kills torchrun and both ranks together.
        return subprocess.Popen(
            [*cmd, *scenarios], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env}
        )


def finish(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The exit status, or None after killing the whole launch at the timeout."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    out = str(tmp_path_factory.mktemp("distributed"))
    proc = launch(out)
    try:
        reference = {
            name: scenario(os.path.join(out, "reference", name), DistEnv())
            for name, scenario in dist_worker.SCENARIOS.items()
        }
    finally:
        returncode = finish(proc, TIMEOUT_S)
    return Runs(out, reference, returncode)


def _labelled(label: str):
    return lambda message: f"{label}: {message}"


def assert_same_grads(reference: list[dict], got: list[dict], rel: float = 1e-4) -> None:
    assert len(got) == len(reference), "different number of optimizer steps"
    for step, (ref, dist) in enumerate(zip(reference, got), 1):
        assert set(dist) == set(ref), f"step {step}: other parameters got gradients"
        for name, g in ref.items():
            atol = rel * g.abs().max().item() + 1e-6
            torch.testing.assert_close(dist[name], g, rtol=0, atol=atol, msg=_labelled(f"step {step}: {name}"))


def assert_same_weights(reference: dict, got: dict) -> None:
    noisy_total = total = 0
    for name, w in reference["weights"].items():
        steps = [g[name].abs() for g in reference["grads"] if name in g]
        noisy = torch.stack(steps).amin(0) < 1e-6 if steps else torch.zeros_like(w, dtype=torch.bool)
        torch.testing.assert_close(got["weights"][name][~noisy], w[~noisy], rtol=0, atol=1e-6, msg=_labelled(name))
        noisy_total, total = noisy_total + int(noisy.sum()), total + w.numel()
    assert noisy_total < 0.25 * total, "too few weights compared"


def assert_ranks_identical(r0: dict, r1: dict) -> None:
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), f"{name} differs between ranks"


def assert_trained(result: dict) -> None:
    moved = [(w - result["initial"][n]).abs().max().item() for n, w in result["weights"].items()]
    assert max(moved) > 5e-5, "the weights did not change"


def test_mcl_step_matches_one_process(runs):
    r0, r1 = runs.ranks("mcl")
    ref = runs.reference["mcl"]
    torch.testing.assert_close(r0["loss"]["clip"], ref["loss"]["clip"], rtol=1e-6, atol=0)
    assert_same_grads(ref["grads"], r0["grads"])
    assert_same_weights(ref, r0)
    assert_ranks_identical(r0, r1)
    assert_trained(r0)
    assert all(".mlp." in n for n in r0["weights"])


def test_mcl_global_batches_each_come_from_one_cluster(runs):
    r0, r1 = runs.ranks("mcl")
    ref = runs.reference["mcl"]["seen"]
    per_rank = 8 // WORLD
    steps = len(r0["seen"]) // per_rank
    assert steps == 6 and len(r1["seen"]) == len(r0["seen"])  # one epoch: 48 samples in batches of 8
    for t in range(steps):
        local = [r["seen"][t * per_rank : (t + 1) * per_rank] for r in (r0, r1)]
        batch = local[0] + local[1]
        assert len(set(dist_worker.LABELS[batch])) == 1, f"global batch {t} mixes clusters"
        assert batch == ref[t * 8 : (t + 1) * 8], "not the batch one process trains on"
    assert sorted(r0["seen"] + r1["seen"]) == list(range(48))  # 3 clusters of 16: nothing left out


def test_router_step_matches_one_process_with_global_balance_loss(runs):
    r0, r1 = runs.ranks("router")
    ref = runs.reference["router"]
    for key in ("clip", "balance"):
        torch.testing.assert_close(r0["loss"][key], ref["loss"][key], rtol=1e-6, atol=0, msg=key)
    # The per-rank balance loss (the official code's) is another objective; global statistics remove the gap.
    assert abs(r0["loss"]["balance_per_rank"] - ref["loss"]["balance"]) > 1e-3
    assert_same_grads(ref["grads"], r0["grads"])
    assert_same_weights(ref, r0)
    assert_ranks_identical(r0, r1)
    assert_trained(r0)
    assert all(n.endswith("router.weight") for n in r0["weights"])


def test_grad_accumulation_and_checkpointing_match_one_process(runs):
    r0, r1 = runs.ranks("accum_ckpt")
    ref = runs.reference["accum_ckpt"]
    assert_same_grads(ref["grads"], r0["grads"])
    assert_same_weights(ref, r0)
    assert_ranks_identical(r0, r1)


def test_bf16_autocast_under_ddp_keeps_routers_fp32(runs):
    r0, r1 = runs.ranks("bf16")
    ref = runs.reference["bf16"]
    assert r0["router_dtypes"] == ["torch.float32"]
    first, first_ref = r0["grads"][0], ref["grads"][0]
    error = sum(((first[n] - g) ** 2).sum() for n, g in first_ref.items()) ** 0.5
    assert error < 0.05 * sum((g**2).sum() for g in first_ref.values()) ** 0.5
    assert_ranks_identical(r0, r1)
    assert_trained(r0)


def test_rank_without_tokens_for_an_expert_trains_without_hanging(runs):
    r0, r1 = runs.ranks("unused_expert")
    ref = runs.reference["unused_expert"]
    layer = "vision_model.encoder.layers.0.mlp"
    assert r1["expert_tokens"][layer][3] == 0 and r0["expert_tokens"][layer][3] > 0
    assert_ranks_identical(r0, r1)
    assert_same_grads(ref["grads"], r0["grads"])
    assert_same_weights(ref, r0)
    for part in ("w1", "b1", "w2", "b2"):  # expert 3 learnt from rank 0's tokens, and rank 1 holds the same
        name = f"{layer}.{part}"
        assert (r1["weights"][name][3] - r1["initial"][name][3]).abs().max() > 5e-5


def test_fsdp_with_checkpoint_resume_matches_one_process(runs):
    r0, r1 = runs.ranks("fsdp")
    ref = runs.reference["fsdp"]
    assert_same_grads(ref["grads"], r0["grads"])
    assert_same_weights(ref, r0)
    assert_ranks_identical(r0, r1)
    assert_trained(r0)
    assert "logit_scale" in r0["weights"]
    saved = clipmoe.load(r0["saved"])  # written from the sharded model, as the pipeline saves it
    weights = {n: p.detach() for n, p in saved.named_parameters()}
    assert_same_weights(ref, {"weights": weights})


def test_global_router_losses_equal_the_moe_losses_in_one_process():
    torch.manual_seed(0)
    logits = torch.randn(40, 4)
    mask = torch.from_numpy(np.arange(40) % 5 != 0)
    for m in (None, mask):
        balance, z = global_router_losses(logits, 2, m)
        torch.testing.assert_close(balance, load_balancing_loss(logits, 2, m))
        torch.testing.assert_close(z, router_z_loss(logits, m))


def test_sharded_embedding_fills_one_store_like_one_process(runs):
    ranks, ref = runs.ranks("embed"), runs.reference["embed"]
    for r in ranks:  # both ranks see the finished store, every row written by one of them
        for key in ("image", "text"):
            torch.testing.assert_close(r[key], ref[key], atol=1e-5, rtol=0)
        assert torch.equal(r["valid"], ref["valid"])
    assert len(ranks[0]["chunks_by_me"]) == len(ref["chunks_by_me"])  # every chunk marked done
    assert not bool(ref["valid"][3]) and bool(ref["valid"][0])  # unreadable rows are marked invalid


# ------------------------------------------------------------------------------------------------ faults
FAULT_TIMEOUT_S = 60  # the workers' collective timeout in the fault runs: a rank left waiting fails by then


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> tuple[Runs, list[int]]:
    """Two launches. The first runs the ``dropout`` scenario and SIGKILLs every rank after step 3 (its last
    checkpoint at step 2, step 3 already logged). The second repeats it (the resume), then runs it
    uninterrupted in another folder, then the NaN scenarios."""
    out = str(tmp_path_factory.mktemp("faults"))
    timeout = {"DIST_WORKER_TIMEOUT_S": str(FAULT_TIMEOUT_S)}
    killed = finish(launch(out, "dropout", DIST_WORKER_KILL_AT_STEP="3", **timeout), TIMEOUT_S)
    assert killed not in (0, None), "the killed run did not die"
    assert not os.path.exists(os.path.join(out, "dropout", "rank0.pt"))
    metrics = os.path.join(out, "dropout", "train", dist_worker.METRICS)
    logged_at_kill = [json.loads(line)["step"] for line in open(metrics)]
    scenarios = (
        "dropout",
        "dropout_uninterrupted",
        "nan_one_rank",
        "huge_lr",
        "save_nan",
        "embed_skips",
        "train_skips",
        "cluster_fails",
    )
    return Runs(out, {}, finish(launch(out, *scenarios, **timeout), TIMEOUT_S)), logged_at_kill


def test_ddp_kill_and_resume_with_dropout_equals_an_uninterrupted_run(faults):
    runs, logged_at_kill = faults
    r0, r1 = runs.ranks("dropout")
    c0, c1 = runs.ranks("dropout_uninterrupted")
    assert logged_at_kill == [1, 2, 3]  # the resume from step 2 logs step 3 again...
    train_dir = os.path.join(runs.out, "dropout", "train")
    steps = [json.loads(line)["step"] for line in open(os.path.join(train_dir, dist_worker.METRICS))]
    assert steps == [1, 2, 3, 4, 5, 6]  # ...once
    for name, w in c0["weights"].items():
        torch.testing.assert_close(r0["weights"][name], w, rtol=0, atol=1e-6, msg=_labelled(name))
    assert_ranks_identical(r0, r1)
    assert_trained(r0)
    # The ranks' generators drift apart (each rank's dropout draws as many values as its experts get tokens),
    # so the checkpoint holds one state per rank, and each rank resumed with its own (with rank 0's state on
    # both ranks the final weights differ by about 1e-3).
    assert not torch.equal(c0["rng"], c1["rng"])
    assert torch.equal(r0["rng"], c0["rng"]) and torch.equal(r1["rng"], c1["rng"])
    assert len(torch.load(os.path.join(train_dir, dist_worker.CHECKPOINT), weights_only=True)["rng"]) == WORLD


def assert_same_error_quickly(ranks: list[dict]) -> str:
    """Every rank got the same error, each within seconds (a rank left waiting at a collective would have
    failed with gloo's timeout error after FAULT_TIMEOUT_S instead)."""
    assert ranks[0]["error"] == ranks[1]["error"], [r["error"] for r in ranks]
    assert all(r["seconds"] < 10 for r in ranks), [r["seconds"] for r in ranks]
    return ranks[0]["error"]


def test_ddp_nan_on_one_rank_stops_every_rank_naming_the_sample(faults):
    ranks = faults[0].ranks("nan_one_rank")
    error = assert_same_error_quickly(ranks)
    assert error == f"train: non-finite loss (nan) at step 3 of 6; batch keys: {ranks[1]['bad']}"
    for r in ranks:  # the step-2 checkpoint, finite; step 3 neither logged nor saved
        assert r["checkpoint_step"] == 2 and r["checkpoint_finite"] and r["logged"] == [1, 2]


def test_ddp_diverging_training_stops_every_rank_at_one_step(faults):
    ranks = faults[0].ranks("huge_lr")
    error = assert_same_error_quickly(ranks)
    assert re.fullmatch(r"train: non-finite (loss \(nan\) at step \d+ of 30; batch keys: \d+, .*|weights .*)", error)
    for r in ranks:
        assert r["checkpoint_finite"] and r["logged"] and max(r["logged"]) < 30


def test_ddp_model_with_nan_is_refused_on_every_rank_and_not_written(faults):
    runs = faults[0]
    ranks = runs.ranks("save_nan")
    error = assert_same_error_quickly(ranks)
    assert error.startswith("refusing to save ") and "text_projection.weight (1)" in error
    assert not any(r["written"] for r in ranks)


def test_ddp_too_many_bad_samples_fail_every_rank_and_every_rerun_naming_them(faults):
    ranks = faults[0].ranks("embed_skips")
    bad = [f"s{i:02d}" for i in dist_worker.BAD_IMAGES]
    for run in range(2):  # the run, then the rerun over the finished chunks
        error = assert_same_error_quickly([r["runs"][run] for r in ranks])
        assert error.startswith("skipped 3 of 24 samples (12.50%, limit 1.00%)"), error
        assert all(key in error for key in bad), error  # two of them were read by rank 1 only
    assert ranks[0]["runs"][0]["error"] == ranks[0]["runs"][1]["error"]
    assert all(r["logged"] == bad and not r["done"] for r in ranks)


def test_ddp_training_counts_every_ranks_skips_and_stops_every_rank_above_the_limit(faults):
    ranks = faults[0].ranks("train_skips")
    bad = [f"s{i:02d}" for i in dist_worker.BAD_IMAGES]
    rank1 = GlobalBatchSampler(24, 8, world_size=WORLD, rank=1, seed=0, min_batch=4).local_batches(0)
    assert set(dist_worker.BAD_IMAGES) <= {i for batch in rank1 for i in batch}  # rank 0 decodes none of them
    for r in ranks:  # the stats and the log name every rank's skips
        assert r["named"] == bad and r["logged"] == bad
    error = assert_same_error_quickly(ranks)
    assert error.startswith("skipped 3 of 24 samples (12.50%, limit 1.00%)"), error


def test_ddp_cluster_failure_on_rank_0_raises_on_every_rank(faults):
    runs = faults[0]
    ranks = runs.ranks("cluster_fails")
    error = assert_same_error_quickly(ranks)
    assert error == "cannot make 3 k-means clusters from 2 samples"
    assert not any(r["written"] for r in ranks)
    assert runs.returncode == 0  # the ranks still agreed on every collective after all the failures
