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
constraints=constraints.txt
if [ -n "$system_torch" ]; then
  echo "setup: keeping the machine's torch $system_torch"
  venv_flags+=(--system-site-packages)
  constraints="$VENV/constraints.txt"
fi
[ -d "$VENV" ] || "$PYTHON" -m venv "${venv_flags[@]}" "$VENV"
if [ -n "$system_torch" ]; then
  sed "s/^torch==.*/torch==${system_torch}/" constraints.txt > "$constraints"
fi
pip=("$VENV/bin/python" -m pip install --quiet -c "$constraints")
"${pip[@]}" --upgrade pip setuptools wheel
torch_pin=$(grep '^torch==' "$constraints")
"${pip[@]}" "$torch_pin"
"${pip[@]}" -e '.[test]'
echo "$inputs" > "$stamp"
echo "setup: done ($VENV)"
