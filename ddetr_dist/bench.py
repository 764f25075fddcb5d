"""Benchmarks. Each prints times and ratios measured in the same run (this machine is
noisy: compare within a run, never against typed-in numbers).

  ddetr bench msda   the attention op: every backend against the torch reference
  ddetr bench data   the loader: shards through decode + transforms vs. loose files
"""
from __future__ import annotations

import argparse
import importlib

TARGETS = {"msda": "ddetr_dist.ops.bench", "data": "ddetr_dist.data.bench"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", required=True, metavar="{" + ",".join(TARGETS) + "}")
    for name, module_name in TARGETS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                           description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_module=module)


def run(args: argparse.Namespace) -> int:
    return args._module.run(args)
