#!/usr/bin/env bash
# Creates (or refreshes) the virtual environment and installs ddetr_dist editable.
# Idempotent: a stamp file records the inputs it was built from.
# torch first, always under constraints.txt, so no other torch is ever pulled in.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.ddetr-installed"
inputs=$(cat pyproject.toml constraints.txt tools/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then exit 0; fi

# A GPU image ships its own (CUDA) torch in the system Python: keep it, never replace it.
system_torch=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
venv_flags=()
if [ -n "$system_torch" ]; then
  echo "setup: keeping the machine's torch $system_torch"
  venv_flags+=(--system-site-packages)
fi
[ -d "$VENV" ] || "$PYTHON" -m venv "${venv_flags[@]}" "$VENV"
# The venv's own copy, with the torch it really has: what pip on this node must keep
# (the cluster configs point PIP_CONSTRAINT at it, so a job's runtime_env pip uses it too).
constraints="$VENV/constraints.txt"
sed "s/^torch==.*/torch==${system_torch:-$(sed -n 's/^torch==//p' constraints.txt)}/" constraints.txt > "$constraints"
# pip's stderr without what nobody can act on, so real errors stand out: its notes about the
# machine's local indexes that may be absent, and setuptools' banners (blocks between two
# lines of "!!", e.g. about editable installs) with the warning line and source line around them.
quiet_pip_notes() {
  awk '/^WARNING: Location .* is ignored/ {next}
       /BuildBackendWarning: Editable installation/ {next}
       /^[[:space:]]*!!$/ {banner = !banner; if (!banner) source = 1; next}
       banner {next}
       source {source = 0; if ($0 ~ /^    /) next}
       {print; fflush()}'
}
pip() {
  "$VENV/bin/python" -m pip install --quiet -c "$constraints" "$@" 2> >(quiet_pip_notes >&2)
}
echo "setup: upgrading pip, setuptools, wheel in $VENV (seconds)"
pip --upgrade pip setuptools wheel
torch_pin=$(grep '^torch==' "$constraints")
echo "setup: installing ${torch_pin/==/ } (about a minute)"
pip "$torch_pin"
# editable: the op is JIT-built from csrc/ in the checkout (ddetr_dist/ops/build.py)
echo "setup: installing ddetr_dist (editable) with ray, deepspeed and the test tools (about a minute)"
pip -e '.[test]'
echo "$inputs" > "$stamp"
echo "setup: done ($VENV)"
