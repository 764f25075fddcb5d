"""Object storage (S3 and its look-alikes, GCS, Azure, ...) through pyarrow's file systems,
the ones Ray Train writes its checkpoints with: a run directory may live at any URI
`pyarrow.fs.FileSystem.from_uri` takes. Endpoint and credentials come the usual way of each
store, on every node (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance
role, AWS_ENDPOINT_URL for a look-alike such as MinIO or SeaweedFS).

Nothing here knows a run: engine/run_store.py decides what a run keeps where.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path


# scheme://...: what pyarrow's file systems take
URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# what a shell, os.path or pathlib makes of one: s3:/bkt/x (its '//' joined to '/')
MANGLED_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")
# the schemes pyarrow.fs.FileSystem.from_uri takes (pyarrow 26)
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")
# where a node keeps its working copy of runs that live in a store: a node-local disk
STAGING_ENV = "DDETR_STAGING_DIR"


class StoreError(RuntimeError):
    """A store cannot be used (no such bucket, credentials refused, unreachable); the
    message says which and what to do."""


def is_uri(text: str | os.PathLike) -> bool:
    return isinstance(text, str) and bool(URI.match(text))


def mangled_uri(text: str) -> bool:
    """`s3:/bkt/x`: a URI whose '//' a path join made '/'."""
    return bool(MANGLED_URI.match(text))


def check_scheme(uri: str) -> None:
    """StoreError unless pyarrow has a file system for the URI's scheme (no network)."""
    scheme = URI.match(uri).group(1).lower() if URI.match(uri) else ""
    if scheme not in SCHEMES:
        raise StoreError(f"{uri}: not a URI pyarrow's file systems take (scheme {scheme!r}); use one of "
                         f"{', '.join(s + '://' for s in SCHEMES)}, e.g. s3://bucket/prefix")


def staging_root() -> Path:
    """This node's working copy of runs in object storage (DDETR_STAGING_DIR, else the
    system's temp directory: node-local on every cluster, unlike a home directory)."""
    return Path(os.environ.get(STAGING_ENV) or Path(tempfile.gettempdir()) / "ddetr_dist-staging")


def staging_dir(uri: str) -> Path:
    """The local folder that mirrors `uri` on this node: s3://bkt/a/b -> <root>/s3/bkt/a/b."""
    scheme, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return staging_root().joinpath(scheme, *parts)


@dataclass(frozen=True)
class Store:
    """A folder in a store: `Store("s3://bkt/runs/name")`. Relative names use '/'."""

    uri: str

    def __post_init__(self):
        object.__setattr__(self, "uri", self.uri.rstrip("/"))

    @property
    def filesystem(self):
        """(pyarrow FileSystem, path of this folder in it), made on first use and kept. Each
        process makes its own from the URI: credentials and endpoint come from its node."""
        cached = self.__dict__.get("_fs")
        if cached is None:
            import pyarrow.fs

            check_scheme(self.uri)
            try:  # S3 without a region configured asks the bucket's: this may reach the network
                cached = pyarrow.fs.FileSystem.from_uri(self.uri)
            except OSError as e:
                raise StoreError(f"{self.uri}: {_why(e)} ({e})") from None
            except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid: a URI it cannot parse
                raise StoreError(f"{self.uri}: not a URI pyarrow's file systems take ({e})") from None
            object.__setattr__(self, "_fs", cached)
        return cached

    def child(self, relative: str) -> "Store":
        return Store(f"{self.uri}/{relative.strip('/')}")

    def _path(self, relative: str = "") -> str:
        fs, root = self.filesystem
        return f"{root}/{relative.strip('/')}" if relative.strip("/") else root

    # ------------------------------------------------------------------ reading

    def is_file(self, relative: str) -> bool:
        import pyarrow.fs

        fs, _ = self.filesystem
        return fs.get_file_info(self._path(relative)).type == pyarrow.fs.FileType.File

    def is_dir(self, relative: str = "") -> bool:
        import pyarrow.fs

        fs, _ = self.filesystem
        return fs.get_file_info(self._path(relative)).type == pyarrow.fs.FileType.Directory

    def size(self, relative: str) -> int | None:
        """The size of the file `relative`, or None when there is none."""
        import pyarrow.fs

        fs, _ = self.filesystem
        info = fs.get_file_info(self._path(relative))
        return info.size if info.type == pyarrow.fs.FileType.File else None

    def files(self, relative: str = "") -> dict[str, int]:
        """Every file below `relative` (recursively): relative name -> size. {} when absent."""
        import pyarrow.fs

        fs, _ = self.filesystem
        base = self._path(relative)
        selector = pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)
        return {info.path[len(base):].lstrip("/"): info.size for info in fs.get_file_info(selector)
                if info.type == pyarrow.fs.FileType.File}

    def entries(self, relative: str = "") -> list[str]:
        """The names directly in `relative` (files and folders)."""
        import pyarrow.fs

        fs, _ = self.filesystem
        selector = pyarrow.fs.FileSelector(self._path(relative), recursive=False, allow_not_found=True)
        return [info.base_name for info in fs.get_file_info(selector)]

    def read_bytes(self, relative: str) -> bytes:
        fs, _ = self.filesystem
        with fs.open_input_stream(self._path(relative)) as f:
            return f.read()

    def download(self, relative: str, local: Path) -> bool:
        """The file `relative` to `local` (written atomically). -> False when the store has none."""
        if not self.is_file(relative):
            return False
        fs, _ = self.filesystem
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.download")
        with fs.open_input_stream(self._path(relative)) as source, open(tmp, "wb") as target:
            while chunk := source.read(8 << 20):
                target.write(chunk)
        os.replace(tmp, local)
        return True

    def download_tree(self, relative: str, local: Path) -> list[str]:
        """Every file below `relative` into the folder `local`. -> their relative names."""
        names = sorted(self.files(relative))
        for name in names:
            self.download(f"{relative}/{name}" if relative else name, local / name)
        return names

    # ------------------------------------------------------------------ writing

    def upload(self, local: Path, relative: str) -> None:
        """One file; an object store makes it visible whole or not at all."""
        fs, _ = self.filesystem
        with open(local, "rb") as source, fs.open_output_stream(self._path(relative)) as target:
            while chunk := source.read(8 << 20):
                target.write(chunk)

    def write_bytes(self, relative: str, data: bytes) -> None:
        fs, _ = self.filesystem
        with fs.open_output_stream(self._path(relative)) as target:
            target.write(data)

    def delete(self, relative: str) -> None:
        import pyarrow.fs

        fs, _ = self.filesystem
        if fs.get_file_info(self._path(relative)).type == pyarrow.fs.FileType.File:
            fs.delete_file(self._path(relative))

    # ------------------------------------------------------------------ before a run starts

    def check_writable(self, what: str) -> None:
        """Write, read back and delete a probe object: StoreError saying whether the bucket
        is missing, the credentials were refused, or the store cannot be reached."""
        import pyarrow.fs

        fs, root = self.filesystem
        bucket = root.split("/", 1)[0]
        probe = f".ddetr-probe-{os.getpid()}"
        try:
            if isinstance(fs, pyarrow.fs.S3FileSystem) and \
                    fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
                raise StoreError(f"{what} = {self.uri!r}: the bucket {bucket!r} does not exist at "
                                 f"{_endpoint(fs)}; create it first (aws s3 mb s3://{bucket}) or fix the name")
            self.write_bytes(probe, b"ddetr_dist can write here\n")
            self.read_bytes(probe)
            self.delete(probe)
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(f"{what} = {self.uri!r}: {_why(e)} ({e})") from None


def _endpoint(fs) -> str:
    override = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"the endpoint {override}" if override else "AWS S3 (set AWS_ENDPOINT_URL for another S3-compatible store)"


def _why(error: OSError) -> str:
    text = str(error).upper()
    if any(code in text for code in ("ACCESS_DENIED", "ACCESSDENIED", "SIGNATURE_DOES_NOT_MATCH",
                                     "INVALIDACCESSKEYID", "INVALID_ACCESS_KEY_ID", "FORBIDDEN", "403")):
        return ("the store refused the credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
                "role of this machine, and that they may write there)")
    if "NOSUCHBUCKET" in text or "NO_SUCH_BUCKET" in text:
        return "the bucket does not exist"
    if any(code in text for code in ("NETWORK_CONNECTION", "COULD NOT RESOLVE", "CONNECTION REFUSED", "CURLCODE")):
        return "the store cannot be reached (check AWS_ENDPOINT_URL and the network)"
    return "the store cannot be written"


def staged_uri(path: Path) -> str | None:
    """The URI whose working copy `path` is (the inverse of staging_dir), or None."""
    try:
        relative = Path(path).resolve().relative_to(staging_root().resolve())
    except ValueError:
        return None
    scheme, *rest = relative.parts or ("",)
    return f"{scheme}://{'/'.join(rest)}" if scheme and rest else None
