"""The lock under which one process, of all the nodes sharing a build folder, builds.

Why it is not just an flock: the extension cache may sit on a shared file system (a home
directory on NFS, a Lustre or GPFS scratch), and on purpose: the build folder is named by
a hash of everything the binary depends on (build.build_spec), so nodes whose binaries
would be identical share one folder and one build instead of compiling it once each.
Their processes must then exclude each other across nodes, and there an flock cannot be
trusted: NFS mounted with local_lock=flock or nolock, and Lustre with localflock, fake it
(each node "gets" it), and Lustre with noflock refuses it. So a build folder has two locks:
- an fcntl.flock on `ddetr_build.lock` (node_lock): waiters sleep in the kernel, and the
  kernel releases it when its holder dies. Only the fast path, for the processes of one
  node; where the file system refuses it we go on without it;
- the owner record `ddetr_build.owner` (owner_record), created with O_EXCL (atomic on
  NFSv3+, Lustre, GPFS), holding the builder's host, pid namespace, pid and a token, its
  mtime refreshed every HEARTBEAT_S while held. This is the lock that counts.

A live build is never built over, so another's record is removed only when its owner is
certainly gone: a pid of this host (and pid namespace: two containers can share a host
name) that no longer runs, or a record nobody refreshed for STALE_S. Staleness is timed
by the waiter's own monotonic clock, from when it saw the record change, never by
comparing the record's mtime with the waiter's time: hosts' clocks disagree. 5 minutes is
15 missed heartbeats, well past NFS attribute caching (acregmax 60 s) or a stalled
thread; it costs time only after a builder on another host was killed (the others wait
those 5 minutes once, and say so).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

OUR_LOCK = "ddetr_build.lock"
OWNER_RECORD = "ddetr_build.owner"  # host and pid of the process building now
HEARTBEAT_S = 20.0  # the builder refreshes its record this often
STALE_S = 300.0  # a record nobody refreshed for this long (as a waiter sees it) is a dead builder's
# what a file system that refuses flock answers (Lustre noflock: ENOSYS; NFS: ENOLCK; FUSE: EOPNOTSUPP)
FLOCK_REFUSED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


@contextlib.contextmanager
def build_folder_lock(build_dir: Path, what: str) -> Iterator[None]:
    """Both locks of build_dir (see the module's docstring) for the duration."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with node_lock(build_dir / OUR_LOCK, what), owner_record(build_dir / OWNER_RECORD, what):
        yield


@contextlib.contextmanager
def node_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Exclusive flock on lock_path for the duration; waits (and says so) while another
    process holds it. Released by the kernel if this process dies. Where the file system
    refuses flock, goes ahead without it (owner_record is the lock that counts)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process %s (lock %s)", what, lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in FLOCK_REFUSED:
                raise
            logger.info("flock refused on %s (%s); relying on the owner record", lock_path, error)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def this_host() -> str:
    """The host name and pid namespace: pids mean something only within one namespace
    (two containers of one host can share a host name)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()} {namespace}"


def _read(path: Path) -> tuple[str, int] | None:
    """(content, mtime) of path, or None if it is gone."""
    try:
        with open(path) as f:
            return f.read(), os.fstat(f.fileno()).st_mtime_ns
    except FileNotFoundError:
        return None


def _owner_is_gone(content: str) -> bool:
    """Whether the record's process certainly no longer runs: it is of this host and its
    pid is free. Of another host (or half-written), only staleness tells."""
    try:
        owner = json.loads(content)
        host, pid = owner["host"], int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    if host != this_host() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _remove_if(path: Path, content: str) -> None:
    """Remove the record at path if it still holds `content` (not a newer owner's). Another
    waiter could replace it between the read and the unlink: a window of two system calls,
    open only after the owner is gone."""
    now = _read(path)
    if now is not None and now[0] == content:
        path.unlink(missing_ok=True)


def _create(path: Path, mine: str, what: str, poll_s: float) -> None:
    """Create the record at path holding `mine`, waiting while a live owner holds it and
    removing it once its owner is certainly gone."""
    seen, since, told = None, time.monotonic(), False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            state = _read(path)
            if state is None:
                continue
            if state != seen:  # written or refreshed since we last looked: alive
                seen, since = state, time.monotonic()
            idle = time.monotonic() - since
            if _owner_is_gone(state[0]) or idle > STALE_S:
                logger.warning("removing the build record %s of a builder that is gone (%s; unchanged for %.0f s)",
                               path, state[0] or "empty", idle)
                _remove_if(path, state[0])
                continue
            if not told:
                told = True
                logger.info("waiting for another process %s: %s (removed if not refreshed for %.0f s)",
                            what, state[0] or "record being written", STALE_S)
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return


@contextlib.contextmanager
def _heartbeat(path: Path) -> Iterator[None]:
    """Refresh path's mtime every HEARTBEAT_S for the duration: waiters on other hosts
    take an unchanged record for a dead builder's."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(path)
    thread = threading.Thread(target=beat, name="msda-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def owner_record(path: Path, what: str, poll_s: float = 0.2) -> Iterator[None]:
    """Hold the owner record at path (see the module's docstring) for the duration."""
    mine = json.dumps({"host": this_host(), "pid": os.getpid(), "token": uuid.uuid4().hex})
    _create(path, mine, what, poll_s)
    try:
        with _heartbeat(path):
            yield
    finally:
        _remove_if(path, mine)
