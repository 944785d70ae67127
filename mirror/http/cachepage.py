"""The cache browser's pages (`/cache`, `/cache/<upstream>/<repository>`, the result of an
admin action). Pure: the rows in, HTML out; every value escaped. Admin forms carry the CSRF
token (http/csrf.py) and post to `/cache/actions`; without the admin role none is drawn.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from mirror.cache.browse import ImageRow, Page, RepositoryRow
from mirror.http.charts import human_bytes
from mirror.http.statuspage import STYLE, SyncView, when_utc

ACTIONS = "/cache/actions"
EXTRA_STYLE = """
form.action{display:inline;margin:0 .2em}
button{font:inherit;font-size:.85em;padding:.15em .6em;border-radius:4px;
border:1px solid #aab;background:#fff;cursor:pointer}
button.purge{border-color:#b42318;color:#b42318}.pinned{color:#17803d}
.pages a{margin-right:.6em}
"""


@dataclass(frozen=True)
class Admin:
    """The admin's form token; None on the pages of everyone else."""

    csrf: str


def repository_url(upstream: str, repository: str) -> str:
    return f"/cache/{quote(upstream, safe='')}/{quote(repository, safe='/')}"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def form(admin: Admin, action: str, label: str, css: str = "", **fields: str) -> str:
    hidden = "".join(f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">'
                     for k, v in {"csrf": admin.csrf, "action": action, **fields}.items())
    target = fields.get("target", fields.get("rule", ""))
    return (f'<form class="action" method="post" action="{ACTIONS}">{hidden}'
            f'<button type="submit" class="{_e(css or action)}" data-action="{_e(action)}" '
            f'data-target="{_e(target)}">{_e(label)}</button></form>')


def _page_links(page: Page, base: str) -> str:
    if page.pages == 1:
        return ""
    links = "".join(f'<a href="{base}?page={n}">{"<b>" if n == page.page else ""}{n}'
                    f'{"</b>" if n == page.page else ""}</a>' for n in range(1, page.pages + 1))
    return f'<div class="pages">pages: {links}</div>'


def _document(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · registry mirror</title><style>{STYLE}{EXTRA_STYLE}</style></head>
<body>
<div class="sub"><a href="/">status</a> · <a href="/cache">cache browser</a></div>
{body}
</body></html>
"""


def _size(size: int) -> str:
    return f'<td class="size" data-value="{size}">{_e(human_bytes(size))}</td>'


def _last(at: float | None) -> str:
    return f'<td class="last-pulled" data-value="{at or ""}">{_e(when_utc(at))}</td>'


def repositories(page: Page, rules: Sequence[SyncView], admin: Admin | None) -> str:
    rows = []
    for r in page.rows:
        assert isinstance(r, RepositoryRow)
        name = f"{r.upstream}/{r.repository}"
        buttons = "" if admin is None else form(admin, "purge", "purge repository",
                                                target=name)
        rows.append(
            f'<tr class="repository" data-name="{_e(name)}">'
            f'<td><a href="{_e(repository_url(r.upstream, r.repository))}">{_e(name)}</a></td>'
            f'<td class="tags" data-value="{r.tags}">{r.tags}</td>{_size(r.size)}'
            f'{_last(r.last_pulled)}<td class="pinned" data-value="{r.pinned}">'
            f'{r.pinned or ""}</td>{"" if admin is None else f"<td>{buttons}</td>"}</tr>')
    head = ("<tr><th>repository</th><th>tags</th><th>size</th><th>last pulled (UTC)</th>"
            f"<th>pinned images</th>{'' if admin is None else '<th></th>'}</tr>")
    table = (f"<table>{head}{''.join(rows)}</table>" if rows
             else '<p class="none">Nothing is cached yet (or nothing you may pull).</p>')
    return _document("cache", f"<h1>Cache browser</h1>{table}{_page_links(page, '/cache')}"
                     + _rules(rules, admin))


def _rules(rules: Sequence[SyncView], admin: Admin | None) -> str:
    if not rules:
        return ""
    rows = []
    for r in rules:
        state = ("running" if r.running else "not run yet" if r.ok is None
                 else "ok" if r.ok else "failed")
        button = "" if admin is None or r.running else form(admin, "sync", "sync now",
                                                             rule=r.name)
        rows.append(f'<tr class="sync-rule" data-name="{_e(r.name)}"><td>{_e(r.name)}</td>'
                    f"<td>{_e(r.what)}</td><td>{_e(when_utc(r.finished))}</td>"
                    f'<td class="state">{state}</td>'
                    f'{"" if admin is None else f"<td>{button}</td>"}</tr>')
    return ("<h2>Sync rules</h2><table><tr><th>rule</th><th>what</th><th>last run (UTC)</th>"
            f"<th>result</th>{'' if admin is None else '<th></th>'}</tr>{''.join(rows)}"
            "</table>")


def images(upstream: str, repository: str, page: Page, admin: Admin | None) -> str:
    name = f"{upstream}/{repository}"
    rows = []
    for r in page.rows:
        assert isinstance(r, ImageRow)
        sep = "@" if ":" in r.reference else ":"
        image = f"{name}{sep}{r.reference}"
        rows.append(
            f'<tr class="image" data-reference="{_e(r.reference)}" data-digest="{_e(r.digest)}"'
            f' data-pinned="{_e(",".join(r.pinned_by))}"><td>{_e(r.reference)}</td>'
            f'<td class="digest">{_e(r.digest[:19])}…</td>{_size(r.size)}{_last(r.last_pulled)}'
            f'<td class="pinned">{_e(", ".join(r.pinned_by))}</td>'
            f'{"" if admin is None else f"<td>{_image_buttons(admin, image, r)}</td>"}</tr>')
    head = ("<tr><th>tag or digest</th><th>digest</th><th>size</th><th>last pulled (UTC)</th>"
            f"<th>pinned by</th>{'' if admin is None else '<th></th>'}</tr>")
    table = (f"<table>{head}{''.join(rows)}</table>" if rows
             else '<p class="none">No image of this repository is cached.</p>')
    return _document(name, f"<h1>{_e(name)}</h1>{table}"
                     + _page_links(page, repository_url(upstream, repository)))


def _image_buttons(admin: Admin, image: str, row: ImageRow) -> str:
    by_admin = any(p.startswith("by ") for p in row.pinned_by)
    pin = (form(admin, "unpin", "unpin", target=image) if by_admin
           else form(admin, "pin", "pin", target=image))
    return pin + ("" if row.pinned_by else form(admin, "purge", "purge", target=image))


def result(title: str, lines: Sequence[str], ok: bool, back: str,
           confirm: str | None = None, admin: Admin | None = None) -> str:
    """What an action did (or, for a purge not yet confirmed, what it would remove, with the
    button that does it)."""
    text = "".join(f"<p>{_e(line)}</p>" for line in lines)
    button = ("" if confirm is None or admin is None
              else form(admin, "purge", "purge now", css="purge confirm", target=confirm,
                        confirm="yes"))
    return _document(title, f'<h1 class="{"ok" if ok else "bad"}" id="result">{_e(title)}</h1>'
                     f'<div id="details">{text}</div>{button}'
                     f'<p><a id="back" href="{_e(back)}">back</a></p>')
