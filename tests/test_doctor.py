"""`ddetr --version` and `ddetr doctor`: the report a person pastes into a bug report. No
Ray cluster is started: the cluster checks meet a closed port and a port that answers but
is no Ray, which must each end in one problem line, quickly, not a traceback or a hang."""
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from ddetr_dist import doctor
from ddetr_dist.cli import main

DDETR = Path(sys.executable).parent / "ddetr"
SECRET = "s3cret-token-that-must-never-print"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doctor_json(capsys, *args: str) -> dict:
    assert main(["doctor", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_version_names_ours_and_the_stack(capsys):
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        out = capsys.readouterr().out.strip()
        assert out.startswith(f"ddetr {importlib.metadata.version('ddetr_dist')} (torch {torch.__version__}, ")
        assert f"ray {ray.__version__}" in out


@pytest.fixture(autouse=True)
def no_cluster_in_the_environment(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "DDETR_MSDA_BACKEND"):
        monkeypatch.delenv(name, raising=False)


def test_the_report_on_this_machine(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch           {torch.__version__}\n" in out and f"ray             {ray.__version__}\n" in out
    if not torch.cuda.is_available():
        assert "GPUs            none: " in out
    assert "MSDA op         " in out and "Ray cluster     not checked" in out
    assert out.rstrip().endswith("no problems found") or "problem: " in out


def test_json_in_a_subprocess_names_the_installed_versions(tmp_path):
    env = {**os.environ, "RAY_AUTH_TOKEN": SECRET}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([str(DDETR), "doctor", "--json", "--output-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    report = json.loads(done.stdout)
    versions = report["versions"]
    assert (versions["torch"], versions["ray"]) == (torch.__version__, ray.__version__)
    assert versions["deepspeed"] == importlib.metadata.version("deepspeed")
    assert versions["ddetr_dist"]["file"] == str(Path(doctor.__file__).resolve().parent)
    assert report["gpus"]["count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["op"]["state"].startswith(("built, loads", "not built yet"))
    assert report["ray"]["auth"]["token"] == "in RAY_AUTH_TOKEN"
    assert report["output_dir"]["writable"] is True


def test_an_unbuilt_op_is_reported_not_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    op = doctor_json(capsys)["op"]
    assert op["state"].startswith("not built yet") and op["folder"].startswith(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing staged


def test_output_dir_writable_missing_and_on_nfs(tmp_path, monkeypatch, capsys):
    report = doctor_json(capsys, "--output-dir", str(tmp_path))
    assert report["output_dir"]["exists"] and report["output_dir"]["writable"]
    assert list(tmp_path.iterdir()) == []  # the probe file is gone

    assert main(["doctor", "--output-dir", str(tmp_path / "missing")]) == 0
    assert f"problem: output_dir {tmp_path / 'missing'} does not exist" in capsys.readouterr().out

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nfiler:/export {tmp_path} nfs4 rw,relatime 0 0\n")
    monkeypatch.setattr(doctor, "MOUNTS_FILE", str(mounts))
    out = doctor_json(capsys, "--output-dir", str(tmp_path))["output_dir"]
    assert (out["fs"], out["mount"], out["kind"]) == ("nfs4", str(tmp_path), "shared")
    assert doctor.mount_of("/var/tmp") == ("/", "ext4")
    assert doctor.output_dir_state("/var/tmp", nodes=2, problems=(problems := []))["kind"] == "local"
    assert "local to this machine, but the cluster has 2 nodes" in problems[0]


def test_a_closed_port_is_one_problem_line_and_the_token_never_prints(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", SECRET)
    port = closed_port()
    start = time.monotonic()
    assert main(["doctor", "--address", f"127.0.0.1:{port}"]) == 0
    out = capsys.readouterr()
    assert time.monotonic() - start < 30
    assert SECRET not in out.out + out.err and "Traceback" not in out.out + out.err
    problems = [line for line in out.out.splitlines() if line.startswith("problem: ")]
    assert problems == [f"problem: Ray cluster 127.0.0.1:{port}: cannot connect ([Errno 111] Connection refused)"]
    assert "token: in RAY_AUTH_TOKEN" in out.out


def test_a_port_that_is_no_ray_answers_within_the_timeout(capsys):
    with socket.socket() as listener:  # accepts (the kernel's backlog) and never speaks
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        start = time.monotonic()
        report = doctor_json(capsys, "--address", f"127.0.0.1:{listener.getsockname()[1]}", "--timeout", "2")
    assert time.monotonic() - start < 20
    assert report["ray"]["nodes"] == [] and "no answer within 2 s" in report["problems"][-1]


@pytest.mark.parametrize("address, expected", [("HEAD-without-port", "no port in the address"),
                                               ("ray://127.0.0.1:notaport", "cannot connect")])
def test_malformed_addresses_are_problems(address, expected, capsys):
    assert expected in doctor_json(capsys, "--address", address)["problems"][-1]


@pytest.mark.parametrize("answer, expected", [
    ({"nodes": [{"address": "10.0.0.1", "alive": True, "head": True, "CPU": 16.0, "GPU": 8.0, "memory": 2**37}]},
     "  node          10.0.0.1: head, alive, 16 CPU, 8 GPU, 128.0 GiB memory"),
    ({"error": "ConnectionError: Failed to connect to Ray cluster at X", "auth": True},
     "(authentication failed); a cluster with token auth (Ray's default off localhost) wants RAY_AUTH_MODE=token"),
])
def test_what_the_ray_check_answers_is_shown(answer, expected, monkeypatch, capsys):
    """The child's answer (here stubbed: no cluster) becomes node lines, or a problem line
    that says how to join a cluster with token auth."""
    monkeypatch.setattr(doctor.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="ray noise\n" + json.dumps(answer) + "\n", stderr=""))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        assert main(["doctor", "--address", f"127.0.0.1:{listener.getsockname()[1]}"]) == 0
    assert expected in capsys.readouterr().out
