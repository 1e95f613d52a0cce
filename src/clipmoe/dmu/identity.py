"""The identity of a training set, recorded by every stage that reads it, so that data changed between stages
is refused with what changed instead of silently shifting pseudo-labels (which are stored by sample index).

A sample's identity is its key, its image's size in bytes, the modification time of the file holding it (the
image, or its tar shard) and a CRC of its caption. A stage writes ``dataset.json.gz`` into its folder before
it starts; a later process compares the data it opens with every such record in the run directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib

IDENTITY_FILE = "dataset.json.gz"


class DataChanged(ValueError):
    """The training data differs from the one a finished or started stage of this run read."""


def dataset_identity(dataset) -> dict:
    """``{"source", "digest", "samples": [[key, size, mtime_ns, caption_crc], ...]}`` of a dataset of
    ``Record``s (readers.ImageTextDataset); one ``stat`` per file."""
    stats: dict[str, tuple[int, int]] = {}
    rows = []
    for r in dataset.records:
        if r.path not in stats:
            try:
                st = os.stat(r.path)
                stats[r.path] = (st.st_size, st.st_mtime_ns)
            except OSError:
                stats[r.path] = (-1, -1)
        size, mtime = stats[r.path]
        crc = zlib.crc32(r.caption.encode("utf-8", "surrogateescape"))
        rows.append([r.key, r.size if r.offset >= 0 else size, mtime, crc])
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return {"source": getattr(dataset, "source", ""), "digest": digest, "samples": rows}


def write_identity(folder: str, identity: dict) -> None:
    """Record ``identity`` in ``folder`` unless it holds one already (written atomically)."""
    path = os.path.join(folder, IDENTITY_FILE)
    if os.path.exists(path):
        return
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(identity, f)
    os.replace(tmp, path)


def recorded_identities(run_dir: str) -> dict[str, str]:
    """Folder (relative to the run) -> the path of its identity record, for every record in ``run_dir``."""
    found = {}
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if IDENTITY_FILE in files:
            found[os.path.relpath(root, run_dir)] = os.path.join(root, IDENTITY_FILE)
    return found


def check_identity(run_dir: str, identity: dict) -> None:
    """Raise ``DataChanged`` naming what changed if any stage of ``run_dir`` recorded other data."""
    for folder, path in recorded_identities(run_dir).items():
        with open(path, "rb") as f:
            head = f.read(2)
        if not head:
            continue
        with gzip.open(path, "rt", encoding="utf-8") as f:
            old = json.load(f)
        if old.get("digest") == identity["digest"]:
            continue
        raise DataChanged(
            f"the training data changed since {folder} read it ({describe_change(old['samples'], identity['samples'])}"
            "); stages store pseudo-labels and features by sample index, so a changed dataset would be silently "
            "misread. Restore the data, or start a new run directory"
        )


def describe_change(old: list, new: list, first: int = 5) -> str:
    """``2 samples removed (a, b), 1 added (c), 1 changed (size, mtime or caption: d)``; order when only that moved."""

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:first]) + (", ..." if len(keys) > first else "")

    before, after = {r[0]: r[1:] for r in old}, {r[0]: r[1:] for r in new}
    removed = [k for k in before if k not in after]
    added = [k for k in after if k not in before]
    changed = [k for k in before if k in after and before[k] != after[k]]
    parts = []
    if removed:
        parts.append(f"{len(removed)} sample(s) removed ({names(removed)})")
    if added:
        parts.append(f"{len(added)} added ({names(added)})")
    if changed:
        parts.append(f"{len(changed)} changed in size, file time or caption ({names(changed)})")
    if not parts:
        parts.append("the same samples in another order")
    return f"{len(old)} -> {len(new)} samples: " + "; ".join(parts)
