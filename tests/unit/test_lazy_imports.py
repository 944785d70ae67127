"""A worker without [s3] does not pay for aiobotocore (~13 MiB resident a worker, by ru_maxrss)."""
import subprocess
import sys


def test_serving_without_s3_does_not_import_the_bucket_client() -> None:
    code = ("import sys, mirror.cli, mirror.runtime, mirror.http.app, mirror.tiers.bounds, "
            "mirror.tiers.source; "
            "print(sorted(m for m in sys.modules if m.startswith(('aiobotocore', 'botocore', "
            "'mirror.tiers.bucket'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
