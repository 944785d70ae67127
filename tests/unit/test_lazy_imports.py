"""A worker pays in memory only for the tables it has: without [s3] no aiobotocore (~13 MiB
resident a worker), without [redis] no redis-py (~9 MiB), without [[policy]] no cryptography
(~7 MiB), and never importlib.metadata for the version (~5 MiB)."""
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
