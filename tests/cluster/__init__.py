"""Cluster tests: multi-node Ray in network namespaces, ray job submit, SLURM, cluster configs."""
