"""Loaders in one process with explicit rank/world_size (the multi-process run is in
test_distributed.py): exact-once evaluation, equal and deterministic training epochs,
batch format, shard locations and the pipe: guard."""
from __future__ import annotations

import functools
import http.server
import itertools
import json
import shutil
import threading

import pytest
import torch

from data_helpers import image_ids, small_cfg
from ddetr_dist.data import build_eval_loader, build_train_loader
from ddetr_dist.data.partition import slot_pieces
from ddetr_dist.data.shard import write_shards


def _all_ids(demo_data, split):
    return sorted(i["id"] for i in json.loads((demo_data["dir"] / split / "annotations.json").read_text())["images"])


@pytest.mark.parametrize("counts, num_slots", [([5, 5, 1], 4), ([3], 7), ([0, 4, 0, 9], 3), ([2, 2], 1), ([1], 1)])
def test_slot_pieces_cover_every_sample_once_in_balanced_ranges(counts, num_slots):
    for order in itertools.permutations(range(len(counts))):
        seen, sizes = [], []
        for slot in range(num_slots):
            pieces = slot_pieces(counts, order, slot, num_slots)
            sizes.append(sum(p.stop - p.start for p in pieces))
            seen += [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]
        assert sorted(seen) == [(s, i) for s in range(len(counts)) for i in range(counts[s])]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (1, 2), (3, 2), (2, 3)])
def test_eval_reads_every_image_exactly_once(demo_data, world_size, num_workers):
    cfg = small_cfg(val_shards=demo_data["val"], num_workers=num_workers, batch_size=3)
    ids = []
    for rank in range(world_size):
        loader = build_eval_loader(cfg, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) <= len(loader)
        ids += image_ids(batches)
        assert not loader.skips
    assert sorted(ids) == _all_ids(demo_data, "val")  # 3 shards, up to 6 slots: shards get cut


def _train_epoch(cfg, seed, rank, world_size, epoch=None):
    loader = build_train_loader(cfg, seed=seed, rank=rank, world_size=world_size)
    if epoch is not None:
        loader.set_epoch(epoch)
    return loader, list(loader)


def test_train_gives_every_rank_the_same_number_of_batches_and_different_data(demo_data):
    cfg = small_cfg(train_shards=demo_data["train"], num_workers=2)
    per_rank = [_train_epoch(cfg, 0, rank, 2) for rank in range(2)]
    expected = demo_data["train_count"] // (2 * cfg.batch_size)
    for loader, batches in per_rank:
        assert len(loader) == len(batches) == expected
        assert all(len(b[2]) == cfg.batch_size for b in batches)
    ids = [set(image_ids(batches)) for _, batches in per_rank]
    assert not ids[0] & ids[1]  # ranks read disjoint parts of the data in an epoch
    assert ids[0] | ids[1] <= set(_all_ids(demo_data, "train"))


def test_train_resamples_to_samples_per_epoch(demo_data):
    cfg = small_cfg(train_shards=demo_data["train"], num_workers=2, samples_per_epoch=3 * demo_data["train_count"])
    counts = [len(_train_epoch(cfg, 0, rank, 3)[1]) for rank in range(3)]
    assert counts == [3 * demo_data["train_count"] // (3 * cfg.batch_size)] * 3


def test_train_is_deterministic_given_seed_and_epoch(demo_data):
    cfg = small_cfg(train_shards=demo_data["train"], num_workers=2)
    _, a = _train_epoch(cfg, seed=7, rank=1, world_size=2)
    _, b = _train_epoch(cfg, seed=7, rank=1, world_size=2)
    assert image_ids(a) == image_ids(b)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert all(torch.equal(s["boxes"], t["boxes"]) for x, y in zip(a, b) for s, t in zip(x[2], y[2]))
    assert image_ids(_train_epoch(cfg, seed=8, rank=1, world_size=2)[1]) != image_ids(a)

    loader = build_train_loader(cfg, seed=7, rank=1, world_size=2)
    epoch0, epoch1 = image_ids(loader), image_ids(loader)  # epochs advance by themselves
    assert epoch0 == image_ids(a) and epoch1 != epoch0
    assert image_ids(_train_epoch(cfg, seed=7, rank=1, world_size=2, epoch=1)[1]) == epoch1


def test_batch_format(demo_data):
    cfg = small_cfg(train_shards=demo_data["train"], val_shards=demo_data["val"], num_workers=0, batch_size=3)
    for loader in (build_train_loader(cfg, seed=0, rank=0, world_size=1), build_eval_loader(cfg, rank=0, world_size=1)):
        for images, mask, targets in loader:
            assert images.dtype == torch.float32 and images.dim() == 4 and images.shape[1] == 3
            assert mask.dtype == torch.bool and mask.shape == (images.shape[0], *images.shape[2:])
            for i, t in enumerate(targets):
                h, w = t["size"].tolist()
                assert not mask[i, :h, :w].any() and mask[i].sum() == mask[i].numel() - h * w
                assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1:] == (4,)
                assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
                assert t["labels"].dtype == torch.int64 and set(t["labels"].tolist()) <= set(range(1, 7))
                assert len(t["labels"]) == len(t["boxes"]) == len(t["area"]) == len(t["iscrowd"])
                assert t["image_id"].shape == (1,) and t["orig_size"].shape == (2,)
        assert loader.shards.num_classes == 7


def test_eval_keeps_crowd_regions_and_training_drops_them(tiny_coco):
    write_shards(tiny_coco["images"], tiny_coco["annotations"], tiny_coco["out"], max_count=2, workers=1,
                 progress=False)
    cfg = small_cfg(train_shards=str(tiny_coco["out"] / "shard-{000000..000001}.tar"),
                    val_shards=str(tiny_coco["out"] / "shard-{000000..000001}.tar"), batch_size=1, shuffle_buffer=0)
    crowd = {split: [t["iscrowd"].tolist() for b in loader for t in b[2] if int(t["image_id"]) == 20]
             for split, loader in (("eval", build_eval_loader(cfg, rank=0, world_size=1)),
                                   ("train", build_train_loader(cfg, seed=0, rank=0, world_size=1)))}
    assert crowd["eval"] == [[1, 0]]
    assert all(c == [0] for c in crowd["train"])


def test_pipe_urls_refused_unless_enabled(demo_data):
    shard = demo_data["dir"] / "val" / "shards" / "val-000000.tar"
    cfg = small_cfg(val_shards=f"pipe:cat {shard}")
    with pytest.raises(ValueError, match="data.allow_pipe_urls"):
        build_eval_loader(cfg, rank=0, world_size=1)
    enabled = small_cfg(val_shards=f"pipe:cat {shard}", allow_pipe_urls=True,
                        val_manifest=str(shard.parent / "manifest.json"))
    loader = build_eval_loader(enabled, rank=0, world_size=1)
    assert len(image_ids(loader)) == 5 and not loader.skips


def test_shard_locations(demo_data, tmp_path):
    shards = demo_data["dir"] / "val" / "shards"
    joined = f"{shards}/val-000000.tar::file://{shards}/val-{{000001..000002}}.tar"
    assert sorted(image_ids(build_eval_loader(small_cfg(val_shards=joined), rank=0, world_size=1))) == \
        _all_ids(demo_data, "val")
    # a directory stands for every shard of its manifest
    assert sorted(image_ids(build_eval_loader(small_cfg(val_shards=str(shards)), rank=0, world_size=1))) == \
        _all_ids(demo_data, "val")
    with pytest.raises(FileNotFoundError, match="cannot read shard manifest"):
        build_eval_loader(small_cfg(val_shards=str(tmp_path)), rank=0, world_size=1)
    with pytest.raises(FileNotFoundError, match="val-000009.tar"):
        build_eval_loader(small_cfg(val_shards=f"{shards}/val-000009.tar"), rank=0, world_size=1)
    with pytest.raises(ValueError, match="unsupported scheme 'nope'"):
        build_eval_loader(small_cfg(val_shards="nope://x/val-000000.tar"), rank=0, world_size=1)
    with pytest.raises(ValueError, match="no shards given"):
        build_train_loader(small_cfg(), seed=0, rank=0, world_size=1)
    lonely = tmp_path / "val-000000.tar"
    shutil.copy(shards / "val-000000.tar", lonely)
    with pytest.raises(FileNotFoundError, match="data.train_manifest"):
        build_eval_loader(small_cfg(val_shards=str(lonely)), rank=0, world_size=1)
    renamed = shards / "other.tar"
    shutil.copy(shards / "val-000000.tar", renamed)
    with pytest.raises(ValueError, match="not listed"):
        build_eval_loader(small_cfg(val_shards=str(renamed)), rank=0, world_size=1)
    renamed.unlink()


def test_s3_is_opened_without_a_shell():
    import webdataset as wds

    import ddetr_dist.data.urls  # noqa: F401  (registers the scheme)
    assert "s3" in wds.gopen_schemes
    with pytest.raises(ValueError, match="read-only"):
        wds.gopen_schemes["s3"]("s3://bucket/x.tar", "wb")


def test_rank_and_world_default_to_dist_comm(demo_data):
    loader = build_eval_loader(small_cfg(val_shards=demo_data["val"]))
    assert (loader.dataset.rank, loader.dataset.world_size) == (0, 1)
    assert sorted(image_ids(loader)) == _all_ids(demo_data, "val")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http(s) URLs with curl")
def test_http_shards_and_manifest(demo_data):
    handler = functools.partial(_QuietHandler, directory=str(demo_data["dir"] / "val" / "shards"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/val-{{000000..000002}}.tar"
            loader = build_eval_loader(small_cfg(val_shards=url, num_workers=2), rank=0, world_size=1)
            assert sorted(image_ids(loader)) == _all_ids(demo_data, "val") and not loader.skips
        finally:
            server.shutdown()
