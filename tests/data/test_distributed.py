"""A real multi-rank run: 2 processes with a gloo process group on 127.0.0.1, each with
2 loader workers, rank and world size taken from torch.distributed (ddetr_dist.comm)."""
from __future__ import annotations

import json
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from data_helpers import image_ids, small_cfg
from ddetr_dist.data import build_eval_loader, build_train_loader
from ddetr_dist import comm

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, demo: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        single_shard = str(demo["dir"] / "val" / "shards" / "val-000000.tar")
        report = {}
        for name, shards in (("eval_all", demo["val"]), ("eval_one_shard", single_shard)):
            loader = build_eval_loader(small_cfg(val_shards=shards, num_workers=2))
            report[name] = comm.all_gather_object(image_ids(loader))
        cfg = small_cfg(train_shards=demo["train"], num_workers=2)
        epochs = []
        for seed in (5, 5):
            loader = build_train_loader(cfg, seed=seed)
            batches = list(loader)
            epochs.append(comm.all_gather_object({"batches": len(batches), "len": len(loader),
                                                  "ids": image_ids(batches)}))
        report["train"] = epochs
        if rank == 0:
            with open(out, "w") as f:
                json.dump(report, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_two_workers(demo_data, tmp_path):
    out = tmp_path / "report.json"
    mp.spawn(_rank_main, args=(_free_port(), demo_data, str(out)), nprocs=WORLD_SIZE, join=True)
    report = json.loads(out.read_text())
    val_ids = sorted(i["id"] for i in json.loads((demo_data["dir"] / "val" / "annotations.json").read_text())["images"])

    # evaluation: every image exactly once over ranks and workers, also with 4 slots on 1 shard
    assert sorted(sum(report["eval_all"], [])) == val_ids
    one_shard = sum(report["eval_one_shard"], [])
    assert len(one_shard) == len(set(one_shard)) == 5 and all(r for r in report["eval_one_shard"])

    # training: equal batch counts per rank, disjoint data across ranks, same again with the same seed
    first, again = report["train"]
    assert [r["batches"] for r in first] == [r["len"] for r in first] == [demo_data["train_count"] // 4] * 2
    assert not set(first[0]["ids"]) & set(first[1]["ids"])
    assert first == again
