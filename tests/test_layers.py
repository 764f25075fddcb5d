"""The package's layering, as a newcomer draws it from the folder names: every import of one
part of ddetr_dist by another goes down this list, never up or sideways (a helper that two
layers need moves down, e.g. comm.py to the top level, used by models, data and engine)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddetr_dist"
# lowest first; a part may import only from parts on lower lines
LAYERS = [
    {"atomic", "errors", "console"},
    {"storage"},  # object storage through pyarrow's file systems (no run, no config)
    {"config", "comm"},  # the config tree; torch.distributed helpers (no Ray)
    {"ops", "data"},  # the attention op; shards and loaders
    {"models"},  # the detector, its loss and checkpoints
    {"engine"},  # the per-worker loop: DeepSpeed, checkpoints, evaluation; no Ray
    {"on_ray"},  # the driver, the Ray Train worker entry, multi-worker eval, Tune
    {"train", "tune", "eval", "predict", "export", "bench", "doctor"},  # the commands
    {"cli"},  # `ddetr`, which dispatches to the commands
]
LEVEL = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def part_of(module: str) -> str:
    """ddetr_dist.engine.loop -> engine; ddetr_dist.comm -> comm."""
    return module.split(".")[1]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ddetr_dist":  # from ddetr_dist import comm
                found.update(f"ddetr_dist.{a.name}" for a in node.names)
            else:
                found.add(node.module)
    return {m for m in found if m.startswith("ddetr_dist.")}


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert parts - set(LEVEL) == set(), "place the new part in LAYERS"


def test_imports_only_go_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = part_of("ddetr_dist." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for module in imports(path):
            other = part_of(module)
            if other != me and LEVEL[other] >= LEVEL[me]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert upward == []
