"""docs/prometheus: the shipped recording and alerting rules are valid (`promtool check
rules`) and each alert fires on the series that should raise it and not on the others
(`promtool test rules`, Debian's prometheus package, installed by `make test`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "prometheus"
RULES = [DOCS / "mirror-rules.yml", DOCS / "mirror-alerts.yml"]
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool missing: `make system-deps` installs it")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          cwd=DOCS)


@needs_promtool
def test_the_rules_are_valid() -> None:
    result = promtool("check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout
    assert "SUCCESS: 7 rules found" in result.stdout


@needs_promtool
def test_every_alert_has_a_case_and_the_cases_pass() -> None:
    alerts = {line.split(":", 1)[1].strip() for line in RULES[1].read_text().splitlines()
              if line.strip().startswith("- alert:")}
    cases = (DOCS / "tests" / "alerts-test.yml").read_text()
    assert alerts and all(f"alertname: {a}\n" in cases for a in alerts)
    result = promtool("test", "rules", "tests/alerts-test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
