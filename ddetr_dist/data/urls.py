"""Shard locations: local paths, brace patterns and the remote URLs webdataset's `gopen`
opens (http(s), gs, ais, ...; s3 through the aws CLI). `pipe:` URLs run a shell command
taken from the config, so they are refused unless `data.allow_pipe_urls` is set."""
from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import webdataset as wds
from webdataset.gopen import Pipe
from webdataset.shardlists import expand_urls


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192):
    """s3://bucket/key through `aws s3 cp` (argument list, no shell)."""
    if mode[0] != "r":
        raise ValueError(f"{url}: s3 shards are read-only here")
    return Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize, ignore_status=[141])


# webdataset 1.0.2 knows no s3 scheme; add ours without replacing one a user registered
wds.gopen_schemes.setdefault("s3", _gopen_s3)


def scheme(url: str) -> str:
    """'' for a local path, else the URL scheme ('http', 'pipe', ...)."""
    parsed = urlparse(url)
    # a one-letter scheme is a Windows drive, not a URL
    return "" if len(parsed.scheme) <= 1 else parsed.scheme


def is_local(url: str) -> bool:
    return scheme(url) in ("", "file")


def local_path(url: str) -> str:
    return urlparse(url).path if scheme(url) == "file" else url


def check_url(url: str, allow_pipe: bool) -> None:
    """Raise ValueError for a pipe: URL (unless allowed) or a scheme gopen cannot open,
    FileNotFoundError for a missing local file."""
    kind = scheme(url)
    if kind == "pipe" and not allow_pipe:
        raise ValueError(f"refusing shard URL {url!r}: 'pipe:' URLs run a shell command. Set "
                         "data.allow_pipe_urls=true to allow them (only for configs you trust).")
    if not is_local(url):
        if kind not in wds.gopen_schemes:
            known = ", ".join(sorted(k for k in wds.gopen_schemes if not k.startswith("_")))
            raise ValueError(f"shard URL {url!r}: unsupported scheme '{kind}' (supported: local paths, "
                             f"file, {known})")
        return
    if not os.path.isfile(local_path(url)):
        raise FileNotFoundError(f"shard not found: {url}")


def expand_shards(spec: str, allow_pipe: bool) -> list[str]:
    """'a-{000..009}.tar::b.tar' -> the list of shard URLs, each checked by `check_url`."""
    if not spec:
        raise ValueError("no shards given: set data.train_shards / data.val_shards to a path, brace "
                         "pattern or URL of shards written by `ddetr shard` or `ddetr demo-data`")
    urls = expand_urls(spec)
    for url in urls:
        check_url(url, allow_pipe)
    return urls


def sibling(url: str, name: str) -> str:
    """The URL of file `name` in the same directory as `url`."""
    if is_local(url):
        return os.path.join(os.path.dirname(local_path(url)), name)
    return posixpath.join(posixpath.dirname(url), name)


def basename(url: str) -> str:
    return posixpath.basename(urlparse(url).path if not is_local(url) else local_path(url))
