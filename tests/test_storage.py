"""Object storage against a real S3-compatible server (SeaweedFS on 127.0.0.1): the store
itself, the checks before a run starts, a run directory's working copy going up
(engine/run_store.py), and checkpoints fetched back for eval/predict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddetr_dist.config import ConfigError, check_training_config, load_config
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.engine.run_store import RunStore, local_copy
from ddetr_dist.storage import Store, StoreError, staged_uri, staging_dir


def test_files_go_up_and_come_back_whole(s3_env, tmp_path):
    store = Store(f"s3://{s3_env}/runs/a")
    local = tmp_path / "big.bin"
    local.write_bytes(bytes(range(256)) * 70_000)  # 17.9 MB: more than one chunk and one part
    store.upload(local, "x/big.bin")
    store.write_bytes("x/y/small.txt", b"hello")
    assert store.files() == {"x/big.bin": local.stat().st_size, "x/y/small.txt": 5}
    assert store.size("x/big.bin") == local.stat().st_size and store.size("nothing") is None
    assert sorted(store.entries("x")) == ["big.bin", "y"] and store.is_dir("x") and store.is_file("x/y/small.txt")
    back = tmp_path / "back" / "big.bin"
    assert store.download("x/big.bin", back) and back.read_bytes() == local.read_bytes()
    assert not store.download("x/none", tmp_path / "none") and not (tmp_path / "none").exists()


def test_a_missing_bucket_bad_credentials_and_no_server_are_told_apart(s3_env, s3_server, monkeypatch):
    Store(f"s3://{s3_env}/runs").check_writable("output_dir")  # the good case writes and cleans up its probe
    assert Store(f"s3://{s3_env}/runs").files() == {}
    with pytest.raises(StoreError, match="the bucket 'no-such-bucket' does not exist at the endpoint http://127"):
        Store("s3://no-such-bucket/runs").check_writable("output_dir")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreError, match="refused the credentials"):
        Store(f"s3://{s3_env}/runs").check_writable("output_dir")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StoreError, match="cannot be reached"):
        Store(f"s3://{s3_env}/runs").check_writable("output_dir")


@pytest.mark.parametrize("output_dir, message", [
    ("s3:/bkt/runs", "looks like a URI that lost a '/' after its scheme: write 's3://bkt/runs'"),
    ("nosuchscheme://bkt/runs", "not a URI pyarrow's file systems take (scheme 'nosuchscheme'); use one of s3://"),
])
def test_output_dirs_that_cannot_be_a_store_are_refused_by_name(output_dir, message):
    cfg = load_config(None, [f"output_dir={output_dir}"])
    with pytest.raises(ConfigError, match="config key 'output_dir'") as e:
        check_training_config(cfg)
    assert message in str(e.value)


def test_a_uri_output_dir_is_a_run_in_the_store_with_a_node_local_working_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("DDETR_STAGING_DIR", str(tmp_path / "staging"))
    cfg = load_config(None, ["output_dir=s3://bkt/team/runs/", "name=r1"])
    run = RunDir.of(cfg)
    assert run.store_uri == "s3://bkt/team/runs/r1" and run.where == run.store_uri
    assert run.path == tmp_path / "staging" / "s3" / "bkt" / "team" / "runs" / "r1"
    assert run.uri_of(run.metrics) == "s3://bkt/team/runs/r1/metrics.jsonl"
    assert RunDir.at(run.where) == run and staged_uri(run.path) == run.store_uri
    assert RunDir(run).store_uri == run.store_uri  # a copy keeps it


def _working_copy(run: RunDir) -> None:
    run.path.mkdir(parents=True)
    run.config.write_text("name: r\n")
    run.metrics.write_text('{"step": 1}\n')
    (run.eval_at(5).path).mkdir(parents=True)
    run.eval_at(5).detections.write_text("[]")
    run.eval_at(5).metrics.write_text("{}")
    (run.path / "checkpoint_000000005_abc").mkdir()  # Ray uploads these itself
    (run.path / "checkpoint_000000005_abc" / "meta.json").write_text("{}")
    (run.path / "metrics.jsonl.tmp").write_text("half")  # a write in progress


def test_a_push_sends_what_changed_markers_last_and_never_checkpoints(s3_env, monkeypatch):
    run = RunDir.at(f"s3://{s3_env}/runs/r")
    _working_copy(run)
    run_store, sent = RunStore(run), []
    upload = Store.upload
    monkeypatch.setattr(Store, "upload", lambda self, local, name: (sent.append(name), upload(self, local, name)))
    run_store.push()
    assert sorted(sent) == ["config.yaml", "eval/00000005/detections.json", "eval/00000005/metrics.json",
                            "metrics.jsonl"]
    assert sent[-1] == "eval/00000005/metrics.json"  # its presence says the evaluation is complete
    sent.clear()
    with open(run.metrics, "a") as f:
        f.write('{"step": 2}\n')
    run_store.push()
    run_store.push(every_s=3600)  # too soon: nothing
    assert sent == ["metrics.jsonl"]
    assert Store(run.store_uri).read_bytes("metrics.jsonl") == run.metrics.read_bytes()
    # a new process (another node, a restart) does not send again what the store has
    sent.clear()
    RunStore(run).push()
    assert sent == []


def test_a_pull_takes_the_stores_copy_and_drops_a_stale_one(s3_env):
    run = RunDir.at(f"s3://{s3_env}/runs/r")
    _working_copy(run)
    RunStore(run).push()
    run.metrics.write_text('{"step": 1}\n{"step": 2, "left by an earlier attempt on this node": 1}\n')
    RunStore(run).pull(run.metrics, run.final_metrics)
    assert run.metrics.read_text() == '{"step": 1}\n' and not run.final_metrics.exists()
    assert RunStore(run).has(run.config) and not RunStore(run).has(run.final_model)


def _checkpoint(store: Store, folder: str, step: int, complete: bool = True) -> None:
    store.write_bytes(f"{folder}/portable.pt", f"weights {step}".encode())
    if complete:
        store.write_bytes(f"{folder}/meta.json", json.dumps({"step": step}).encode())


def test_eval_and_predict_fetch_the_newest_complete_checkpoint_of_a_run_in_the_store(s3_env):
    from ddetr_dist.engine.inference import resolve_weights

    uri = f"s3://{s3_env}/runs/r"
    store = Store(uri)
    store.write_bytes("config.yaml", b"name: r\n")
    _checkpoint(store, "checkpoint_000000010_aa", 10)
    _checkpoint(store, "checkpoint_000000020_bb", 20)
    _checkpoint(store, "checkpoint_000000030_cc", 30, complete=False)  # still uploading
    weights, run_dir = resolve_weights(uri)
    assert weights == staging_dir(uri) / "checkpoint_000000020_bb" / "portable.pt"
    assert weights.read_bytes() == b"weights 20" and Path(run_dir) == staging_dir(uri)
    assert (Path(run_dir) / "config.yaml").read_text() == "name: r\n"
    assert RunStore(RunDir.at(uri)).newest_checkpoint() == "checkpoint_000000020_bb"
    # once 30 is complete, a second fetch takes it and leaves no older folder to pick from
    _checkpoint(store, "checkpoint_000000030_cc", 30)
    weights, _ = resolve_weights(uri)
    assert weights.read_bytes() == b"weights 30"
    assert [p.name for p in RunDir(run_dir).checkpoint_folders()] == ["checkpoint_000000030_cc"]
    # one checkpoint folder, or one file, with the run's config beside
    folder = local_copy(f"{uri}/checkpoint_000000010_aa")
    assert (folder / "portable.pt").read_bytes() == b"weights 10" and (folder.parent / "config.yaml").is_file()
    store.write_bytes("model_final.pth", b"final")
    assert resolve_weights(f"{uri}/model_final.pth")[0].read_bytes() == b"final"
    with pytest.raises(FileNotFoundError, match="checkpoint not found: s3://"):
        resolve_weights(f"{uri}/nothing-here")


def test_training_into_a_missing_bucket_or_with_refused_keys_stops_before_ray_starts(s3_env, s3_server, tiny_data,
                                                                                     tmp_path):
    from distributed.ray_helpers import run_train, write_tiny_config

    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, "s3://no-such-bucket/runs", "r")
    env = {**s3_server.env, "DDETR_STAGING_DIR": str(tmp_path / "staging")}
    missing = run_train(config, env=env, timeout=120)
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert "config key 'output_dir' = 's3://no-such-bucket/runs': the bucket 'no-such-bucket' does not exist" \
        in missing.stderr
    refused = run_train(config, f"output_dir=s3://{s3_env}/runs", env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"},
                        timeout=120)
    assert refused.returncode == 2 and "the store refused the credentials" in refused.stderr, refused.stderr[-3000:]
    for done in (missing, refused):
        assert "starting a local Ray" not in done.stderr + done.stdout
    assert not (tmp_path / "staging").exists() and not Path("s3:").exists()


def test_a_sweep_into_object_storage_is_refused_before_anything_starts(monkeypatch):
    from ddetr_dist.on_ray import tune

    monkeypatch.setattr(tune, "check_before_start", lambda cfg: pytest.fail("checked the store: too late"))
    with pytest.raises(ConfigError, match="`ddetr tune` keeps its sweep on a file system"):
        tune.run_sweep(load_config(None, ["output_dir=s3://bkt/sweeps"]), sweep=None)


def test_a_nodes_working_copy_starts_empty_so_leftovers_never_reach_the_store(s3_env):
    # an earlier run of this name, since deleted from the store, left files on this node
    run = RunDir.at(f"s3://{s3_env}/runs/r")
    _working_copy(run)
    run_store = RunStore(run)
    run_store.start_empty()
    run.config.write_text("name: r\n")
    run_store.push()
    assert sorted(Store(run.store_uri).files()) == ["config.yaml"]
