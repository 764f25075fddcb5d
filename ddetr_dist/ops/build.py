"""JIT build of the MSDA extension (csrc/msda) with torch.utils.cpp_extension and ninja.

Built once per node and cached under TORCH_EXTENSIONS_DIR (default
~/.cache/ddetr_dist/torch_extensions, or $XDG_CACHE_HOME/ddetr_dist/torch_extensions).
The build directory's name is a hash of everything the binary depends on (sources,
flags, torch/CUDA/Python versions, CPU instruction set, CUDA architectures), so a built
directory is never rebuilt in place while another process has the library loaded, and
nodes with different CPUs or GPUs sharing one cache never load each other's binaries.

One process builds, the others wait: an fcntl.flock on our own lock file in the build
directory (on NFS, Linux maps flock to a POSIX lock the server arbitrates, so nodes
sharing one cache wait for each other too). The kernel releases a flock when its
holder dies, so a killed build leaves no lock behind that blocks anyone. torch's own
FileBaton (`lock` in the build directory) is an O_EXCL file that a killed build *does*
leave behind, and torch would then wait on it forever; as every builder takes our flock
first, a `lock` file seen while holding it is stale and is removed before calling torch.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, TypeVar

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "msda"
CPU_SOURCES = ("msda_bindings.cpp", "msda_cpu.cpp")
CUDA_SOURCES = ("msda_cuda.cu",)
SOURCE_SUFFIXES = (".h", ".cpp", ".cu")  # every such file in SOURCE_DIR is in the cache key
OUR_LOCK = "ddetr_build.lock"
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
FALLBACK_HINT = "fall back to the pure-PyTorch reference with backend='torch' or DDETR_MSDA_BACKEND=torch"

T = TypeVar("T")


class BuildError(RuntimeError):
    """The compiled MSDA extension cannot be built or loaded here."""


def cuda_build_possible() -> tuple[bool, str]:
    """(whether the CUDA kernels can be compiled, why not)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False, (f"this PyTorch ({torch.__version__}) is a CPU-only build (torch.version.cuda is None), "
                       "so CUDA extensions cannot be built against it")
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return True, ""


def extensions_root() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ddetr_dist" / "torch_extensions"


def _cpu_isa() -> str | None:
    """The CPU's feature flags, or None where they cannot be read (then no -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return None


def _cuda_archs() -> str:
    """What torch will compile CUDA code for: TORCH_CUDA_ARCH_LIST, else the visible GPUs."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                for i in range(torch.cuda.device_count())}))
    return "default"


def build_spec() -> dict:
    """Sources and flags of the build for this machine, and the cache key they hash to."""
    with_cuda, _ = cuda_build_possible()
    isa = _cpu_isa()
    # -march=native: AVX vectors for the channel loops, F16C for float16 loads, SSE4.1
    # rounding for floor(). It buys 10-15% over baseline x86-64 (the kernels mostly wait
    # on memory), and it is safe only because the CPU's flags are in the cache key: a node
    # with another CPU gets its own build instead of dying on SIGILL. Where the flags
    # cannot be read we stay portable.
    cflags = ["-O3", "-fopenmp"] + (["-march=native"] if isa else [])
    if with_cuda:
        cflags.append("-DMSDA_WITH_CUDA")
    spec = {
        # names, not paths: the same sources in another checkout (a Ray job's uploaded
        # working_dir lands in a new folder each time) hash to the same build
        "sources": list(CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())),
        "extra_cflags": cflags,
        "extra_cuda_cflags": ["-O3"] if with_cuda else [],
        "extra_ldflags": ["-fopenmp"],
        "with_cuda": with_cuda,
    }
    digest = hashlib.sha256()
    for path in sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    identity = [repr(sorted(spec.items())), torch.__version__, str(torch.version.cuda), sys.version,
                platform.machine(), isa or "portable", _cuda_archs() if with_cuda else "cpu"]
    digest.update("\0".join(identity).encode())
    spec["name"] = "ddetr_msda_" + digest.hexdigest()[:16]
    return spec


@contextlib.contextmanager
def node_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Exclusive flock on lock_path for the duration; waits (and says so) while another
    process holds it. Released by the kernel if this process dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process %s (lock %s)", what, lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stage_sources(build_dir: Path) -> Path:
    """Copy csrc/msda into the build folder and build from there: ninja keys its work by the
    source paths, so building from each checkout's own csrc (or each upload of a Ray job's
    working_dir) would recompile everything. Files are rewritten only when they differ, so
    their times stay and ninja's up-to-date checks hold."""
    staged = build_dir / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for path in SOURCE_DIR.iterdir():
        if path.suffix in SOURCE_SUFFIXES:
            target = staged / path.name
            data = path.read_bytes()
            if not target.exists() or target.read_bytes() != data:
                target.write_bytes(data)
    return staged


def locked_build(build_dir: Path, build: Callable[[], T]) -> T:
    """Run build() under the node lock of build_dir, after removing a stale torch lock."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with node_lock(build_dir / OUR_LOCK, f"building {build_dir.name}"):
        stale = build_dir / TORCH_LOCK
        if stale.exists():
            logger.warning("removing stale torch extension lock %s (left by a killed build)", stale)
            stale.unlink(missing_ok=True)
        return build()


def use_our_ninja() -> None:
    """Put the ninja of our Python environment first on PATH (for this process and what it
    starts). Two ninja versions sharing a build folder (a system 1.11 and the pip 1.13, say,
    picked by each process's PATH) hash commands differently and each rebuilds everything
    the other built: our op, and DeepSpeed's JIT ops too."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if not path.startswith(ninja.BIN_DIR + os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def _build_and_load(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    build_dir = extensions_root()
    try:
        spec = build_spec()
        build_dir = build_dir / spec["name"]
        first_time = not any(build_dir.glob("*.so"))
        if first_time:
            logger.info("building the MSDA extension in %s (about a minute, once per node)", build_dir)
        start = time.perf_counter()
        use_our_ninja()

        def build() -> ModuleType:
            staged = stage_sources(build_dir)
            return cpp_extension.load(
                name=spec["name"], sources=[str(staged / name) for name in spec["sources"]],
                extra_cflags=spec["extra_cflags"], extra_cuda_cflags=spec["extra_cuda_cflags"],
                extra_ldflags=spec["extra_ldflags"], build_directory=str(build_dir), with_cuda=spec["with_cuda"],
                verbose=verbose)

        module = locked_build(build_dir, build)
    except Exception as error:  # compiler errors arrive as RuntimeError, missing files/tools as others
        raise BuildError(f"could not build the MSDA extension in {build_dir}: {type(error).__name__}: {error}\n"
                         f"To {FALLBACK_HINT}.") from error
    if first_time:
        logger.info("built the MSDA extension in %.0f s", time.perf_counter() - start)
    return module


_lock = threading.Lock()
_extension: ModuleType | None = None
_failure: BuildError | None = None


def get_extension() -> ModuleType:
    """The loaded extension, building it on first use. A failed build is remembered and
    re-raised rather than retried on every call."""
    global _extension, _failure
    with _lock:
        if _extension is None and _failure is None:
            verbose = os.environ.get("DDETR_MSDA_BUILD_VERBOSE", "") not in ("", "0")
            try:
                _extension = _build_and_load(verbose)
            except BuildError as error:
                _failure = error
        if _failure is not None:
            raise _failure
        return _extension
