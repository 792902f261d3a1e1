"""Small builders for DiTharos's self-contained HTML pages (inline CSS, images as data URIs).

The data card (`pipeline/inspect.py`) and the nightly report (`eval/report.py`) share them:
cells and text are escaped here, numeric cells right-aligned, `random-init` badges alike.
"""

from __future__ import annotations

import base64
import html
from typing import Any

RANDOM_INIT = "random-init"
JPEG = "image/jpeg"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.old td{color:#888}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}
.random-init{background:#ffe0e0;color:#a00;border:1px solid #e99}
.warn{background:#fff4d6;border:1px solid #e8c66b;padding:8px 12px;border-radius:6px;margin:8px 0}
.note{color:#555;font-size:13px} .mono,code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{background:#f7f7f7;padding:8px;overflow-x:auto} img{max-width:100%} figure{margin:8px 0}
figcaption{font-size:12px;color:#555} .grid{display:flex;flex-wrap:wrap;gap:12px}
.example{width:200px;font-size:12px} .example img{width:200px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img(data: bytes, alt: str, mime: str = "image/png") -> str:
    return f'<img alt="{esc(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def badge_random_init(models: list[str] | None = None) -> str:
    detail = f" ({', '.join(models)})" if models else ""
    return f'<span class="badge random-init">{RANDOM_INIT}{esc(detail)}</span>'


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return esc(value)


def table(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    """Cells are already-escaped HTML; numeric-looking cells are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if _numeric(c) else f"<td>{c}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _numeric(cell: str) -> bool:
    return cell.replace(",", "").replace(".", "", 1).replace("-", "", 1).isdigit()


def kv_table(pairs: list[tuple[str, Any]]) -> str:
    return table(["", ""], [[esc(k), f'<span class="mono">{esc(v)}</span>'] for k, v in pairs])
