#!/usr/bin/env bash
# The Debian packages the cluster tests need: a real Slurm (slurm-wlm, munge), shellcheck
# for the launch scripts, iproute2 for the network namespaces that play the nodes.
# Needs root; without them those tests skip (CI sets CI=1 and they must run).
set -euo pipefail
packages=(slurm-wlm munge shellcheck iproute2)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "test-deps: need root to install ${missing[*]} (sudo make test-deps)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
