"""The MSDA op: every available backend against the torch reference, forward and forward+backward.

Shapes are Deformable DETR's (ResNet-50 at 800x1216: levels 100x152, 50x76, 25x38, 13x19;
M=8 heads, D=32 channels, P=4 points): the encoder (every one of the 20197 tokens is a
query) at N=1 and N=2, and the decoder (N=2, 300 queries). Sampling locations look like
a model's: the encoder's around each token's own position, the decoder's around random
reference points, offsets of a few pixels along each head's direction.

Times are the median of --repeats runs after a warmup; ratios are against the torch
reference measured in the same run (compare within a run: this machine is shared).
On a GPU the CUDA rows also show the achieved bandwidth: the bytes an ideal kernel must
move (read every input once, write every output once) per second.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import build
from .dispatch import BACKENDS, ms_deform_attn, resolve_backend

LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))
QUICK_LEVELS = ((10, 14), (5, 7))
CPU_TARGET = 10.0  # fwd+bwd speed-up of the CPU kernel over the reference, encoder N=1


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    queries: int | None  # None: every token is a query (the encoder)
    levels: tuple[tuple[int, int], ...]
    heads: int = 8
    channels: int = 32
    points: int = 4


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("encoder N=1 (quick)", 1, None, QUICK_LEVELS), Case("decoder N=2 (quick)", 2, 20, QUICK_LEVELS)]
    return [Case("encoder N=1", 1, None, LEVELS), Case("encoder N=2", 2, None, LEVELS),
            Case("decoder N=2", 2, 300, LEVELS)]


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(case.levels, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens, n_levels, m, p = int(sizes.sum()), len(case.levels), case.heads, case.points
    if case.queries is None:  # encoder: each token's reference point is its own pixel centre
        centres = []
        for h, w in case.levels:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            centres.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        reference = torch.cat(centres)[None].expand(case.batch, tokens, 2)
    else:
        reference = torch.rand(case.batch, case.queries, 2, generator=gen)
    queries = reference.shape[1]
    # offsets in pixels: point k of head h at (k+1) px along the head's direction, plus noise
    angle = torch.arange(m) * (2 * math.pi / m)
    direction = torch.stack([angle.cos(), angle.sin()], -1)
    offsets = direction[:, None, :] * torch.arange(1, p + 1, dtype=torch.float)[None, :, None]  # [M, P, 2]
    offsets = offsets[None, None, :, None] + torch.randn(case.batch, queries, m, n_levels, p, 2, generator=gen)
    level_wh = shapes.flip(-1).float()[None, None, None, :, None, :]
    locations = reference[:, :, None, None, None, :] + offsets / level_wh
    weights = torch.randn(case.batch, queries, m, n_levels * p, generator=gen).softmax(-1)
    value = torch.randn(case.batch, tokens, m, case.channels, generator=gen)
    return {"value": value.to(device, dtype), "spatial_shapes": shapes.to(device),
            "level_start_index": starts.to(device), "sampling_locations": locations.to(device, torch.float32),
            "attention_weights": weights.view(case.batch, queries, m, n_levels, p).to(device, torch.float32)}


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    def time_once(fn):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin
    return time_once


def measure(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    time_once = _timer(device)
    for _ in range(warmup):
        time_once(fn)
    return statistics.median(time_once(fn) for _ in range(repeats))


def time_backend(inputs: dict, backend: str, device: str, repeats: int, warmup: int) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds)."""
    with torch.no_grad():
        forward = measure(lambda: ms_deform_attn(**inputs, backend=backend), device, repeats, warmup)
    leaves = {k: v.detach().requires_grad_(k in ("value", "sampling_locations", "attention_weights"))
              for k, v in inputs.items()}
    grad = torch.randn_like(ms_deform_attn(**leaves, backend=backend))

    def step():
        for leaf in leaves.values():
            leaf.grad = None
        ms_deform_attn(**leaves, backend=backend).backward(grad)
    return forward, measure(step, device, repeats, warmup)


def ideal_bytes(inputs: dict) -> tuple[int, int]:
    """(forward, backward) bytes: every input read once, every output written once."""
    def size(t):
        return t.numel() * t.element_size()
    value, loc, attn = inputs["value"], inputs["sampling_locations"], inputs["attention_weights"]
    n, _, m, d = value.shape
    out = n * loc.shape[1] * m * d * value.element_size()
    forward = size(value) + size(loc) + size(attn) + out
    backward = out + size(value) + size(loc) + size(attn) + size(value) + size(loc) + size(attn)
    return forward, backward


def available_backends(requested: list[str], devices: list[str] | None = None) -> list[tuple[str, str]]:
    """(backend, device) pairs to run: the reference and the compiled kernel per device
    (`devices`: default cpu, and cuda where there is a GPU)."""
    devices = devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs = []
    for device in devices:
        for backend in ("torch", device):
            if backend not in requested or (backend, device) in pairs:
                continue
            if backend != "torch":
                try:
                    resolve_backend(backend, device)
                except RuntimeError as error:
                    print(f"skipping backend {backend!r}: {error}")
                    continue
            pairs.append((backend, device))
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all available)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated value dtypes: float32, bfloat16, float16, float64 "
                             "(default: float32 on CPU; float32,bfloat16 with a GPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="only this device (default: cpu, and cuda with a GPU); on a GPU machine "
                             "--device cuda skips the slow CPU rows")
    parser.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write every row to PATH as JSON (make gpu-check reads it)")


def _parse(args: argparse.Namespace) -> tuple[list[str], list[torch.dtype]]:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"ddetr bench msda: unknown backend(s) {unknown}; valid: {', '.join(BACKENDS)}")
    default = "float32,bfloat16" if torch.cuda.is_available() else "float32"
    dtypes = []
    for name in (args.dtype or default).split(","):
        dtype = getattr(torch, name.strip(), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise SystemExit(f"ddetr bench msda: unknown dtype {name!r}; use float32, bfloat16, float16 or float64")
        dtypes.append(dtype)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("ddetr bench msda: --repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"ddetr bench msda: --device cuda, but this torch ({torch.__version__}) sees no CUDA device")
    return backends, dtypes


def run(args: argparse.Namespace) -> int:
    backends, dtypes = _parse(args)
    pairs = available_backends(backends, [args.device] if args.device else None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
          + f"; median of {args.repeats} after {args.warmup} warmup")
    if any(b != "torch" for b, _ in pairs):
        print(f"extension: {build.build_folder()}")
    header = (f"{'shape':<22}{'device':<7}{'dtype':<10}{'backend':<8}{'fwd ms':>10}{'fwd+bwd ms':>12}"
              f"{'fwd x':>8}{'f+b x':>8}{'fwd GB/s':>10}{'f+b GB/s':>10}")
    print(header)
    print("-" * len(header))
    target_ratio = None
    rows = []  # for --json
    for case in cases(args.quick):
        for device in dict.fromkeys(d for _, d in pairs):
            for dtype in dtypes:
                inputs = make_inputs(case, device, dtype)
                reference = None
                for backend, _ in (pair for pair in pairs if pair[1] == device):
                    fwd, fb = time_backend(inputs, backend, device, args.repeats, args.warmup)
                    if backend == "torch":
                        reference = (fwd, fb)
                    ratio = (f"{reference[0] / fwd:>8.1f}{reference[1] / fb:>8.1f}" if reference
                             else f"{'-':>8}{'-':>8}")
                    bandwidth = f"{'':>10}{'':>10}"
                    row = {"shape": case.name, "device": device, "dtype": str(dtype).split(".")[-1],
                           "backend": backend, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": fb * 1e3,
                           "fwd_speedup": reference[0] / fwd if reference else None,
                           "fwd_bwd_speedup": reference[1] / fb if reference else None}
                    if backend == "cuda":
                        fwd_bytes, bwd_bytes = ideal_bytes(inputs)
                        bandwidth = f"{fwd_bytes / fwd / 1e9:>10.0f}{(fwd_bytes + bwd_bytes) / fb / 1e9:>10.0f}"
                        row.update(fwd_gb_per_s=fwd_bytes / fwd / 1e9,
                                   fwd_bwd_gb_per_s=(fwd_bytes + bwd_bytes) / fb / 1e9)
                    rows.append(row)
                    print(f"{case.name:<22}{device:<7}{str(dtype).split('.')[-1]:<10}{backend:<8}"
                          f"{fwd * 1e3:>10.2f}{fb * 1e3:>12.2f}{ratio}{bandwidth}", flush=True)
                    if (backend, case.name, dtype) == ("cpu", "encoder N=1", torch.float32) and reference:
                        target_ratio = reference[1] / fb
    if target_ratio is not None:
        verdict = "met" if target_ratio >= CPU_TARGET else "NOT met"
        print(f"\nCPU target (fwd+bwd >= {CPU_TARGET:.0f}x the reference, encoder N=1, float32): "
              f"{verdict} ({target_ratio:.1f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "repeats": args.repeats, "warmup": args.warmup,
                       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "rows": rows},
                      f, indent=1)
    return 0
