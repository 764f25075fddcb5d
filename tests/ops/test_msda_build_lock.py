"""The extension is built once per node: one process builds while the others wait on an
flock, a killed builder leaves nothing that blocks the next one (neither our flock nor
torch's own `lock` file), and processes starting together all end up with a working op."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from ddetr_dist.ops import build, build_lock

REPO = Path(__file__).resolve().parents[2]


def python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def acquire_within(lock_path: Path, seconds: float) -> bool:
    """Whether node_lock(lock_path) is obtained within `seconds` (in a thread, so a hang
    fails the test instead of freezing it)."""
    got = threading.Event()

    def take():
        with build_lock.node_lock(lock_path, "test"):
            got.set()
    threading.Thread(target=take, daemon=True).start()
    return got.wait(seconds)


def test_stale_torch_lock_file_is_removed_before_building(tmp_path):
    build_dir = tmp_path / "ext"
    build_dir.mkdir()
    (build_dir / build.TORCH_LOCK).touch()  # left by a build that was killed

    def stand_in_for_torch_load():
        # torch's own protocol: create `lock` exclusively, or wait until it disappears
        # (forever, for a stale one)
        baton = FileBaton(str(build_dir / build.TORCH_LOCK))
        assert baton.try_acquire(), "the stale lock was still there: torch would wait forever"
        baton.release()
        return "built"

    assert build.locked_build(build_dir, stand_in_for_torch_load) == "built"


def test_a_killed_builder_does_not_block_the_next(tmp_path):
    lock_path = tmp_path / "ext" / build_lock.OUR_LOCK
    holder = python(f"""
        import time
        from pathlib import Path
        from ddetr_dist.ops.build_lock import node_lock
        with node_lock(Path({str(lock_path)!r}), "test"):
            print("locked", flush=True)
            time.sleep(120)
    """)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with open(lock_path) as handle:  # really held: a non-blocking attempt fails
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert acquire_within(lock_path, 10), "the lock of a killed process was not released"


def test_processes_starting_together_all_get_a_working_op():
    build.get_extension()  # build (once per machine) before the race; the racers load it
    build_dir = build.build_folder()
    with build_lock.node_lock(build_dir / build_lock.OUR_LOCK, "test"):
        (build_dir / build.TORCH_LOCK).touch()  # as if a build had been killed mid-way
    racer = """
        import torch
        from ddetr_dist.ops import ms_deform_attn, ms_deform_attn_torch
        from ddetr_dist.ops.build import get_extension
        get_extension()
        shapes = torch.tensor([[3, 4]]); start = torch.tensor([0])
        args = (torch.randn(1, 12, 2, 4), shapes, start, torch.rand(1, 5, 2, 1, 2, 2), torch.rand(1, 5, 2, 1, 2))
        error = (ms_deform_attn(*args, backend="cpu") - ms_deform_attn_torch(*args)).abs().max().item()
        print("ok" if error < 1e-5 else f"wrong result {error}", flush=True)
    """
    racers = [python(racer, env={**os.environ, "PYTHONUNBUFFERED": "1"}) for _ in range(2)]
    outputs = []
    for process in racers:
        try:
            outputs.append(process.communicate(timeout=180)[0])
        finally:
            process.kill()
    assert [p.returncode for p in racers] == [0, 0], outputs
    assert [out.strip().splitlines()[-1] for out in outputs] == ["ok", "ok"], outputs
    assert not (build_dir / build.TORCH_LOCK).exists()
