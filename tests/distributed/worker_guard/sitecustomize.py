"""Test aid: a Ray worker whose file system lacks the driver's folders, on one machine.

Put this folder first on PYTHONPATH of a driver that starts a local Ray; its workers then
import this at start-up. With DDETR_TEST_WORKERS_CANNOT_WRITE=<dir> set, each Ray worker
process (Ray's default_worker.py, not the driver) refuses, through an audit hook, to create,
write or rename anything under <dir>, as a worker on another node could not, and touches
<DDETR_TEST_GUARD_MARKS>/<pid> so a test can see the guard was there."""
import os
import sys

_FORBIDDEN = os.environ.get("DDETR_TEST_WORKERS_CANNOT_WRITE")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under(path) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False  # a file descriptor
    # abspath, not realpath: string work only (a hook must not raise more audited events)
    path = os.path.abspath(os.fsdecode(path))
    return path == _FORBIDDEN or path.startswith(_FORBIDDEN + os.sep)


def _writes(event: str, args: tuple) -> list:
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        return [path] if writing else []
    if event in ("os.mkdir", "os.remove", "os.rmdir"):
        return [args[0]]
    if event == "os.rename":
        return [args[0], args[1]]
    return []


def _guard(event: str, args: tuple) -> None:
    for path in _writes(event, args):
        if _under(path):
            raise PermissionError(f"Ray worker {os.getpid()} wrote {path}: "
                                  "workers may not see the driver's file system")


if _FORBIDDEN and sys.argv and sys.argv[0].endswith("default_worker.py"):
    _FORBIDDEN = os.path.abspath(_FORBIDDEN)
    marks = os.environ.get("DDETR_TEST_GUARD_MARKS")
    if marks:
        os.makedirs(marks, exist_ok=True)
        open(os.path.join(marks, str(os.getpid())), "w").close()
    sys.addaudithook(_guard)
