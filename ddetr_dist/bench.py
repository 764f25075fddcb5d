"""Benchmarks. Each prints times and ratios measured in the same run (this machine is
noisy: compare within a run, never against typed-in numbers).

  ddetr bench msda [options]   the attention op: every backend against the torch reference
  ddetr bench data [options]   the loader: shards through decode + transforms vs. loose files
  ddetr bench train [options]  training: plain PyTorch vs. the DeepSpeed engine vs. Ray + DeepSpeed
  ddetr bench onnx [options]   inference: onnxruntime running the exported model vs. PyTorch eager
  ddetr bench checkpoint [options]  what a checkpoint stalls the train loop: synchronous vs. background saves

`ddetr bench TARGET --help` lists a target's options.
"""
from __future__ import annotations

import argparse
import importlib

# Imported only when chosen: one target's dependencies never break another's.
TARGETS = {"msda": "ddetr_dist.ops.bench", "data": "ddetr_dist.data.bench", "train": "ddetr_dist.on_ray.bench",
           "onnx": "ddetr_dist.engine.onnx_bench", "checkpoint": "ddetr_dist.on_ray.checkpoint_bench"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=list(TARGETS), help="what to benchmark")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the target's options")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(TARGETS[args.target])
    parser = argparse.ArgumentParser(prog=f"ddetr bench {args.target}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
