"""A worker pays in memory only for the tables it has: without [s3] no aiobotocore (~13 MiB
resident a worker), without [redis] no redis-py (~9 MiB), without [[policy]] no cryptography
(~7 MiB), and never importlib.metadata for the version (~5 MiB). With several workers and
[s3], botocore's S3 data is parsed once, in the supervisor before it forks."""
import json
import subprocess
import sys

SERVING = "mirror.cli, mirror.config, mirror.runtime, mirror.http.app, mirror.process.serve, " \
          "mirror.tiers.bounds, mirror.tiers.source"


def _imported(prefixes: tuple[str, ...]) -> list[str]:
    code = (f"import json, sys, {SERVING}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


def test_serving_without_s3_does_not_import_the_bucket_client() -> None:
    assert _imported(("aiobotocore", "botocore", "mirror.tiers.bucket")) == []


def test_serving_without_redis_or_policy_imports_neither_client() -> None:
    assert _imported(("redis", "cryptography", "mirror.cluster.shared", "mirror.pull.trust",
                      "mirror.oci.cosign")) == []


def test_the_version_costs_no_package_metadata() -> None:
    assert _imported(("importlib.metadata",)) == []


_PRELOAD = """
import asyncio, json, sys
import botocore.loaders
from mirror.config import S3Config
from mirror.tiers import s3client
config = S3Config(endpoint="http://127.0.0.1:1", bucket="b", access_key="a", secret_key="b")
if sys.argv[1] == "preload":
    s3client.preload(config)
metrics = sorted(m for m in sys.modules if m.startswith(("prometheus_client", "mirror.metrics")))
reads = []
load_file = botocore.loaders.JSONFileLoader.load_file
def counting(self, path):
    reads.append(path)
    return load_file(self, path)
botocore.loaders.JSONFileLoader.load_file = counting
async def worker():
    async with s3client.open_client(config):
        pass
asyncio.run(worker())
print(json.dumps({"reads": reads, "metrics": metrics}))
"""


def _worker_client(mode: str) -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", _PRELOAD, mode], capture_output=True,
                         text=True, check=True)
    return dict(json.loads(out.stdout))


def test_a_preloaded_session_gives_clients_without_parsing_botocore_data_again() -> None:
    assert any("s3" in path for path in _worker_client("fresh")["reads"])  # the probe works
    preloaded = _worker_client("preload")
    assert preloaded["reads"] == []
    assert preloaded["metrics"] == []  # the supervisor gets no prometheus files of its own
