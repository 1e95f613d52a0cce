"""One process at a time per run directory: an exclusive lock held for the life of the process.

The lock is ``flock`` on ``<folder>/.lock``, which the kernel drops when the holder exits in any way
(including SIGKILL), so a lock left by a dead run is never mistaken for a live one. The file records the
holder's PID, host and start time, for the message a second run gets. Where the file system offers no
``flock`` (some network mounts), the recorded PID and host decide: a lock whose process is gone from this
host is stale and taken over; one from another host is respected.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # real path of a locked folder -> the open descriptor holding it (this process)


class FolderLocked(ValueError):
    """Another live process holds the folder's lock."""


def lock_folder(folder: str) -> None:
    """Take ``folder``'s lock for the rest of this process (created if needed); re-entrant within a process.
    Raises ``FolderLocked`` naming the holder when another process has it."""
    os.makedirs(folder, exist_ok=True)
    real = os.path.realpath(folder)
    if real in _held:
        return
    path = os.path.join(real, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLocked(_message(folder, _holder(fd))) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            holder = _holder(fd)  # no flock here: the recorded PID and host decide
            if holder and _alive(holder):
                raise FolderLocked(_message(folder, holder)) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _held[real] = fd
    atexit.register(_release, real)


def _release(real: str) -> None:
    fd = _held.pop(real, None)
    if fd is not None:
        try:
            os.ftruncate(fd, 0)  # an empty file: free, also for hosts that only read PIDs
        finally:
            os.close(fd)  # drops the flock; the file stays (unlinking it would race with a waiting process)


def _holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here: respect it
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _message(folder: str, holder: dict | None) -> str:
    who = (
        f"process {holder.get('pid')} on {holder.get('host')}, running since {holder.get('since')}"
        if holder
        else "another process"
    )
    return f"{folder} is in use by {who}; wait for it to finish or use another run directory"
