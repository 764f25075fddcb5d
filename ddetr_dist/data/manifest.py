"""`manifest.json`, written beside the shards by `ddetr shard` (last, atomically: its
presence means every shard it lists is whole). It lists each shard with its sample count,
the categories, and the hash of the source annotation file. The loaders need the counts
to split samples exactly across ranks and workers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.data.urls import basename, expand_shards, is_local, local_path, scheme, sibling

MANIFEST_NAME = "manifest.json"
FORMAT = "ddetr_dist.shards/1"


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode())
    return path


def read_manifest(url: str) -> dict:
    try:
        if is_local(url):
            data = Path(local_path(url)).read_bytes()
        else:
            with wds.gopen(url, "rb") as stream:
                data = stream.read()
        manifest = json.loads(data)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read shard manifest {url}: {e}. Shards written by `ddetr shard` have "
                                "one beside them; set data.train_manifest / data.val_manifest to point at it") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{url}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
    return manifest


def num_classes_for(categories: list[dict]) -> int:
    """Category ids are used as labels (as the official code does), so: max id + 1."""
    return max((c["id"] for c in categories), default=0) + 1


@dataclass
class ShardSet:
    """The shards to read, their sample counts and categories, from their manifest(s)."""

    urls: list[str]
    counts: list[int]
    categories: list[dict]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def category_ids(self) -> frozenset[int]:
        return frozenset(c["id"] for c in self.categories)

    @property
    def num_classes(self) -> int:
        return num_classes_for(self.categories)


def _expand_directories(spec: str) -> str:
    """A local directory in `spec` stands for every shard its manifest lists, so a config
    can name `data/demo/train/shards` without knowing how many shards were written."""
    parts = []
    for part in spec.split("::"):
        if part and is_local(part) and Path(local_path(part)).is_dir():
            manifest = read_manifest(str(Path(local_path(part)) / MANIFEST_NAME))
            parts += [str(Path(local_path(part)) / s["name"]) for s in manifest["shards"]]
        else:
            parts.append(part)
    return "::".join(parts)


def load_shard_set(spec: str, allow_pipe: bool, manifest_url: str = "") -> ShardSet:
    """Expand `spec` and look up each shard in its manifest: `manifest_url` if given, else
    the manifest.json beside each shard (shards from several directories may be joined
    with '::' as long as their categories agree). A local directory stands for all the
    shards of the manifest.json in it."""
    urls = expand_shards(_expand_directories(spec), allow_pipe)
    manifests: dict[str, dict] = {}
    counts_by_name: dict[str, dict[str, int]] = {}
    counts = []
    for url in urls:
        if manifest_url:
            where = manifest_url
        elif scheme(url) == "pipe":
            raise ValueError(f"{url}: the manifest of pipe: shards cannot be located; set "
                             "data.train_manifest / data.val_manifest")
        else:
            where = sibling(url, MANIFEST_NAME)
        if where not in manifests:
            manifests[where] = read_manifest(where)
            counts_by_name[where] = {s["name"]: s["count"] for s in manifests[where]["shards"]}
        listed = counts_by_name[where]
        name = basename(url) if scheme(url) != "pipe" else _pipe_shard_name(url, listed)
        if name not in listed:
            raise ValueError(f"shard {url} is not listed in {where} (it lists {len(listed)} shards); "
                             "re-run `ddetr shard` or fix the pattern")
        counts.append(listed[name])
    categories = [m["categories"] for m in manifests.values()]
    if any(c != categories[0] for c in categories):
        raise ValueError(f"manifests {', '.join(manifests)} disagree on categories; shards of different "
                         "datasets cannot be mixed")
    return ShardSet(urls=urls, counts=counts, categories=categories[0])


def _pipe_shard_name(url: str, names: dict) -> str:
    """The listed shard name a pipe command mentions (e.g. 'pipe:aws s3 cp s3://b/x-000001.tar -')."""
    found = [n for n in names if n in url]
    if len(found) != 1:
        raise ValueError(f"{url}: cannot tell which manifest shard this pipe command reads "
                         f"(matches: {found or 'none'})")
    return found[0]
