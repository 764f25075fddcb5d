#!/usr/bin/env bash
# Submit `ddetr train` to a running Ray cluster as a Ray job (`ray job submit`), then
# follow its logs until it ends (the exit code is the job's: 0 SUCCEEDED, 1 otherwise).
#
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh --config configs/base.yaml \
#       name=r50 output_dir=/shared/runs ray.num_workers=16
#
# Everything after the options goes to `ddetr train` (see `ddetr train --help`). Resume a
# stopped or failed run by submitting again with the same `name=` and `output_dir=`.
#
# Options:
#   --no-wait       submit and return (follow with `ray job logs -f ID`, stop with `ray job stop ID`)
# Environment:
#   RAY_ADDRESS        the cluster's job server, http://HEAD:8265 (required)
#   RAY_AUTH_TOKEN     the cluster's token (token authentication, which every cluster config
#                      here turns on); or the file ~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH.
#                      When one is found, RAY_AUTH_MODE=token is set for `ray job submit`
#                      (Ray's client sends no token without it)
#   DDETR_JOB_ID       the job's submission id (default: ddetr-<date>-<time>-<random>)
#   DDETR_WORKING_DIR  folder uploaded as the job's working_dir (default: this checkout: the
#                      cluster runs this code); "none" when the cluster's image has ddetr_dist
#   DDETR_PIP          extra pip requirements for the job, space-separated, installed on top of
#                      the cluster's Python (Ray's pip runtime_env keeps the cluster's torch: never
#                      list torch, or a package that pins another torch)
#   DDETR_ENV          extra environment variables for the job, "KEY=VALUE KEY2=VALUE2"
#   DDETR_PYTHON       the cluster's Python (default: python)
#
# output_dir must be a path every node mounts (NFS, Lustre, EFS) or object storage
# (s3://bucket/prefix, with credentials on every node: docs/object-storage.md): rank 0 writes
# metrics, TensorBoard and model_final.pth there and every rank its checkpoint shard.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

wait_flag=()
if [ "${1:-}" = "--no-wait" ]; then
  wait_flag=(--no-wait)
  shift
fi
if [ -z "${RAY_ADDRESS:-}" ]; then
  echo "launch/submit.sh: set RAY_ADDRESS to the cluster's job server, e.g. http://HEAD:8265" >&2
  exit 2
fi
if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] ||
                                   [ -f "$HOME/.ray/auth_token" ]; }; then
  export RAY_AUTH_MODE=token
fi
job_id=${DDETR_JOB_ID:-ddetr-$(date +%Y%m%d-%H%M%S)-$RANDOM}
working_dir=${DDETR_WORKING_DIR:-$repo}

# The runtime_env as JSON, built by Python so that quoting is never wrong.
runtime_env=$(WORKING_DIR="$working_dir" python3 - <<'PY'
import json
import os

env = {"RAY_USAGE_STATS_ENABLED": "0"}
env.update(item.split("=", 1) for item in os.environ.get("DDETR_ENV", "").split())
runtime_env = {"env_vars": env}
if os.environ["WORKING_DIR"] != "none":
    runtime_env["working_dir"] = os.environ["WORKING_DIR"]
    # what is never code: environments, data, runs, build outputs
    # (gitignore patterns: a leading / anchors one at the top; "data" alone would also drop
    # the package's own ddetr_dist/data/)
    runtime_env["excludes"] = [".git", "/.venv", "/data", "/runs", "/build", "*.so", "*.o", "__pycache__"]
pip = os.environ.get("DDETR_PIP", "").split()
if pip:
    runtime_env["pip"] = {"packages": pip, "pip_check": False}
print(json.dumps(runtime_env))
PY
)

echo "submitting job $job_id to $RAY_ADDRESS"
echo "  stop it:   ray job stop $job_id"
echo "  its logs:  ray job logs -f $job_id"
exec ray job submit --submission-id "$job_id" --runtime-env-json "$runtime_env" "${wait_flag[@]}" \
  -- "${DDETR_PYTHON:-python}" -m ddetr_dist.train "$@"
