"""Result rows, the printed table and results.json."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    group: str
    name: str
    unit: str
    mirror: float | None
    anchor_name: str
    anchor: float | None
    workers: int | None = None
    # Target: ("ratio>=", x) | ("ratio<=", x) | ("mirror<=", x) | ("mirror<=anchor+", x)
    target: tuple[str, float] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.mirror is None or self.anchor is None or self.anchor == 0:
            return None
        return self.mirror / self.anchor

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.mirror is None:
            return None
        kind, value = self.target
        if kind == "mirror<=":
            return self.mirror <= value
        if kind == "mirror<=anchor+":
            return self.anchor is not None and self.mirror <= self.anchor + value
        r = self.ratio
        if r is None:
            return None
        return r >= value if kind == "ratio>=" else r <= value

    def target_text(self) -> str:
        if self.target is None:
            return ""
        kind, value = self.target
        return {
            "ratio>=": f">={value:g}x",
            "ratio<=": f"<={value:g}x",
            "mirror<=": f"<={value:g} {self.unit}",
            "mirror<=anchor+": f"<=anchor+{value:g}",
        }[kind]


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def render_table(rows: list[Row]) -> str:
    header = ["group", "measurement", "unit", "w", "mirror", "anchor", "anchor value",
              "ratio", "target", "ok"]
    body = []
    for r in rows:
        ok = r.passed
        body.append(
            [
                r.group,
                r.name,
                r.unit,
                "" if r.workers is None else str(r.workers),
                _fmt(r.mirror),
                r.anchor_name,
                _fmt(r.anchor),
                "n/a" if r.ratio is None else f"{r.ratio:.2f}x",
                r.target_text(),
                "" if ok is None else ("yes" if ok else "NO"),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    notes = [f"  - {r.group}/{r.name} (w={r.workers}): {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def write_results(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    doc = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        **meta,
        "rows": [
            {**asdict(r), "ratio": r.ratio, "passed": r.passed, "target": r.target_text()}
            for r in rows
        ],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)
