"""Which samples each loader slot reads. A slot is one (rank, loader worker) pair; there
are world_size * num_workers of them. The shards, in a given order, are seen as one long
sequence of samples (counts from the manifest) cut into equal contiguous ranges, one per
slot. So every sample belongs to exactly one slot however many shards, ranks and workers
there are (more slots than shards just cuts shards into parts), and each slot opens only
the shards its range touches."""
from __future__ import annotations

from typing import NamedTuple, Sequence


class Piece(NamedTuple):
    """Samples [start, stop) of the shard at index `shard` (order within the shard)."""

    shard: int
    start: int
    stop: int


def slot_of(rank: int, worker: int, num_workers: int) -> int:
    return rank * num_workers + worker


def slot_range(total: int, slot: int, num_slots: int) -> tuple[int, int]:
    """[lo, hi) of slot `slot`: sizes differ by at most one between slots."""
    return total * slot // num_slots, total * (slot + 1) // num_slots


def pieces_of(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[Piece]:
    """The samples [lo, hi) of the shards concatenated in `order`, as pieces of shards."""
    pieces, offset = [], 0
    for shard in order:
        start, stop = max(lo, offset), min(hi, offset + counts[shard])
        if start < stop:
            pieces.append(Piece(shard, start - offset, stop - offset))
        offset += counts[shard]
    return pieces


def slot_pieces(counts: Sequence[int], order: Sequence[int], slot: int, num_slots: int) -> list[Piece]:
    return pieces_of(counts, order, *slot_range(sum(counts), slot, num_slots))
