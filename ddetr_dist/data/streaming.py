"""Shards -> batches for training and evaluation, under any launcher.

Each (rank, loader worker) pair is a *slot*; `partition.py` gives every slot its own
contiguous range of samples of the shard sequence (counts from the manifest).

- Evaluation reads the shards in their order and each slot reads its range once: every
  image exactly once over all ranks and workers, whatever the numbers of shards, ranks
  and workers (more workers than shards included).
- Training shuffles the shard order per epoch (same order on every rank, from the seed),
  cuts it into slot ranges, and each slot cycles through its range (pieces re-shuffled
  on every pass: a resampled stream) through a shuffle buffer until it has produced its
  quota of batches. Every rank yields the same number of batches per epoch, so no rank
  waits for another; everything random derives from (seed, epoch, slot).

Bad data never stops the stream: it is counted in a `SkipCounter` per worker, whose
counts travel with the batches to `DetectionLoader.skips` in the main process.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import tarfile
from itertools import islice
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from ddetr_dist.config import DataConfig
from ddetr_dist.data.collate import collate
from ddetr_dist.data.decode import SampleDecoder, Transform
from ddetr_dist.data.manifest import ShardSet, load_shard_set
from ddetr_dist.data.partition import Piece, slot_of, slot_pieces, slot_range
from ddetr_dist.data.skips import SkipCounter
from ddetr_dist.data.transforms import build_train_transform, build_val_transform
from ddetr_dist import comm

log = logging.getLogger(__name__)


def read_piece(url: str, piece: Piece, skips: SkipCounter) -> Iterator[dict]:
    """Samples [piece.start, piece.stop) of the shard at `url`, as webdataset groups them
    ({'__key__', '__url__', 'jpg', 'json'}). A shard that cannot be opened, is truncated or
    is shorter than its manifest says ends the piece early with a counted skip; the samples
    read whole before the break still come out."""
    wanted, got, stream, errors = piece.stop - piece.start, 0, None, []

    def end_shard(exn: Exception) -> bool:
        errors.append(exn)
        return False  # stop reading this tar; group_by_keys still yields the sample it holds

    try:
        stream = wds.gopen(url, "rb")
        samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=end_shard))
        for sample in islice(samples, piece.start, piece.stop):
            got += 1
            yield sample
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        errors.append(e)
    finally:
        # stopping before the end of a pipe kills its command (SIGPIPE): not an error
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.close()
    if got < wanted:
        why = (errors[0].args[0] if errors[0].args else repr(errors[0])) if errors else \
            f"ended after {piece.start + got} samples, its manifest says at least {piece.stop}"
        skips.record("unreadable_shard", f"{url}: {why} (read {got} of its samples [{piece.start}, {piece.stop}))")


def _rng(*parts) -> random.Random:
    # a str seed goes through sha512: the same in every process, unlike hash()
    return random.Random("/".join(map(str, parts)))


class ShardStream(IterableDataset):
    """The batches (images, padding_mask, targets, skip counts) one rank reads, split among
    its loader workers. `train=False`: each sample once; `train=True`: `batches_per_rank`
    batches per epoch from a shuffled, resampled stream."""

    def __init__(self, shards: ShardSet, transform: Transform, *, train: bool, batch_size: int,
                 rank: int, world_size: int, num_workers: int, seed: int = 0,
                 batches_per_rank: int = 0, shuffle_buffer: int = 0, pad_to_multiple: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if train and batches_per_rank < 1:
            raise ValueError("a training stream needs batches_per_rank >= 1")
        self.shards, self.transform, self.train = shards, transform, train
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = num_workers  # DataLoader workers; 0 = iterate in the main process
        self.workers_per_rank = max(1, num_workers)  # slots per rank
        self.seed, self.batches_per_rank, self.shuffle_buffer = seed, batches_per_rank, shuffle_buffer
        self.pad_to_multiple = pad_to_multiple  # batch height and width rounded up to a multiple (collate.py)
        self.epoch = 0  # set by DetectionLoader before each pass

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers_per_rank

    def _worker_batches(self, worker: int) -> int:
        """How many batches worker `worker` of this rank yields (in evaluation: at most)."""
        if self.train:
            per_worker, extra = divmod(self.batches_per_rank, self.workers_per_rank)
            return per_worker + (worker < extra)
        lo, hi = slot_range(self.shards.total, slot_of(self.rank, worker, self.workers_per_rank), self.num_slots)
        return math.ceil((hi - lo) / self.batch_size)

    def __len__(self) -> int:
        return sum(self._worker_batches(w) for w in range(self.workers_per_rank))

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers_per_rank:
            raise RuntimeError(f"ShardStream was planned for {self.num_workers} workers but runs in "
                               f"{info.num_workers}; build the DataLoader with the same number")
        slot = slot_of(self.rank, worker, self.workers_per_rank)
        skips = SkipCounter()
        rng = _rng("slot", self.seed, self.epoch, slot)
        decoder = SampleDecoder(self.transform, self.shards.category_ids, keep_crowd=not self.train, skips=skips)
        if self.train:
            samples = self._train_samples(slot, rng, skips)
        else:
            samples = self._eval_samples(slot, skips)
        batches = islice(self._batches(samples, decoder, rng), self._worker_batches(worker))
        yield from _with_skip_counts(batches, skips)

    def _eval_samples(self, slot: int, skips: SkipCounter) -> Iterator[dict]:
        order = range(len(self.shards.urls))
        for piece in slot_pieces(self.shards.counts, order, slot, self.num_slots):
            yield from read_piece(self.shards.urls[piece.shard], piece, skips)

    def _train_samples(self, slot: int, rng: random.Random, skips: SkipCounter) -> Iterator[dict]:
        counts = self.shards.counts
        order = list(range(len(counts)))
        _rng("shard order", self.seed, self.epoch).shuffle(order)  # the same on every rank
        # fewer samples than slots: every slot reads everything rather than nothing
        pieces = (slot_pieces(counts, order, slot, self.num_slots)
                  or [Piece(s, 0, counts[s]) for s in order if counts[s]])
        if not pieces:
            raise RuntimeError(f"no samples in {len(counts)} training shard(s) per their manifest")

        def passes() -> Iterator[dict]:
            while True:
                rng.shuffle(pieces)
                read = 0
                for piece in pieces:
                    for sample in read_piece(self.shards.urls[piece.shard], piece, skips):
                        read += 1
                        yield sample
                if read == 0:  # all unreadable: stop rather than spin forever
                    raise RuntimeError(f"slot {slot}: none of its shards could be read "
                                       f"({skips.summary()}); see the warnings above")

        if self.shuffle_buffer > 1:
            return wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(passes())
        return passes()

    def _batches(self, samples: Iterator[dict], decoder: SampleDecoder, rng: random.Random):
        batch: list = []
        failed_in_a_row = 0
        # a training stream cycles forever: give up once more samples than the whole data
        # set (and the shuffle buffer) failed in a row, i.e. a full pass gave nothing
        patience = self.shards.total + self.shuffle_buffer
        for sample in samples:
            item = decoder(sample, rng)
            if item is None:
                failed_in_a_row += 1
                if failed_in_a_row > patience:
                    raise RuntimeError(f"{failed_in_a_row} samples in a row could not be used "
                                       f"({decoder.skips.summary()}); the training data looks broken")
                continue
            failed_in_a_row = 0
            batch.append(item)
            if len(batch) == self.batch_size:
                yield collate(batch, self.pad_to_multiple)
                batch = []
        if batch:  # only an evaluation stream ends: its last batch may be short
            yield collate(batch, self.pad_to_multiple)


def _with_skip_counts(batches: Iterator[tuple], skips: SkipCounter) -> Iterator[tuple]:
    """Append to each batch the skips counted since the previous one. The batch is held
    until the next is ready, so the last one also carries skips made after it (to the end
    of the stream); a worker with skips but no batch sends an empty one to report them."""
    held = None
    for batch in batches:
        if held is not None:
            yield (*held, skips.take())
        held = batch
    if held is not None:
        yield (*held, skips.take())
    elif skips:
        yield None, None, [], skips.take()


class DetectionLoader(DataLoader):
    """A torch DataLoader yielding (images [B,3,H,W], padding_mask [B,H,W] bool, True =
    padding, targets: list of dicts). `skips` sums what every worker skipped (by reason).
    Each iteration is an epoch; epochs count up by themselves, `set_epoch` picks one (e.g.
    on resume). `len()` is the number of batches of this rank (evaluation: at most)."""

    def __init__(self, stream: ShardStream, pin_memory: bool = False):
        # Workers only read, decode and transform on the CPU, so fork them where possible:
        # under a spawning launcher (torch.multiprocessing.spawn) they would otherwise be
        # spawned too, re-importing torch for seconds at every epoch.
        context = "fork" if stream.num_workers and sys.platform == "linux" else None
        # A generator of its own: starting an epoch must not draw from the global torch RNG,
        # which dropout uses (a resumed run would otherwise drift from an uninterrupted one).
        super().__init__(stream, batch_size=None, num_workers=stream.num_workers, pin_memory=pin_memory,
                         multiprocessing_context=context, generator=torch.Generator().manual_seed(0))
        self.skips = SkipCounter()
        self.epoch = 0
        self.skip_batches = 0

    @property
    def shards(self) -> ShardSet:
        return self.dataset.shards

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The next pass is `epoch`, starting after its first `skip_batches` batches: the
        same batches in the same order as a pass that was not interrupted (resuming)."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __iter__(self):
        self.dataset.epoch = self.epoch  # copied into the workers when they start, below
        self.epoch += 1
        # Fast-forward by producing and dropping batches: the transforms draw from each
        # slot's rng and the workers take turns, so only a replay gives the same order.
        skip, self.skip_batches = self.skip_batches, 0
        epoch_skips = SkipCounter()
        for images, padding_mask, targets, skipped in super().__iter__():
            epoch_skips.update(skipped)
            self.skips.update(skipped)
            if not targets:
                continue
            if skip:
                skip -= 1
                continue
            yield images, padding_mask, targets
        if epoch_skips:
            log.warning("%s loader, rank %d, epoch %d: %s", "train" if self.dataset.train else "eval",
                        self.dataset.rank, self.dataset.epoch, epoch_skips.summary())


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    return (comm.get_rank() if rank is None else rank,
            comm.get_world_size() if world_size is None else world_size)


def build_train_loader(cfg: DataConfig, seed: int, *, rank: int | None = None, world_size: int | None = None,
                       pin_memory: bool = False, pad_to_multiple: int = 1) -> DetectionLoader:
    """The training loader of one rank: `cfg.samples_per_epoch` (default: all samples)
    per epoch over all ranks, as the same number of full batches on every rank, padded to
    multiples of `pad_to_multiple` (config.pad_multiple). rank/world_size default to ddetr_dist.comm."""
    rank, world_size = _rank_and_world(rank, world_size)
    shards = load_shard_set(cfg.train_shards, cfg.allow_pipe_urls, cfg.train_manifest)
    samples = cfg.samples_per_epoch or shards.total
    stream = ShardStream(shards, build_train_transform(cfg), train=True, batch_size=cfg.batch_size,
                         rank=rank, world_size=world_size, num_workers=cfg.num_workers, seed=seed,
                         batches_per_rank=max(1, samples // (world_size * cfg.batch_size)),
                         shuffle_buffer=cfg.shuffle_buffer, pad_to_multiple=pad_to_multiple)
    return DetectionLoader(stream, pin_memory=pin_memory)


def build_eval_loader(cfg: DataConfig, *, rank: int | None = None, world_size: int | None = None,
                      pin_memory: bool = False, pad_to_multiple: int = 1) -> DetectionLoader:
    """The evaluation loader of one rank: over all ranks and workers every image of
    `cfg.val_shards` exactly once (ranks may get one batch more or less than others, so
    gather results after the loop rather than per batch). Crowd regions stay in the
    targets (iscrowd=1) for COCO evaluation. rank/world_size default to ddetr_dist.comm.
    `pad_to_multiple`: as the model's training batches were (config.pad_multiple)."""
    rank, world_size = _rank_and_world(rank, world_size)
    shards = load_shard_set(cfg.val_shards, cfg.allow_pipe_urls, cfg.val_manifest)
    stream = ShardStream(shards, build_val_transform(cfg), train=False, batch_size=cfg.batch_size,
                         rank=rank, world_size=world_size, num_workers=cfg.num_workers, pad_to_multiple=pad_to_multiple)
    return DetectionLoader(stream, pin_memory=pin_memory)
