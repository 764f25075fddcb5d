"""`ddetr`: the command line. Each command lives in the module that owns its work and
exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only when chosen,
so `ddetr --help` stays instant."""
from __future__ import annotations

import argparse
import importlib
import sys

from ddetr_dist.config import did_you_mean

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ddetr_dist.train", "train (or resume) a run: Ray Train workers with DeepSpeed ZeRO"),
    "tune": ("ddetr_dist.tune", "sweep hyperparameters: a Ray Tune search (ASHA early stopping) of ddetr train runs"),
    "eval": ("ddetr_dist.eval", "COCO evaluation of a checkpoint or run on the val shards (AP table)"),
    "predict": ("ddetr_dist.predict", "detect objects in images: JSON and a drawn copy per image"),
    "demo-data": ("ddetr_dist.data.demo", "generate the built-in demo detection dataset (COCO json + jpgs + shards)"),
    "shard": ("ddetr_dist.data.shard", "write COCO images + annotations as webdataset tar shards"),
    "bench": ("ddetr_dist.bench", "benchmarks: msda (the attention op), data (the loader), train (the train loop)"),
    "export": ("ddetr_dist.export", "export a trained model to ONNX (dynamic batch and image size), checked with onnxruntime"),
    "convert-checkpoint": ("ddetr_dist.models.convert", "convert between official and ddetr_dist checkpoints"),
    "doctor": ("ddetr_dist.doctor", "report versions, GPUs, the op's build, the Ray cluster and output_dir (for bug reports)"),
}


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ddetr COMMAND [options]   (ddetr COMMAND --help for its options; ddetr --version)", "",
             "Distributed training of Deformable DETR.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"ddetr {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    if argv[0] in ("-V", "--version"):  # reads package metadata only: as instant as --help
        from ddetr_dist.doctor import version_line

        print(version_line())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"ddetr: unknown command '{name}'.{did_you_mean(name, COMMANDS)}\n\n{_overview()}", file=sys.stderr)
        return 2
    parser, module = build_parser(name)
    try:  # options may come after positional config overrides ('a.b=1 --to official')
        args = parser.parse_intermixed_args(argv[1:])
    except TypeError:  # a command taking argparse.REMAINDER (bench) cannot be intermixed
        args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
