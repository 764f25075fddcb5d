"""Where a run's workers go: what the cluster's nodes hold (the live ones and those an
autoscaler may add), and the check, before any worker starts, that the workers fit, each on
one node (Ray Train would otherwise retry starting them forever)."""
from __future__ import annotations

import logging

from ddetr_dist.config import Config, ConfigError

log = logging.getLogger("ddetr_dist.train")


def cluster_nodes() -> list[dict]:
    """The resources of each node that can host workers: the live nodes and, on a cluster
    with an autoscaler, every node it may add (its node types at their max count, as Ray
    Train reads them), so that demand it would meet is never refused here."""
    import ray
    from ray._private.state import state

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    try:
        autoscaler = state.get_cluster_config()  # published by an autoscaler; None on a fixed cluster
    except Exception:  # noqa: BLE001 - a Ray Client (ray://) driver has no GCS connection: live nodes only
        autoscaler = None
    for group in autoscaler.node_group_configs if autoscaler is not None else ():
        nodes += [dict(group.resources)] * (group.max_count if group.max_count >= 0 else UNBOUNDED_NODES)
    return nodes


UNBOUNDED_NODES = 1000  # an autoscaler node type without a max count


def workers_that_fit(nodes: list[dict], cpus: int, gpus: int) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs each the nodes hold (a worker's
    resources are on one node)."""
    return sum(min(int(n.get("CPU", 0) // cpus), int(n.get("GPU", 0) // gpus) if gpus else 10 ** 9) for n in nodes)


def check_resources(cfg: Config, nodes: list[dict] | None = None) -> bool:
    """-> whether the workers use GPUs. Fails (naming the keys) when the cluster cannot
    place the workers, each on one node: Ray Train would otherwise retry starting them
    forever."""
    nodes = cluster_nodes() if nodes is None else nodes
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else any(n.get("GPU", 0) >= 1 for n in nodes)
    r = cfg.ray
    gpus = 1 if use_gpu else 0
    fit = workers_that_fit(nodes, r.cpus_per_worker, gpus)
    fewest, most = r.worker_range()  # a range needs room for its fewest: Ray starts with what fits
    if fit < fewest:
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        asked = f"{r.cpus_per_worker} CPU(s)" + (" and 1 GPU" if use_gpu else "")
        at_least = f" (a range: at least {fewest})" if fewest != most else ""
        raise ConfigError(
            f"config keys 'ray.num_workers' ({r.num_workers}) and 'ray.cpus_per_worker' ({r.cpus_per_worker}): each "
            f"worker needs {asked} on one node, but the cluster's {len(nodes)} node(s) hold {fit} such worker(s)"
            f"{at_least} (the largest has {largest.get('CPU', 0):g} CPUs, {largest.get('GPU', 0):g} GPUs). Lower them"
            + (", set ray.use_gpu=false," if use_gpu else "") + " or add nodes.")
    if fewest != most:
        log.info("ray.num_workers=%s: the cluster has room for %d worker(s) (counting nodes an autoscaler may "
                 "add); Ray starts as many as fit, up to %d, and resizes the run between %d and %d as nodes come "
                 "and go (docs/elastic.md)", r.num_workers, fit, most, fewest, most)
    if cfg.train.precision == "fp16" and not use_gpu:
        raise ConfigError("config key 'train.precision': fp16 needs GPUs; on CPUs use bf16 (or fp32)")
    return use_gpu
