"""Nodes sharing one extension cache (NFS, Lustre) where flock is faked (every node "gets"
it) or refused: a live build is never built over nor its torch `lock` removed, wherever
its builder runs; a dead builder's record goes (at once on this host, after STALE_S
without a heartbeat from another); and on a GPU a failed build is an error with the
compiler's message instead of a silent fallback to the slow reference."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddetr_dist.errors import NotRetryable
from ddetr_dist.ops import BackendUnavailableError, build, build_lock, dispatch, resolve_backend

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def faked_flock(monkeypatch):
    """flock as NFS with local_lock=flock / Lustre localflock gives it across nodes: granted to all."""
    monkeypatch.setattr(build_lock.fcntl, "flock", lambda *args: None)


@pytest.fixture
def hosts(monkeypatch):
    """Each thread is a host of its own name (the main thread is 'node-a')."""
    def host_name():
        name = threading.current_thread().name
        return "node-a" if name == "MainThread" else name
    monkeypatch.setattr(socket, "gethostname", host_name)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def build_in_thread(build_dir: Path, name: str = "node-a") -> tuple[threading.Event, threading.Thread]:
    """locked_build(build_dir) in a thread; the event is set when its build() runs."""
    built = threading.Event()
    thread = threading.Thread(target=build.locked_build, args=(build_dir, built.set), name=name, daemon=True)
    thread.start()
    return built, thread


def record_of(build_dir: Path, host: str, pid: int) -> Path:
    """An owner record as another builder leaves it, with torch's `lock` of its build."""
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / build.TORCH_LOCK).touch()
    record = build_dir / build_lock.OWNER_RECORD
    record.write_text(json.dumps({"host": host, "pid": pid, "token": "theirs"}))
    return record


def test_a_live_build_on_another_node_is_not_built_over(tmp_path, faked_flock, hosts):
    # node-b builds; its pid means nothing here (a dead one on this host, even)
    record = record_of(tmp_path / "ext", "node-b pid:[4026531836]", dead_pid())
    built, thread = build_in_thread(tmp_path / "ext")
    assert not built.wait(1.5), "built in the folder of a live build on another node"
    assert (tmp_path / "ext" / build.TORCH_LOCK).exists(), "removed the torch lock of a live build"
    assert json.loads(record.read_text())["token"] == "theirs"
    record.unlink()  # node-b is done
    (tmp_path / "ext" / build.TORCH_LOCK).unlink()
    assert built.wait(10)
    thread.join(10)
    assert not record.exists()


def test_two_nodes_never_build_at_once(tmp_path, faked_flock, hosts):
    inside, overlaps = [], []

    def build_step():
        inside.append(threading.current_thread().name)
        if len(inside) > 1:
            overlaps.append(list(inside))
        time.sleep(0.3)
        inside.remove(threading.current_thread().name)

    threads = [threading.Thread(target=build.locked_build, args=(tmp_path / "ext", build_step), name=f"node-{n}")
               for n in "bcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert overlaps == []


def test_a_record_of_a_dead_process_on_this_host_is_removed_at_once(tmp_path, faked_flock):
    record_of(tmp_path / "ext", build_lock.this_host(), dead_pid())
    built, thread = build_in_thread(tmp_path / "ext")
    assert built.wait(5), "waited on the record of a process that no longer runs"
    thread.join(10)
    assert not (tmp_path / "ext" / build.TORCH_LOCK).exists()


def test_a_live_process_on_this_host_is_waited_for(tmp_path, faked_flock):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record_of(tmp_path / "ext", build_lock.this_host(), holder.pid)
        built, _ = build_in_thread(tmp_path / "ext")
        assert not built.wait(1.5)
    finally:
        holder.kill()
        holder.wait()
    assert built.wait(5), "the record of a killed builder was not removed"


def test_another_nodes_record_goes_only_when_nobody_refreshes_it(tmp_path, faked_flock, hosts, monkeypatch):
    monkeypatch.setattr(build_lock, "STALE_S", 1.0)
    record = record_of(tmp_path / "ext", "node-b x", 1)
    stop = threading.Event()

    def heartbeat():  # node-b's builder, alive
        while not stop.wait(0.2):
            os.utime(record)
    threading.Thread(target=heartbeat, daemon=True).start()
    built, thread = build_in_thread(tmp_path / "ext")
    assert not built.wait(2.5), "removed the record of a builder that still refreshes it"
    stop.set()  # node-b dies
    assert built.wait(10), "the record of a dead node was never removed"
    thread.join(10)


def test_the_builder_refreshes_its_record(tmp_path, faked_flock, monkeypatch):
    monkeypatch.setattr(build_lock, "HEARTBEAT_S", 0.1)
    record = tmp_path / "ext" / build_lock.OWNER_RECORD
    times = []

    def build_step():
        for _ in range(4):
            times.append(record.stat().st_mtime_ns)
            time.sleep(0.3)
    build.locked_build(tmp_path / "ext", build_step)
    assert len(set(times)) > 1


def test_a_refused_flock_still_builds_under_the_record(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(build_lock.fcntl, "flock", refuse)
    assert build.locked_build(tmp_path / "ext", lambda: "built") == "built"


# --- on a GPU a failed build is an error, not the slow reference ---------------------

@pytest.fixture
def auto(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_warned_fallback", False)


def test_a_failed_cuda_build_raises_with_the_compiler_message(monkeypatch, auto):
    def fail():
        raise build.BuildError("could not build the MSDA extension: nvcc fatal: Unsupported gpu architecture "
                               f"'compute_100'\nTo {build.FALLBACK_HINT}.")
    monkeypatch.setattr(build, "get_extension", fail)
    with pytest.raises(BackendUnavailableError, match=r"(?s)nvcc fatal: Unsupported gpu.*DDETR_MSDA_BACKEND=torch"):
        resolve_backend(None, "cuda")
    assert resolve_backend("torch", "cuda") == "torch"  # chosen explicitly: fine
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert resolve_backend(None, "cuda") == "torch"
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert resolve_backend(None, "cpu") == "torch"  # the CPU still falls back, with a warning


def test_an_unavailable_backend_is_not_retried_by_ray():
    assert issubclass(BackendUnavailableError, NotRetryable)  # each restart would rebuild and fail again


def test_an_extension_without_cuda_kernels_on_a_gpu_raises(monkeypatch, auto):
    monkeypatch.setattr(build, "get_extension", lambda: SimpleNamespace(with_cuda=False))
    monkeypatch.setattr(build, "cuda_build_possible", lambda: (False, "no CUDA toolkit found (set CUDA_HOME)"))
    with pytest.raises(BackendUnavailableError, match=r"no CUDA kernels: no CUDA toolkit found.*backend='torch'"):
        resolve_backend(None, "cuda")


# --- python -m ddetr_dist.ops ----------------------------------------------------------

def test_check_prints_where_the_op_is(monkeypatch, capsys):
    monkeypatch.setattr(build, "get_extension", lambda: SimpleNamespace(with_cuda=False, __file__="/cache/x/msda.so"))
    assert build.main(["--device", "cpu"]) == 0
    assert capsys.readouterr().out == "msda op: compiled (cpu) at /cache/x/msda.so\n"


def test_check_fails_with_the_build_error(monkeypatch, capsys):
    def fail():
        raise build.BuildError("could not build the MSDA extension: c++: command not found")
    monkeypatch.setattr(build, "get_extension", fail)
    assert build.main(["--device", "cpu"]) == 1
    assert "msda op: cannot be used on cpu: could not build the MSDA extension: c++: command not found" \
        in capsys.readouterr().out


def test_check_from_the_command_line_names_why_cuda_cannot_be_built():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch can build CUDA code")
    result = subprocess.run([sys.executable, "-m", "ddetr_dist.ops", "--check", "--device", "cuda"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("msda op: cannot be used on cuda: this PyTorch") and "CPU-only" in result.stdout
    assert result.stdout.count("\n") == 1 and "Warning" not in result.stderr, result.stdout + result.stderr


def test_the_module_path_of_build_py_is_not_a_silent_no_op():
    result = subprocess.run([sys.executable, "-m", "ddetr_dist.ops.build", "--check"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "python -m ddetr_dist.ops --check" in result.stderr
