"""JIT build of the MSDA extension (csrc/msda) with torch.utils.cpp_extension and ninja.

Built once per node and cached under TORCH_EXTENSIONS_DIR (default
~/.cache/ddetr_dist/torch_extensions, or $XDG_CACHE_HOME/ddetr_dist/torch_extensions).
The build directory's name is a hash of everything the binary depends on (sources,
flags, torch/CUDA/Python versions, CPU instruction set, CUDA architectures), so a built
directory is never rebuilt in place while another process has the library loaded, and
nodes with different CPUs or GPUs sharing one cache never load each other's binaries.

One process builds while the others wait, under build_lock.build_folder_lock (an flock
and an owner record that hold across the nodes sharing a cache; see build_lock.py).
torch's own FileBaton (`lock` in the build directory) is an O_EXCL file that a killed
build leaves behind, and torch would then wait on it forever; a `lock` file seen while
holding our lock is stale and is removed before calling torch.

On a GPU a failed build is an error (dispatch.py), not a silent fallback to the slow
reference; `python -m ddetr_dist.ops --check [--device cuda]` builds and runs the
op once and exits non-zero with the compiler's message, e.g. in a Slurm script before
Ray starts.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, TypeVar

import torch

from .build_lock import build_folder_lock

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "msda"
CPU_SOURCES = ("msda_bindings.cpp", "msda_cpu.cpp")
CUDA_SOURCES = ("msda_cuda.cu",)
SOURCE_SUFFIXES = (".h", ".cpp", ".cu")  # every such file in SOURCE_DIR is in the cache key
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


def build_folder(spec: dict | None = None) -> Path:
    """Where this machine's build of the op lives (or will): one folder per cache key."""
    return extensions_root() / (spec or build_spec())["name"]


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
    """Run build() under the lock of build_dir, after removing a stale torch lock."""
    with build_folder_lock(build_dir, f"building {build_dir.name}"):
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
        build_dir = build_folder(spec)
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


def check(device: str, run: bool) -> str:
    """Build (or load) the op for `device` ("cpu" or "cuda"), optionally run it once against
    the reference; -> where it is. Raises BuildError saying why not."""
    if device == "cuda":
        possible, why = cuda_build_possible()
        if not possible:
            raise BuildError(why)
    extension = get_extension()
    if device == "cuda" and not extension.with_cuda:
        raise BuildError(f"the extension at {extension.__file__} has no CUDA kernels")
    if run:  # a build for the wrong GPU architectures fails only here ("no kernel image")
        from .compiled import ms_deform_attn_compiled
        from .reference import ms_deform_attn_torch

        shapes = torch.tensor([[3, 4], [2, 2]], device=device)
        args = (torch.randn(2, 16, 2, 8, device=device), shapes, torch.tensor([0, 12], device=device),
                torch.rand(2, 5, 2, 2, 2, 2, device=device), torch.rand(2, 5, 2, 2, 2, device=device))
        error = (ms_deform_attn_compiled(*args) - ms_deform_attn_torch(*args)).abs().max().item()
        if not error < 1e-4:
            raise BuildError(f"the op at {extension.__file__} runs but differs from the reference by {error:g}")
    return extension.__file__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr_dist.ops",
                                     description="Build the MSDA op (once per cache directory); exit 1 if it cannot.")
    parser.add_argument("--check", action="store_true", help="also run it once and compare with the reference")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # building / waiting for another node, on stderr
    try:
        where = check(args.device, args.check)
    except (BuildError, RuntimeError) as error:  # RuntimeError: a CUDA error while running it
        print(f"msda op: cannot be used on {args.device}: {error}", flush=True)
        return 1
    print(f"msda op: compiled ({args.device}{', checked' if args.check else ''}) at {where}", flush=True)
    return 0


if __name__ == "__main__":  # the entry is ddetr_dist/ops/__main__.py; fail loudly, not as a silent no-op
    sys.exit("run: python -m ddetr_dist.ops --check [--device cpu|cuda]")
