"""write COCO images + annotations as webdataset tar shards (+ manifest.json)

One sample per image: `<image id>.jpg` (or .png), the original bytes unchanged, and
`<image id>.json`, the image's record {image_id, file_name, width, height, annotations:
[{id, bbox, category_id, area, iscrowd}]}. Images without annotations are kept (they
count in evaluation). Every image is decoded once here, so a corrupt file is an error
naming it now rather than a surprise mid-training.

Each shard is written to a temporary name, fsynced and renamed into place; manifest.json
(shard names and counts, categories, the annotation file's sha256) is written last, so
its presence means the set is whole. Re-running after a crash keeps the shards already
written whose content matches and writes the rest.

  ddetr shard --images coco/train2017 --annotations coco/annotations/instances_train2017.json \\
              --out shards/train --prefix train
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import sys
import tarfile
import time
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from ddetr_dist.atomic import atomic_open
from ddetr_dist.data.coco import AnnotationError, SampleError, image_records, load_instances
from ddetr_dist.data.decode import IMAGE_EXTENSIONS, open_image
from ddetr_dist.data.manifest import FORMAT, MANIFEST_NAME, num_classes_for, write_manifest

TAR_OVERHEAD = 2 * 1024  # two 512-byte headers per sample plus padding, roughly


class ShardError(ValueError):
    """An input image is missing, corrupt or disagrees with its annotations (names it)."""


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_pattern(out_dir: str | Path, prefix: str, count: int) -> str:
    """The brace pattern naming the `count` shards written with `prefix` (for data.*_shards)."""
    if count == 1:
        return str(Path(out_dir) / shard_name(prefix, 0))
    return str(Path(out_dir) / f"{prefix}-{{{0:06d}..{count - 1:06d}}}.tar")


def sample_key(record: dict) -> str:
    # webdataset splits a name at its first dot: the key must have none
    return f"{record['image_id']:012d}"


def record_json(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def read_verified_image(path: Path, record: dict) -> tuple[bytes, str]:
    """(the file's bytes, shard extension) after checking it decodes to the annotated size."""
    where = f"image {path} (id {record['image_id']})"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{where}: cannot be read: {e}") from e
    try:
        image = open_image(data)
    except SampleError as e:
        raise ShardError(f"{where}: {e}") from e
    if image.size != (record["width"], record["height"]):
        raise ShardError(f"{where}: is {image.size[0]}x{image.size[1]} but the annotations say "
                         f"{record['width']}x{record['height']}")
    return data, IMAGE_EXTENSIONS[image.format]


def _read_verified_star(args: tuple[Path, dict]) -> tuple[bytes, str]:
    return read_verified_image(*args)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def plan_shards(sizes: list[int], max_count: int, max_size: int) -> list[range]:
    """Consecutive runs of samples, each at most max_count samples and (beyond its first
    sample) at most max_size bytes."""
    shards, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_count or used + size > max_size):
            shards.append(range(start, i))
            start, used = i, 0
        used += size
    if start < len(sizes):
        shards.append(range(start, len(sizes)))
    return shards


def shard_is_complete(path: Path, records: list[dict], image_sizes: list[int]) -> bool:
    """True when `path` holds exactly these samples: same keys and JSON, same image sizes."""
    try:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            if len(members) != 2 * len(records):
                return False
            for record, size in zip(records, image_sizes):
                key = sample_key(record)
                meta = members.get(f"{key}.json")
                image = next((members[f"{key}.{ext}"] for ext in IMAGE_EXTENSIONS.values()
                              if f"{key}.{ext}" in members), None)
                if meta is None or image is None or image.size != size:
                    return False
                if tar.extractfile(meta).read() != record_json(record):
                    return False
        return True
    except (OSError, tarfile.TarError):
        return False


def write_shards(images_dir: str | Path, annotations: str | Path, out_dir: str | Path, *,
                 prefix: str = "shard", max_count: int = 1000, max_size: int = 1_000_000_000,
                 workers: int = 2, progress: bool = True) -> dict:
    """Write the shards and manifest; return the manifest. Raises AnnotationError or
    ShardError (naming the image) on bad input."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if max_count < 1 or max_size < 1:
        raise ValueError("max_count and max_size must be positive")
    records, categories, degenerate = image_records(load_instances(annotations), str(annotations))
    if not records:
        raise AnnotationError(f"{annotations}: no images")
    paths = [images_dir / r["file_name"] for r in records]
    missing = [f"image {p} (id {r['image_id']})" for p, r in zip(paths, records) if not p.is_file()]
    if missing:
        raise ShardError(f"{len(missing)} image file(s) missing, e.g.: " + "; ".join(missing[:5]))
    image_sizes = [p.stat().st_size for p in paths]
    plan = plan_shards([s + len(record_json(r)) + TAR_OVERHEAD for s, r in zip(image_sizes, records)],
                       max_count, max_size)
    if degenerate:
        print(f"note: {len(degenerate)} box(es) have no area inside their image, e.g. {'; '.join(degenerate[:3])}. "
              "They are kept in the shards and dropped when loading (as the official code does).", file=sys.stderr)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest until every shard is whole
    names = [shard_name(prefix, i) for i in range(len(plan))]
    stale = sorted(p.name for p in out_dir.glob(f"{prefix}-*.tar") if p.name not in names)
    if stale:
        print(f"note: {out_dir} holds shards this run does not write (left alone, not in the manifest): "
              f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}", file=sys.stderr)

    pool = multiprocessing.Pool(workers) if workers > 1 else None
    bar = tqdm(total=len(records), unit="img", desc=f"shard {out_dir}", disable=not progress)
    try:
        for name, run in zip(names, plan):
            shard_records = [records[i] for i in run]
            if shard_is_complete(out_dir / name, shard_records, [image_sizes[i] for i in run]):
                bar.update(len(run))  # written by an earlier, interrupted run
                continue
            jobs = [(paths[i], records[i]) for i in run]
            loaded = pool.imap(_read_verified_star, jobs, chunksize=4) if pool else map(_read_verified_star, jobs)
            with atomic_open(out_dir / name) as f, wds.TarWriter(f, encoder=False, mtime=0) as tar:
                for record, (data, ext) in zip(shard_records, loaded):
                    tar.write({"__key__": sample_key(record), ext: data, "json": record_json(record)})
                    bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()

    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source_annotations": {"path": str(Path(annotations).resolve()),
                               "sha256": file_sha256(annotations)},
        "images_dir": str(images_dir.resolve()),
        "categories": categories,
        "num_classes": num_classes_for(categories),
        "num_samples": len(records),
        "num_images_without_annotations": sum(not r["annotations"] for r in records),
        "num_degenerate_boxes": len(degenerate),
        "shards": [{"name": name, "count": len(run), "bytes": (out_dir / name).stat().st_size}
                   for name, run in zip(names, plan)],
    }
    write_manifest(out_dir, manifest)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="directory the annotations' file_name entries are in")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON")
    parser.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    parser.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ...")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-size", type=int, default=1_000_000_000, help="bytes per shard at most (roughly)")
    parser.add_argument("--workers", type=int, default=2, help="processes reading and verifying images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = write_shards(args.images, args.annotations, args.out, prefix=args.prefix,
                                max_count=args.max_count, max_size=args.max_size,
                                workers=args.workers, progress=not args.no_progress)
    except (AnnotationError, ShardError) as e:
        print(f"ddetr shard: error: {e}", file=sys.stderr)
        return 1
    print(f"{manifest['num_samples']} images ({manifest['num_images_without_annotations']} without annotations) "
          f"in {len(manifest['shards'])} shards in {args.out}; {len(manifest['categories'])} categories, "
          f"{manifest['num_classes']} classes (max category id + 1): `ddetr train` sizes the model to them "
          "(model.num_classes=auto, the default)")
    return 0
