"""`make gpu-check`: the first thing to run on a machine with a CUDA GPU (meant to take under
8 minutes on one H100/H200; the report says whether it did). One function per step:

  1. find_gpu       a CUDA build of torch that sees a GPU; else say so and exit 2, before
                    anything is built, run or written
  2. build_op       compile the MSDA op for this GPU's architecture (timed)
  3. run_gpu_tests  what `make test-gpu` runs (pytest -m gpu): the CUDA kernels against the
                    reference, and `ddetr train` on the GPU under NCCL with evaluation, bf16
                    and fp16, gradient accumulation
  4. bench_msda     `ddetr bench msda` on the GPU, float32 and bfloat16
  5. bench_train    30 bf16 training steps of configs/base.yaml (ResNet-50) on synthetic
                    800x1333 images, eagerly and compiled (train.compile's torch.compile):
                    both images/s (the last 15), the compile time and peak GPU memory
  6. one report     $DDETR_GPU_CHECK_DIR/gpu_check_report.json (default runs/gpu-check/) with
                    every number; each step's full output beside it as <step>.log

A failed step is recorded and the next one still runs (a failed test says nothing about the
benchmark's numbers, which are worth having), except after a failed build: every later step
runs the op. The exit status is then 1.

    python tools/gpu_check.py            # what `make gpu-check` runs, after `make setup`
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
REPORT_NAME = "gpu_check_report.json"
BUDGET_S = 8 * 60
NO_GPU_EXIT = 2
# configs/base.yaml from random weights (its ImageNet ResNet-50 file may not be on this machine,
# and the speed does not depend on the values): then every stage trains, with trainable
# BatchNorm, as the config check asks of a backbone without weights
BASE_FROM_SCRATCH = ["model.backbone_weights=", "model.backbone_norm=bn", "model.backbone_frozen_stages=0"]
TRAIN_IMAGE_SIZE = "800x1333"  # COCO's largest training size: the peak memory of a real run
TRAIN_STEPS = 15  # timed, after as many warm-up steps: 30 steps in all
# a hung step (a collective that never returns) must not hang the check
TIMEOUT_S = {"test_gpu": 600, "bench_msda": 300, "bench_train": 480}  # bench_train compiles the model too


class StepFailed(Exception):
    """A step ran but its result is wrong; the message says what, `numbers` what it measured."""

    def __init__(self, message: str, **numbers):
        super().__init__(message)
        self.numbers = numbers


class Check:
    """The report being filled in, and how steps run: commands in the repository, their output
    shown and kept as <step>.log."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.report: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "commit": git_commit(), "steps": {}}

    def step(self, name: str, function: Callable[["Check"], dict]) -> bool:
        print(f"\n=== gpu-check: {name} ===", flush=True)
        start = time.perf_counter()
        record: dict = {}
        try:
            record.update(function(self))
            record["ok"] = True
        except StepFailed as error:
            record.update(error.numbers, ok=False, error=str(error))
        except Exception as error:  # any failure of a step is reported, and the next step runs
            traceback.print_exc()
            record.update(ok=False, error=f"{type(error).__name__}: {error}")
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.report["steps"][name] = record
        print(f"=== {name}: {'ok' if record['ok'] else 'FAILED: ' + record['error']} ({record['seconds']} s)",
              flush=True)
        self.save()  # a check killed later still leaves what it measured
        return record["ok"]

    def run(self, name: str, command: list[str]) -> int:
        """Run `command` in the repository (inheriting TORCH_CUDA_ARCH_LIST from build_op),
        its output to the terminal and <name>.log; -> its exit status."""
        log_path = self.out_dir / f"{name}.log"
        timeout = TIMEOUT_S[name]
        print("$ " + shlex.join(command), flush=True)
        # its own process group, so that a timeout stops what it started too (Ray, train workers)
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        # copied by a thread, and the end is the process's exit, not the pipe's: a daemon it
        # left behind may hold the pipe open
        copier = threading.Thread(target=copy_lines, args=(proc.stdout, log_path), daemon=True)
        copier.start()
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise StepFailed(f"timed out after {timeout} s; output in {log_path}") from None
        finally:
            copier.join(timeout=10)
        return status

    def save(self) -> Path:
        path = self.out_dir / REPORT_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        tmp.replace(path)
        return path


def copy_lines(stream, log_path: Path) -> None:
    with open(log_path, "w") as log:
        for line in stream:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group, SIGKILL it if it is still there 15 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return done.stdout.strip() or None


def command_output(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ---------------------------------------------------------------- 1. a GPU, or stop


def find_gpu() -> tuple[dict | None, str]:
    """(the device and versions, '') where torch can use a CUDA GPU, else (None, why not).
    Imports torch and nothing of ours: this answer comes before anything is built."""
    import torch

    if torch.version.cuda is None:
        return None, f"this torch ({torch.__version__}) is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return None, (f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU: check nvidia-smi, "
                      f"that the driver supports CUDA {torch.version.cuda}, and CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")
    props = torch.cuda.get_device_properties(0)
    try:
        nccl = torch.cuda.nccl.version()
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception:  # a torch built without NCCL: the NCCL tests will say more
        nccl = None
    driver = command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "gpus": torch.cuda.device_count(),
            "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "nccl": nccl, "python": platform.python_version(),
            "host": platform.node()}, ""


# ---------------------------------------------------------------- 2. the op


def build_op(check: Check) -> dict:
    """Compile the MSDA extension (CPU + CUDA kernels) in this process, for exactly the GPUs
    here: TORCH_CUDA_ARCH_LIST is set so that the later steps' processes (pytest, Ray
    workers, benchmarks) inherit it, compute the same cache key and load this build."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
    from ddetr_dist.ops import build

    possible, why = build.cuda_build_possible()
    if not possible:
        raise StepFailed(why)
    build_dir = build.build_folder()
    cached = any(build_dir.glob("*.so"))
    nvcc = command_output([str(Path(CUDA_HOME) / "bin" / "nvcc"), "--version"])
    print(f"building the MSDA op for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} in {build_dir}"
          + (" (built before: loading it)" if cached else " (about a minute)"), flush=True)
    start = time.perf_counter()
    extension = build.get_extension()
    seconds = round(time.perf_counter() - start, 1)
    if not extension.with_cuda:
        raise StepFailed(f"the extension in {build_dir} was built without its CUDA kernels")
    return {"seconds_build": seconds, "cached": cached, "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"],
            "build_dir": str(build_dir), "cuda_home": CUDA_HOME,
            "nvcc": nvcc.splitlines()[-1] if nvcc else None}


# ---------------------------------------------------------------- 3. the GPU tests


def run_gpu_tests(check: Check) -> dict:
    """`make test-gpu` (pytest -m gpu), with a JUnit file to count from."""
    junit = check.out_dir / "test_gpu.xml"
    junit.unlink(missing_ok=True)
    status = check.run("test_gpu", [sys.executable, "-m", "pytest", "-m", "gpu", f"--junitxml={junit}",
                                    *shlex.split(os.environ.get("PYTEST_ARGS", ""))])
    if not junit.exists():
        raise StepFailed(f"pytest exited {status} without results; see {check.out_dir / 'test_gpu.log'}")
    counts = junit_counts(junit)
    if status != 0 or counts["passed"] == 0:
        raise StepFailed(f"pytest exited {status}: {counts['passed']} passed, {counts['failed']} failed, "
                         f"{counts['skipped']} skipped; failed: {', '.join(counts['failed_tests']) or '-'}", **counts)
    return counts


def junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif (skip := case.find("skipped")) is not None:
            skipped.append(f"{name}: {skip.get('message', '')}")
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"] + total["errors"], "skipped": total["skipped"],
            "pytest_seconds": round(sum(float(s.get("time", 0)) for s in suites), 1),
            "failed_tests": failed, "skipped_tests": skipped}


# ---------------------------------------------------------------- 4. the op's speed


def bench_msda(check: Check) -> dict:
    """The op on the GPU only (the CPU rows take minutes and are not what this machine is
    for), float32 and bfloat16, against the torch reference on the same GPU."""
    out = check.out_dir / "bench_msda.json"
    out.unlink(missing_ok=True)
    status = check.run("bench_msda", [sys.executable, "-m", "ddetr_dist.cli", "bench", "msda", "--device", "cuda",
                                      "--dtype", "float32,bfloat16", "--json", str(out)])
    if status != 0 or not out.exists():
        raise StepFailed(f"ddetr bench msda exited {status}; see {check.out_dir / 'bench_msda.log'}")
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["backend"] == "cuda"]
    missing = {"float32", "bfloat16"} - {r["dtype"] for r in ours}
    if missing:  # the benchmark skips a backend it cannot load; here that is a failure
        raise StepFailed(f"no CUDA-kernel rows for {sorted(missing)}; see {check.out_dir / 'bench_msda.log'}")
    return {"rows": rows}


# ---------------------------------------------------------------- 5. the model's speed


def bench_train_command(out: Path) -> list[str]:
    """Eager and compiled (--compile) in one run: both images/s and the compile time."""
    return [sys.executable, "-m", "ddetr_dist.cli", "bench", "train", "--config", "configs/base.yaml",
            "--steps", str(TRAIN_STEPS), "--synthetic", TRAIN_IMAGE_SIZE, "--compile", "--json", str(out),
            "train.precision=bf16", "model.msda_backend=cuda", *BASE_FROM_SCRATCH]


def bench_train(check: Check) -> dict:
    """`ddetr bench train --synthetic`: plain PyTorch in this one process on the GPU, the
    real model at the real image size; no shards needed."""
    out = check.out_dir / "bench_train.json"
    out.unlink(missing_ok=True)
    status = check.run("bench_train", bench_train_command(out))
    if status != 0 or not out.exists():
        raise StepFailed(f"ddetr bench train exited {status}; see {check.out_dir / 'bench_train.log'}")
    result = json.loads(out.read_text())
    row, compiled = result["rows"]  # eager, then compiled
    if row["peak_gpu_memory_gb"] is None:
        raise StepFailed("the benchmark ran on the CPU, not on the GPU")
    return {"config": result["config"], "overrides": result["overrides"], "precision": result["precision"],
            "image_size": result["synthetic"], "batch_size": result["batch_size"],
            "timed_steps": result["steps"], "warmup_steps": result["steps"],
            "images_per_s": round(row["images_per_s"], 2), "step_s": round(row["step_s"], 4),
            "images_per_s_compiled": round(compiled["images_per_s"], 2), "compile_s": result["compile_s"],
            "peak_gpu_memory_gib_compiled": round(compiled["peak_gpu_memory_gb"], 2),
            "peak_gpu_memory_gib": round(row["peak_gpu_memory_gb"], 2),
            "phases_s_per_step": {k: round(v, 4) for k, v in row["phases"].items()}}


# ---------------------------------------------------------------- the check


def main() -> int:
    gpu, why_not = find_gpu()
    if gpu is None:
        print(f"gpu-check: no CUDA GPU here: {why_not}.\n"
              "gpu-check needs a machine with an NVIDIA GPU and a CUDA build of torch (`make setup` keeps an "
              "image's CUDA torch); nothing was built or run.", file=sys.stderr)
        return NO_GPU_EXIT
    out_dir = Path(os.environ.get("DDETR_GPU_CHECK_DIR") or "runs/gpu-check").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(out_dir)
    check.report["device"] = gpu
    print(f"gpu-check: {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB) x{gpu['gpus']}, "
          f"torch {gpu['torch']}, CUDA {gpu['cuda']}, driver {gpu['driver']}; report in {out_dir}", flush=True)
    start = time.perf_counter()
    if check.step("build_op", build_op):
        for name, function in (("test_gpu", run_gpu_tests), ("bench_msda", bench_msda), ("bench_train", bench_train)):
            check.step(name, function)
    else:  # each process would try the failed build again (a minute each) and fail the same way
        print("gpu-check: the op did not build; the tests and benchmarks all run it, so they are not run", flush=True)
    seconds = round(time.perf_counter() - start, 1)
    failed = [name for name, record in check.report["steps"].items() if not record["ok"]]
    check.report.update(seconds=seconds, within_budget=seconds <= BUDGET_S, failed_steps=failed,
                        ok=not failed)
    path = check.save()
    print(summary(check.report))
    print(f"\ngpu-check {'passed' if not failed else 'FAILED (' + ', '.join(failed) + ')'} in {seconds:.0f} s"
          f"{'' if seconds <= BUDGET_S else f' (over the {BUDGET_S} s budget)'}; report: {path}")
    return 1 if failed else 0


def summary(report: dict) -> str:
    """The report's headline numbers, for the terminal."""
    steps = report["steps"]
    lines = ["", "gpu-check summary:"]
    op = steps.get("build_op", {})
    if op.get("ok"):
        lines.append(f"  op build: {op['seconds_build']} s{' (cached)' if op['cached'] else ''}, "
                     f"arch {op['arch_list']}")
    tests = steps.get("test_gpu", {})
    if "passed" in tests:
        lines.append(f"  test-gpu: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
                     f"in {tests['pytest_seconds']} s")
    for row in steps.get("bench_msda", {}).get("rows", []):
        if row["backend"] == "cuda":
            lines.append(f"  msda {row['shape']:<12} {row['dtype']:<9} fwd {row['fwd_ms']:.2f} ms, "
                         f"fwd+bwd {row['fwd_bwd_ms']:.2f} ms ({row['fwd_bwd_speedup'] or 0:.1f}x the torch reference)")
    train = steps.get("bench_train", {})
    if train.get("ok"):
        lines.append(f"  train: {train['images_per_s']} images/s, peak GPU memory {train['peak_gpu_memory_gib']} GiB "
                     f"({train['precision']}, batch {train['batch_size']}, {TRAIN_IMAGE_SIZE})")
        lines.append(f"  train compiled: {train['images_per_s_compiled']} images/s after {train['compile_s']} s "
                     f"of compiling, peak GPU memory {train['peak_gpu_memory_gib_compiled']} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
