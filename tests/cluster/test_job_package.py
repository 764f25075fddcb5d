"""What `launch/submit.sh` uploads as the job's working_dir, packed by Ray's own packaging
function: every file of the package (ddetr_dist/data/ included: an unanchored `data`
exclude, matched gitignore-style at every depth, once dropped it), none of the checkout's
data, runs or environments."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

from test_shell_scripts import REPO, repository_files


def submitted_runtime_env(tmp_path: Path, working_dir: Path) -> dict:
    """Run submit.sh with a stand-in `ray` that records its arguments; -> the runtime_env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "ray-args"}\n')
    (bin_dir / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_ADDRESS": "http://127.0.0.1:8265",
           "DDETR_WORKING_DIR": str(working_dir)}
    done = subprocess.run(["bash", str(REPO / "launch" / "submit.sh"), "--config", "configs/base.yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "ray-args").read_text().splitlines()
    return json.loads(args[args.index("--runtime-env-json") + 1])


def test_the_job_package_holds_every_source_file_and_no_data_runs_or_venv(tmp_path):
    checkout = tmp_path / "checkout"
    for path in repository_files():
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, checkout / path)
    for junk in ("data/coco/train/shard-000000.tar", "runs/r50/model_final.pth", ".venv/bin/python",
                 "build/msda.o"):
        (checkout / junk).parent.mkdir(parents=True, exist_ok=True)
        (checkout / junk).write_bytes(b"x")
    runtime_env = submitted_runtime_env(tmp_path, checkout)
    assert runtime_env["working_dir"] == str(checkout)

    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "package.zip"
    create_package(str(checkout), package, include_gitignore=True, excludes=runtime_env["excludes"])
    packed = set(zipfile.ZipFile(package).namelist())
    sources = {str(p) for p in repository_files() if p.parts[0] in ("ddetr_dist", "configs", "csrc")}
    assert "ddetr_dist/data/streaming.py" in sources
    assert sources - packed == set()
    assert not [name for name in packed if name.split("/")[0] in ("data", "runs", ".venv", "build")]
