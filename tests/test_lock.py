"""constraints.txt pins every package setup installs (tools/lock.py), and every install path
uses it: a dependency that floats gets whatever version is newest the day a node installs."""
from __future__ import annotations

import importlib.util
import re

from test_shell_scripts import REPO

spec = importlib.util.spec_from_file_location("lock", REPO / "tools" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def test_the_lock_pins_every_package_this_venv_got_from_setup():
    # make setup installed under constraints.txt: a package missing from it (a new dependency
    # in pyproject.toml, or one of a dependency's) was installed at whatever version was newest
    wanted, pinned = lock.locked_set(), lock.read_lock()
    assert {k: v for k, v in wanted.items() if pinned.get(k) != v} == {}
    assert {"ray", "deepspeed", "torch", "grpcio", "protobuf", "pydantic", "pip"} <= set(pinned)


def test_the_closure_follows_extras_and_markers():
    closure = lock.dependency_closure()
    assert "pytest" in closure  # ddetr_dist[test]
    assert "aiohttp" in closure  # ray[default]'s
    assert "ddetr-dist" not in closure and "pyflakes" not in closure


def test_setup_installs_under_the_lock_and_leaves_a_copy_for_pip_on_the_node():
    # the Dockerfile and the launcher configs install through setup_env.sh and point
    # PIP_CONSTRAINT at the venv's copy (tests/cluster/test_cluster_configs.py)
    setup = (REPO / "tools" / "setup_env.sh").read_text()
    assert re.search(r'pip install [^\n]*-c "\$constraints"', setup)
    assert 'constraints="$VENV/constraints.txt"' in setup
    assert "bash tools/setup_env.sh" in (REPO / "Makefile").read_text()
