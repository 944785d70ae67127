"""The supervisor must not load prometheus_client before it has pointed
PROMETHEUS_MULTIPROC_DIR at the workers' metrics directory: prometheus_client picks its value
store when first imported, and a worker that picked the in-memory one reports nothing to a
scrape answered by another worker (/metrics came back empty with workers = 2)."""

from __future__ import annotations

import subprocess
import sys


def test_serve_module_does_not_import_prometheus_client() -> None:
    probe = ("import sys, mirror.process.serve; "
             "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


def test_serve_then_metrics_dir_gives_multiprocess_values(tmp_path: object) -> None:
    """End to end in one process: the variable set after importing serve still takes effect."""
    probe = (f"import os, mirror.process.serve; os.environ['PROMETHEUS_MULTIPROC_DIR'] = "
             f"{str(tmp_path)!r}; from mirror import metrics; metrics.REQUESTS.labels("
             f"'blob', 'GET', '200').inc(); print(sorted(os.listdir({str(tmp_path)!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    assert ".db" in out.stdout, out.stdout
