"""Distributed glue. `comm` (rank/world/collectives) needs only torch.distributed and is safe
to import anywhere; the Ray and DeepSpeed modules are imported by name where needed."""
