"""shellcheck over every shell script of the repository: *.sh, *.sbatch, and files without a
suffix whose first line names a shell (.ci/run). Without shellcheck the test skips, unless CI
is set: CI installs it (tools/install_test_deps.sh) and the scripts must be checked there."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_SUFFIXES = (".sh", ".sbatch")
SHELL_SHEBANG = re.compile(rb"#!\s*(/usr/bin/env\s+)?(/bin/|/usr/bin/)?(ba|da|k)?sh\b")


def repository_files() -> list[Path]:
    """Tracked files plus new ones git does not ignore (so .venv never counts); every file
    under the repository when it is not a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=REPO, capture_output=True)
    except FileNotFoundError:  # no git
        listed = None
    if listed is None or listed.returncode != 0:
        return [p.relative_to(REPO) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]
    # --cached lists a file deleted but not yet committed: only what is there is checked
    return [Path(name) for name in listed.stdout.decode().split("\0") if name and (REPO / name).exists()]


def is_shell_script(path: Path) -> bool:
    if path.suffix in SHELL_SUFFIXES:
        return True
    if path.suffix or not (REPO / path).is_file():
        return False
    with open(REPO / path, "rb") as f:
        return bool(SHELL_SHEBANG.match(f.readline()))


SCRIPTS = sorted(p for p in repository_files() if is_shell_script(p))


def test_the_scripts_are_found():
    names = {p.as_posix() for p in SCRIPTS}
    assert {"tools/setup_env.sh", "tools/demo.sh"} <= names, names
    assert not any(".venv" in p.parts for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.as_posix() for p in SCRIPTS])
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        if "CI" in os.environ:
            pytest.fail("shellcheck is not installed, and CI must check the scripts: apt-get install -y shellcheck")
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); CI installs it and runs this")
    # -x: follow `source`d files; the repository is the working directory, as in the scripts' usage
    done = subprocess.run(["shellcheck", "-x", "--format=gcc", script.as_posix()], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"shellcheck {script}:\n{done.stdout}{done.stderr}"
