"""constraints.txt: every package `make setup` installs, at one version.

    .venv/bin/python tools/lock.py          # rewrite constraints.txt from this venv
    .venv/bin/python tools/lock.py --check  # exit 1 naming what differs

The set is what `pip install -e '.[test]'` pulls in: ddetr_dist's requirements with their
extras, and theirs, recursively (read from the installed packages' metadata, markers
evaluated for this Python), plus the installers setup upgrades first. Pinning only torch,
ray and deepspeed let the rest float: nodes installed a month apart got other versions of
Ray's own dependencies (grpcio, protobuf, pydantic). Run it after changing pyproject.toml's
dependencies in a fresh `make setup`, and review the diff.
"""
from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
INSTALLERS = ("pip", "setuptools", "wheel")  # tools/setup_env.sh upgrades these first
HEADER = """\
# Every package setup installs, at one version (tools/lock.py writes it from a fresh venv;
# tests/test_lock.py checks it). Every install step uses it (pip -c): make setup /
# tools/setup_env.sh, the Dockerfile and the launcher configs (through setup_env.sh), and
# pip on the nodes (PIP_CONSTRAINT, set by the cluster configs, so that a job's runtime_env
# pip packages cannot replace them). One Ray, one DeepSpeed on every node: Ray refuses a
# node of another version, and DeepSpeed's checkpoint files change between releases.
# Keep ray in step with cluster/Dockerfile's FROM tag, the RayJob's rayVersion and the
# launcher images (tests/cluster/test_cluster_configs.py reads all of them).
# `tools/setup_env.sh` rewrites the torch pin to the torch already on the machine when there
# is one (a GPU image keeps its CUDA torch); 2.13.0 is the local CPU build here. torch's own
# CUDA dependencies (nvidia-*, triton) follow the torch version.
"""


def _version(name: str) -> str:
    # a local build suffix (+cpu) is the machine's, not the pin's
    return metadata.version(name).split("+")[0]


def dependency_closure(root: str = "ddetr_dist", extras: tuple[str, ...] = ("test",)) -> dict[str, str]:
    """{canonical name: installed version} of everything installing `root[extras]` pulls in."""
    found: dict[str, str] = {}
    visited: set[tuple[str, frozenset]] = set()
    pending = [(root, frozenset(extras))]
    while pending:
        name, wanted = pending.pop()
        if (canonicalize_name(name), wanted) in visited:
            continue
        visited.add((canonicalize_name(name), wanted))
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": extra})
                                                          for extra in (wanted or {""})):
                continue
            found[canonicalize_name(requirement.name)] = _version(requirement.name)
            pending.append((requirement.name, frozenset(requirement.extras)))
    found.pop(canonicalize_name(root), None)
    return found


def locked_set() -> dict[str, str]:
    pins = dependency_closure()
    pins.update({name: _version(name) for name in INSTALLERS})
    return dict(sorted(pins.items()))


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    wanted = locked_set()
    if args.check:
        have = read_lock()
        differ = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
        for name, (pinned, installed) in differ.items():
            print(f"{name}: constraints.txt has {pinned or 'no pin'}, this venv {installed}")
        return 1 if differ else 0
    LOCK.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in wanted.items()))
    print(f"constraints.txt: {len(wanted)} packages pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
