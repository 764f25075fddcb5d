"""A node's own machine, for a process started in a network namespace: its own host name
(a UTS namespace) and its own file system view (the mount namespace `ip netns exec`
makes): a fresh, empty /tmp and no checkout of this repository, except the directories a
cluster shares (an NFS mount: the run directory and data; the Python environment, which a
real node has installed at the same path). So a node imports `ddetr_dist` only from what
a job ships (its working_dir), and a path that exists only on the machine that submitted
(or only on another node) is missing there, as on a real cluster.

    argv = node_command("ddr-node1", hide=["/tmp", REPO], share=[shared, venv], argv=["ray", "start", ...])
    net.popen(1, argv)
"""
from __future__ import annotations

from pathlib import Path

# Run as root inside the node's namespaces. Shared directories are bound into a staging
# tmpfs first (a hidden path is unreachable once covered), then put back at their paths.
SETUP = r'''
set -eu
hostname "$DDR_HOSTNAME"
mount -t tmpfs node-stage "$DDR_STAGE"
i=0
for path in $DDR_SHARE; do mkdir -p "$DDR_STAGE/$i"; mount --rbind "$path" "$DDR_STAGE/$i"; i=$((i + 1)); done
for path in $DDR_HIDE; do mkdir -p "$path"; mount -t tmpfs node-private "$path"; done
i=0
for path in $DDR_SHARE; do mkdir -p "$path"; mount --rbind "$DDR_STAGE/$i" "$path"; i=$((i + 1)); done
exec "$@"
'''


def node_command(hostname: str, hide: list[Path], share: list[Path], stage: Path, argv: list[str]) -> list[str]:
    """`argv` wrapped so that it runs on a node named `hostname` that sees none of `hide`
    but every one of `share` (shared paths inside hidden ones come back). `stage`: an
    empty directory outside every hidden path (the staging mount point). No path may hold
    spaces (the shell splits the lists)."""
    for path in [*hide, *share, stage]:
        if " " in str(path):
            raise ValueError(f"{path}: a node path with a space")
    env = [f"DDR_HOSTNAME={hostname}", f"DDR_STAGE={stage}", f"DDR_HIDE={' '.join(map(str, hide))}",
           f"DDR_SHARE={' '.join(map(str, share))}"]
    return ["env", *env, "unshare", "--uts", "sh", "-c", SETUP, "node-setup", *argv]
