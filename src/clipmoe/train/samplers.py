"""Global-batch samplers: random batches, or MCL batches where every global batch is one pseudo-label cluster.

A *global* batch is what all ranks see together in one step; each rank takes its contiguous slice. The plan
of an epoch is a pure function of (seed, epoch), so every rank computes the same plan without
communication, and resuming mid-epoch only needs the batch position.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .config import SMALL_CLUSTER_POLICIES


@dataclass
class PlanStats:
    batches: int
    samples: int
    dropped: int  # samples that fall in no batch this epoch (cluster remainders / clusters too small)
    clusters_used: int
    clusters_dropped: int


class GlobalBatchSampler:
    """Deterministic global batches drawn within clusters.

    ``labels`` gives each sample's cluster id (``-1`` = exclude, e.g. an unreadable image); ``None`` means one
    cluster, i.e. ordinary random batches. A cluster's shuffled members are cut into batches of
    ``batch_size``. The remainder, and any cluster smaller than a batch, is handled by ``small_clusters``:

    - ``"shrink"`` (default): it becomes one smaller batch (rounded down to a multiple of the world size) if it
      holds at least ``min_batch`` samples, else it is left out this epoch. Every batch still comes from one
      cluster, so the MCL rule holds, and small clusters still teach their distinctions. Fewer negatives
      make those steps easier, which is why tiny remainders are skipped rather than trained on.
    - ``"drop"``: the official code's rule; remainders and small clusters are left out.

    Batches of all clusters are then shuffled together, so consecutive steps visit different clusters.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        labels: np.ndarray | None = None,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        small_clusters: str = "shrink",
        min_batch: int = 8,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} must be divisible by the world size {world_size}")
        if small_clusters not in SMALL_CLUSTER_POLICIES:
            raise ValueError(f"small_clusters must be one of {SMALL_CLUSTER_POLICIES}, got {small_clusters!r}")
        if labels is not None and len(labels) != num_samples:
            raise ValueError(f"{len(labels)} labels for {num_samples} samples")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.labels = np.zeros(num_samples, np.int64) if labels is None else np.asarray(labels, np.int64)
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.small_clusters = small_clusters
        self.min_batch = max(min_batch, world_size)
        self._cache: tuple[int, list[np.ndarray]] | None = None
        if not self.plan(0):
            raise ValueError(
                f"no batch of at least {self.min_batch} samples can be formed from {num_samples} samples "
                f"(batch size {batch_size}); lower the batch size or min_batch"
            )

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The global batches of ``epoch`` (index arrays), identical on every rank."""
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[np.ndarray] = []
        for cluster in np.unique(self.labels[self.labels >= 0]):
            members = rng.permutation(np.flatnonzero(self.labels == cluster))
            full = len(members) // self.batch_size
            batches.extend(members[: full * self.batch_size].reshape(full, self.batch_size))
            rest = members[full * self.batch_size :]
            if self.small_clusters == "shrink" and len(rest) >= self.min_batch:
                batches.append(rest[: len(rest) // self.world_size * self.world_size])
        order = rng.permutation(len(batches))
        plan = [batches[i] for i in order]
        self._cache = (epoch, plan)
        return plan

    def stats(self, epoch: int = 0) -> PlanStats:
        plan = self.plan(epoch)
        used = sum(len(b) for b in plan)
        clusters = np.unique(self.labels[self.labels >= 0])
        in_plan = np.unique(self.labels[np.concatenate(plan)]) if plan else np.array([])
        return PlanStats(
            len(plan), used, int((self.labels >= 0).sum()) - used, len(in_plan), len(clusters) - len(in_plan)
        )

    def __len__(self) -> int:
        return len(self.plan(0))

    def samples_in(self, batches: int) -> int:
        """Samples in the first ``batches`` global batches, over as many epochs as that takes (every epoch
        holds the same batch sizes, in another order)."""
        epochs, rest = divmod(batches, len(self))
        return epochs * self.stats(0).samples + sum(len(b) for b in self.plan(epochs)[:rest])

    def batches_for(self, samples: int) -> int:
        """The fewest global batches, from the start, that hold at least ``samples`` samples."""
        per_epoch = self.stats(0).samples
        epochs, rest = divmod(samples, per_epoch)
        if rest == 0:
            return epochs * len(self)
        seen = itertools.accumulate(len(b) for b in self.plan(epochs))
        return epochs * len(self) + next(n for n, total in enumerate(seen, 1) if total >= rest)

    def local_batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's slice of each global batch of ``epoch`` from position ``start`` on."""
        for batch in self.plan(epoch)[start:]:
            per_rank = len(batch) // self.world_size
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
