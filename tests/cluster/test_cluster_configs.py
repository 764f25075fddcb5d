"""The deployment files in cluster/: the Ray cluster launcher configs pass Ray's own config
checks (as `ray up` runs them) and can fail them; the KubeRay RayJob has what KubeRay needs,
GPUs for its workers and one shared volume at its output_dir; and every command in these files
names things that exist here, down to a `ddetr train` config that loads. CPU only, no network.
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path, PurePosixPath

import click
import jsonschema
import pytest
import yaml

from ddetr_dist.config import ConfigError

from .deploy_checks import REPO, CommandChecker, check_python_snippet, setup_env_venv, simple_commands, usage_lines

CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["gpu-cloud.yaml", "on-prem.yaml"]
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
PVC = CLUSTER / "kuberay-pvc.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
# every command list of a launcher config (node type-level overrides are not used here)
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # as `ray up` and kubectl read them


def resolve_like_ray_up(config: dict) -> dict:
    """What `ray up` does to a config before it touches a machine. For the local provider
    that is `_bootstrap_config` itself. For AWS it is the same minus the steps that call AWS
    (instance-type resource detection, IAM/subnet/security-group bootstrap): `prepare_config`
    (Ray's defaults for the provider, setup commands merged, docker and min/max workers
    checked) then `validate_config` (ray/autoscaler/ray-schema.json plus Ray's own rules)."""
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(config)
    if config["provider"]["type"] == "local":
        return _bootstrap_config(config, no_config_cache=True)
    resolved = prepare_config(config)
    validate_config(resolved)
    return resolved


def launcher_root(config: dict) -> str:
    """Where file_mounts puts this checkout ('.') on the nodes."""
    roots = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert len(roots) == 1, f"file_mounts should send the checkout '.' once: {config['file_mounts']}"
    return roots[0]


def image_root() -> str:
    """Where cluster/Dockerfile copies this checkout (the build context '.')."""
    copies = re.findall(r"^COPY\s+(?:--\S+\s+)*\.\s+(\S+)\s*$", DOCKERFILE.read_text(), re.M)
    assert len(copies) == 1, "cluster/Dockerfile should COPY the build context '.' once"
    return copies[0]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def under(path: str, folder: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(folder))


def shared_bind_mounts(config: dict) -> list[str]:
    """Host folders the container sees at the same path (docker run -v X:X)."""
    options = " ".join(config["docker"].get("run_options", []))
    return [src for src, dst in re.findall(r"-v\s+([^:\s]+):([^:\s]+)", options) if src == dst]


# ------------------------------------------------------------------ launcher configs


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(name):
    resolved = resolve_like_ray_up(load_yaml(CLUSTER / name))
    assert resolved["head_node_type"] in resolved["available_node_types"]
    # the install runs on the head and on every worker once Ray merged setup_commands in
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("tools/setup_env.sh" in c for c in resolved[key]), f"{key} does not install the package"


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c.update(setup_comands=["true"]), jsonschema.ValidationError),  # a misspelt key
    (lambda c: c["docker"].update(imag="x"), jsonschema.ValidationError),  # a key docker does not have
    (lambda c: c["setup_commands"].append({"echo": "a"}), jsonschema.ValidationError),  # YAML read `a: b` as a mapping
    (lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9), ValueError),  # > global max_workers
], ids=["misspelt key", "unknown docker key", "command parsed as mapping", "no resources", "min above max"])
def test_ray_validation_rejects_broken_copies(break_it, error):
    config = load_yaml(CLUSTER / "gpu-cloud.yaml")
    break_it(config)
    with pytest.raises(error):
        resolve_like_ray_up(config)


def test_ray_validation_rejects_a_broken_on_prem_copy():
    config = load_yaml(CLUSTER / "on-prem.yaml")
    config["provider"]["worker_ip"] = config["provider"].pop("worker_ips")
    with pytest.raises(click.ClickException, match="worker_ips"):  # how Ray's cli_logger.abort stops `ray up`
        resolve_like_ray_up(config)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_commands_name_what_exists(name):
    config = load_yaml(CLUSTER / name)
    checker = CommandChecker(launcher_root(config))
    for key in COMMAND_KEYS:
        for command in config.get(key, []):
            checker.check(command)
    for line in usage_lines(CLUSTER / name):
        checker.check(line, cwd_in_repo=True)
    checked = checker.checked
    assert {"tools/setup_env.sh", "configs/base.yaml"} <= {p.as_posix() for p in checked.repo_files}
    used = {name_: params for name_, params in checked.ray_commands}
    for step in ("up", "down"):  # documented with this very file
        assert used.get(step, {}).get("cluster_config_file") == f"cluster/{name}", f"no `ray {step} cluster/{name}`"
    assert "job submit" in used and checked.train_configs, "no `ray job submit -- ddetr train ...` example"
    assert "start" in used  # the nodes' Ray, started from the venv's Python


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_runs_write_to_storage_every_node_mounts(name):
    """Rank 0 writes metrics and model_final.pth, every worker its checkpoint part, under
    <output_dir>/<name>/: it must be the shared file system, which the host mounts (or checks)
    before the container starts and the container sees at the same path."""
    config = load_yaml(CLUSTER / name)
    shared = shared_bind_mounts(config)
    assert shared, "docker.run_options should bind the shared file system at the same path"
    init = " ; ".join(config.get("initialization_commands", []))
    assert all(any(cmd[:3] == ["mountpoint", "-q", mount] for cmd in simple_commands(init)) for mount in shared), \
        "initialization_commands should make sure the shared file system is mounted on the host"
    checker = CommandChecker(launcher_root(config))
    for line in usage_lines(CLUSTER / name):
        checker.check(line, cwd_in_repo=True)
    for cfg in checker.checked.train_configs:
        for path in (cfg.output_dir, cfg.data.train_shards, cfg.data.val_shards):
            assert any(under(path, mount) for mount in shared), f"{path} is not on the shared file system {shared}"


def test_launcher_configs_run_the_same_container_and_checkout():
    cloud, on_prem = (load_yaml(CLUSTER / name) for name in LAUNCHER_CONFIGS)
    assert cloud["docker"]["image"] == on_prem["docker"]["image"]
    assert cloud["file_mounts"] == on_prem["file_mounts"]
    assert cloud["setup_commands"][0] == on_prem["setup_commands"][0]


def test_commands_name_the_venv_that_setup_env_makes():
    """The configs spell the venv as <checkout>/.venv: tools/setup_env.sh's default."""
    assert setup_env_venv() == ".venv"
    for name in LAUNCHER_CONFIGS:
        root = launcher_root(load_yaml(CLUSTER / name))
        assert f"{root}/.venv/bin/python" in (CLUSTER / name).read_text()


# ------------------------------------------------------------------ the command checker itself


@pytest.mark.parametrize("command, error", [
    ("cd /srv/ddetr && bash tools/setup_env.shh", AssertionError),
    ("ray start --head --dashbord-host=0.0.0.0", AssertionError),
    ("ray job submit -- ddetr train --config /srv/ddetr/configs/base.yaml train.presicion=bf16", ConfigError),
    ("ray job submit -- ddetr train --config configs/base.yaml", AssertionError),  # relative: the job's cwd is unknown
    ("ray job submit -- ddetr trian", AssertionError),
    ("/srv/ddetr/.venv/bin/python -m ray.scripts.scrips stop", AssertionError),
], ids=["missing script", "unknown ray option", "bad config key", "relative config", "unknown ddetr command",
        "missing module"])
def test_command_checker_catches(command, error):
    with pytest.raises(error):
        CommandChecker("/srv/ddetr").check(command)


def test_python_snippet_check_catches_a_missing_function():
    check_python_snippet("from ddetr_dist.ops import build; build.get_extension()", "ok")
    with pytest.raises(AssertionError, match="get_extensions"):
        check_python_snippet("from ddetr_dist.ops import build; build.get_extensions()", "typo")


# ------------------------------------------------------------------ KubeRay


def rayjob() -> dict:
    return load_yaml(RAYJOB)


def pod_specs(job: dict) -> list[tuple[str, dict]]:
    spec = job["spec"]["rayClusterSpec"]
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + \
        [(group["groupName"], group["template"]["spec"]) for group in spec["workerGroupSpecs"]]


def entrypoint_config(job: dict):
    checked = CommandChecker(image_root()).check(job["spec"]["entrypoint"])
    assert [args[0] for args in checked.ddetr_commands] == ["train"], "the entrypoint should be one `ddetr train`"
    return checked.train_configs[0]


def test_rayjob_has_what_kuberay_requires():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])  # a DNS-1123 label
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert groups, "no worker group"
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    images = set()
    for name, pod in pod_specs(job):
        assert pod["containers"], f"{name}: no containers"
        images.add(pod["containers"][0]["image"])
    assert len(images) == 1, f"head and workers should run one image (the same code and Ray): {images}"


def gpus_of(pod: dict) -> int:
    limits = pod["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def test_rayjob_workers_have_a_gpu_per_training_worker():
    job = rayjob()
    cfg = entrypoint_config(job)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for group in groups:
        assert gpus_of(group["template"]["spec"]) >= 1, f"worker group {group['groupName']}: no nvidia.com/gpu limit"
    # `ddetr train` refuses to start unless the cluster has one GPU per worker when it starts
    total = sum(group["replicas"] * gpus_of(group["template"]["spec"]) for group in groups)
    assert cfg.ray.use_gpu is not False and cfg.ray.num_workers <= total


def test_rayjob_entrypoint_is_a_ddetr_train_whose_config_loads():
    cfg = entrypoint_config(rayjob())  # ConfigError here: a bad key or value in the manifest
    assert cfg.name and cfg.train.precision in ("bf16", "fp16", "fp32")


def test_rayjob_entrypoint_with_a_bad_key_fails():
    job = rayjob()
    job["spec"]["entrypoint"] += " train.zero_stag=2"
    with pytest.raises(ConfigError, match="zero_stag"):
        entrypoint_config(job)


def test_rayjob_pods_share_one_read_write_many_volume_at_output_dir():
    job = rayjob()
    cfg = entrypoint_config(job)
    claim = load_yaml(PVC)
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert all(isinstance(v, str) for v in env.values()), "Ray takes runtime_env env_vars as strings only"
    for name, pod in pod_specs(job):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        shared = [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])
                  if claims.get(m["name"]) == claim["metadata"]["name"]]
        assert shared, f"{name}: the claim {claim['metadata']['name']} is not mounted"
        for path in (cfg.output_dir, cfg.data.train_shards, cfg.data.val_shards, env["TORCH_EXTENSIONS_DIR"]):
            assert any(under(path, mount) for mount in shared), f"{name}: {path} is not on the shared volume {shared}"


def test_image_and_manifest_commands_name_what_exists():
    root = image_root()
    instructions = dockerfile_instructions()
    workdirs = [args for op, args in instructions if op == "WORKDIR"]
    assert workdirs == [root], "RUN should work in the copied checkout"
    checker = CommandChecker(root)
    for op, args in instructions:
        if op == "RUN":
            checker.check(args, cwd_in_repo=True)
    env_path = [args for op, args in instructions if op == "ENV" and args.startswith("PATH=")]
    assert env_path and env_path[0].startswith(f"PATH={root}/{setup_env_venv()}/bin:"), \
        "the venv's bin/ should lead PATH: KubeRay runs `ray start` from it"
    for path in (DOCKERFILE, PVC, RAYJOB):
        for line in usage_lines(path):
            checker.check(line, cwd_in_repo=True)
    # at the root, where every builder reads it (BuildKit alone reads cluster/Dockerfile.dockerignore)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "data" in ignored, "the build context would carry the local venv and data"
    assert not (CLUSTER / "Dockerfile.dockerignore").exists(), "BuildKit would read it instead of .dockerignore"
    # and should a builder copy a venv all the same, the image still makes its own
    runs = [args for op, args in instructions if op == "RUN"]
    assert any(re.match(r"rm -rf \.venv && bash tools/setup_env\.sh", run) for run in runs)
    # the manifest runs the image the documented `docker build -t` makes
    built = {shlex.split(line)[shlex.split(line).index("-t") + 1] for line in usage_lines(RAYJOB) if " -t " in line}
    assert {pod["containers"][0]["image"] for _, pod in pod_specs(rayjob())} == built


def pinned(package: str) -> str:
    versions = re.findall(rf"^{package}==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    assert len(versions) == 1, f"constraints.txt should pin {package} once"
    return versions[0]


def test_every_node_gets_the_ray_that_constraints_txt_pins():
    """Nodes that install at different times must not get different Rays (a node of another
    version is refused when it joins): the pin, the image every config starts from, and the
    RayJob's rayVersion are one version."""
    ray_version = pinned("ray")
    pinned("deepspeed")
    images = [args for op, args in dockerfile_instructions() if op == "FROM"]
    images += [load_yaml(CLUSTER / name)["docker"]["image"] for name in LAUNCHER_CONFIGS]
    assert images and all(image.startswith(f"rayproject/ray:{ray_version}-") for image in images), images
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_nodes_start_with_token_auth_and_the_lock(name):
    """Every Ray the launcher starts runs with token authentication (its dashboard runs jobs,
    i.e. arbitrary code, for anyone who reaches it), with the user's token file sent to the
    node's default path, and pip on the node kept to the lock (a job's runtime_env pip too)."""
    config = load_yaml(CLUSTER / name)
    assert config["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if " start " in c]
        assert starts, f"{name}: {key} starts no Ray"
        for command in starts:
            before_start = command[:command.index(" start ")]
            assert re.search(r"\bexport [^;]*\bRAY_AUTH_MODE=token\b", before_start), \
                f"{name}: {key} starts Ray without token auth: {command}"
            assert "PIP_CONSTRAINT=/home/ray/ddetr_dist/.venv/constraints.txt" in command, command


def test_rayjob_cluster_uses_token_auth():
    assert rayjob()["spec"]["rayClusterSpec"].get("authOptions") == {"mode": "token"}


def test_the_image_keeps_pip_to_the_lock():
    env = [args for op, args in dockerfile_instructions() if op == "ENV"]
    assert "PIP_CONSTRAINT=/home/ray/ddetr_dist/.venv/constraints.txt" in env, env
