"""The data card as one self-contained HTML page, to tune the curation filters by.

    python pipeline/inspect.py DATA_URI [--out datacard.html] [--examples 8]

DATA_URI is a pipeline output (local path or any pyarrow URI, e.g. s3://bucket/data). The page
shows a histogram of every curation score — kept clips, and filtered clips by the score that
filtered them — with the thresholds the output was made with marked; kept vs filtered by
reason; the bucket distribution; caption lengths; contact sheets of sample kept clips and of
sample filtered clips per reason. `card_html` is the same card as a section, which the nightly
report embeds. Reading is one streaming pass over the index and the rejects (pipeline/datacard.py).
"""

from __future__ import annotations

import os
import sys

# `python pipeline/inspect.py` puts pipeline/ first on sys.path, where this file would stand in
# for the standard library's `inspect` (which dataclasses imports): point it at the repo first.
if __package__ in (None, ""):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import math
from typing import Any

from pipeline.pages import CSS, JPEG, badge_random_init, esc, fmt, img, kv_table, table

CARD_CSS = """
.hists{display:flex;flex-wrap:wrap;gap:18px} .hist{font-size:12px} .hist svg{background:#fcfcfc;border:1px solid #eee}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;vertical-align:middle}
"""
KEPT, SELF, OTHER, MARK = "#4e79a7", "#e15759", "#bab0ac", "#222"
SVG_W, SVG_H, PAD_L, PAD_R, PAD_B = 420, 150, 42, 22, 22


# ---------------------------------------------------------------------------
# Histograms as inline SVG (crisp at any zoom, no plotting library in the pipeline)
# ---------------------------------------------------------------------------


def _x(value: float, edges: list[float], log: bool) -> float:
    """Pixel x of `value` on an axis spanning edges[0]..edges[-1]."""
    lo, hi = edges[0], edges[-1]
    if log:
        value = min(max(value, lo), hi)
        frac = (math.log10(value) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    else:
        frac = (min(max(value, lo), hi) - lo) / (hi - lo)
    return PAD_L + frac * (SVG_W - PAD_L - PAD_R)


def histogram_svg(edges: list[float], log: bool, series: list[tuple[str, list[int], str]],
                  marks: list[tuple[float, str]], title: str) -> str:
    """Stacked bars of `series` [(label, counts per bin, colour)] with dashed threshold `marks`."""
    totals = [sum(s[1][i] for s in series) for i in range(len(edges) - 1)]
    top = max(totals + [1])
    plot_h = SVG_H - PAD_B - 8
    parts = [f'<svg width="{SVG_W}" height="{SVG_H}" role="img" '
             f'aria-label="{esc(title)}">']
    for i in range(len(edges) - 1):
        x0, x1 = _x(edges[i], edges, log), _x(edges[i + 1], edges, log)
        base = SVG_H - PAD_B
        for label, counts, colour in series:
            h = plot_h * counts[i] / top
            if h > 0:
                parts.append(f'<rect x="{x0:.1f}" y="{base - h:.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                             f'height="{h:.1f}" fill="{colour}"><title>{esc(label)}: {counts[i]}</title></rect>')
                base -= h
    ticks = ([10.0 ** k for k in range(round(math.log10(edges[0])), round(math.log10(edges[-1])) + 1)] if log
             else [edges[0] + (edges[-1] - edges[0]) * k / 4 for k in range(5)])
    for t in ticks:
        x = _x(t, edges, log)
        parts.append(f'<line x1="{x:.1f}" y1="{SVG_H - PAD_B}" x2="{x:.1f}" y2="{SVG_H - PAD_B + 4}" stroke="#888"/>'
                     f'<text x="{x:.1f}" y="{SVG_H - 6}" font-size="10" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="4" y="14" font-size="10">{top:,}</text>'
                 f'<line x1="{PAD_L}" y1="{SVG_H - PAD_B}" x2="{SVG_W - PAD_R}" y2="{SVG_H - PAD_B}" stroke="#888"/>')
    for value, label in marks:
        x = _x(value, edges, log)
        parts.append(f'<line x1="{x:.1f}" y1="6" x2="{x:.1f}" y2="{SVG_H - PAD_B}" stroke="{MARK}" '
                     f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="16" font-size="10">{esc(label)}</text>')
    return "".join(parts) + "</svg>"


def _legend(items: list[tuple[str, str]]) -> str:
    return "<div class='legend'>" + "".join(f"<span style='background:{c}'></span>{esc(t)}" for t, c in items) + "</div>"


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def _scores(card: dict[str, Any]) -> str:
    ranges = card.get("thresholds") or {}
    note = ("Dashed lines: the thresholds this output was made with (its config.yaml, section <code>filter</code>)."
            if ranges else "No thresholds recorded for this output (made without filters or by another version).")
    out = [f"<h3>Curation scores</h3><p class='note'>{note} Motion scores count clips of 2+ frames only "
           "(a 1-frame clip has none).</p>", "<div class='hists'>"]
    for name, h in card["scores"].items():
        kept = h["kept_moving"] if h.get("kept_moving") is not None else h["kept"]
        series = [("kept", kept, KEPT)]
        if name in h["filtered"]:
            series.append((f"filtered by {name}", h["filtered"][name], SELF))
        others = [c for s, c in h["filtered"].items() if s != name]
        if others:
            series.append(("filtered by another score", [sum(v) for v in zip(*others)], OTHER))
        rng = ranges.get(name) or {}
        marks = [(rng[k], f"{k} {rng[k]:g}") for k in ("min", "max") if rng.get(k) is not None]
        out.append(f"<figure class='hist'>{histogram_svg(h['edges'], h['log'], series, marks, name)}"
                   f"<figcaption><b>{esc(name)}</b> {'(log axis)' if h['log'] else ''}</figcaption></figure>")
    out.append("</div>" + _legend([("kept", KEPT), ("filtered by this score", SELF), ("filtered by another", OTHER)]))
    return "".join(out)


def _kept_vs_filtered(card: dict[str, Any]) -> str:
    clips = card["totals"].get("clips", 0)
    filtered = card.get("filtered_by_score", {})
    cut = clips + sum(filtered.values())
    ranges = card.get("thresholds") or {}
    rows = [["kept", "", fmt(clips), f"{100 * clips / cut:.1f}%" if cut else "—"]]
    for score, n in sorted(filtered.items(), key=lambda kv: -kv[1]):
        rng = ranges.get(score) or {}
        allowed = " ".join(f"{k} {rng[k]:g}" for k in ("min", "max") if rng.get(k) is not None)
        rows.append([f"filtered: {esc(score)}", esc(allowed), fmt(n), f"{100 * n / cut:.1f}%"])
    return "<h3>Kept vs filtered</h3>" + table(["clips", "allowed range", "count", "share of cut clips"], rows)


def _buckets(card: dict[str, Any]) -> str:
    splits = sorted({s for b in card["buckets"] for s in b["splits"]})
    rows = [[esc(b["bucket"]), f"{esc(b['width_px'])}×{esc(b['height_px'])}", fmt(b["num_frames"]), fmt(b["fps"]),
             fmt(b["clips"])] + [fmt(b["splits"].get(s, 0)) for s in splits] for b in card["buckets"]]
    return "<h3>Clips per bucket</h3>" + table(["bucket", "size px", "frames", "fps", "clips"] + splits, rows)


def _rejects(card: dict[str, Any]) -> str:
    rows = [[esc(r["stage"]), esc(r["reason"]), fmt(r["rows"])] for r in card["rejects"]]
    return "<h3>Rejects by reason</h3>" + (table(["stage", "reason (numbers folded to N)", "rows"], rows)
                                           if rows else "<p>No rejects.</p>")


def _captions(card: dict[str, Any]) -> str:
    c = card["captions"]
    words = c["word_counts"]
    edges = [float(i) for i in range(len(words) + 1)]
    hist = histogram_svg(edges, False, [("clips", words, KEPT)], [], "caption length")
    common = "; ".join(f"“{esc(text)}” × {n}" for text, n in c["sample_most_common"])
    return (f"<h3>Captions</h3><p>{fmt(c['clips'])} clips; caption sources {esc(c['sources'])}. In a sample of "
            f"{c['sample_clips']} clips: {c['sample_distinct']} distinct caption(s); most common: {common}</p>"
            f"<figure class='hist'>{hist}<figcaption>caption length, words (last bin: "
            f"{len(words) - 1} or more)</figcaption></figure>")


def _example(picture: bytes | None, alt: str, lines: list[str]) -> str:
    pic = img(picture, alt, JPEG) if picture else "<p class='note'>no frame stored</p>"
    return f"<div class='example'>{pic}" + "".join(f"<div>{line}</div>" for line in lines) + "</div>"


def _contact_sheets(card: dict[str, Any]) -> str:
    kept = [_example(ex.get("keyframe_jpeg"), ex["clip_id"],
                     [f"“{esc(ex['caption'])}”", f"<span class='note'>{esc(ex['bucket'])} · {esc(ex['split'])} · "
                      f"CLIP {fmt(ex['clip_score'])}</span>"]) for ex in card["examples"]]
    out = ["<h3>Kept clips (a fixed sample)</h3>", f"<div class='grid'>{''.join(kept)}</div>" if kept
           else "<p>No clips.</p>"]
    filtered = card.get("filtered_examples") or {}
    for score, exs in filtered.items():
        sheet = [_example(ex.get("keyframe_jpeg"), ex["clip_id"],
                          [f"<span class='mono'>{esc(ex['reason'])}</span>"]) for ex in exs]
        out.append(f"<h3>Filtered by {esc(score)} (a sample)</h3><div class='grid'>{''.join(sheet)}</div>")
    if card.get("filtered_by_score") and not filtered:
        out.append("<p class='note'>No frames of filtered clips stored (filter.example_fraction = 0 or no sampled "
                   "clip).</p>")
    return "".join(out)


def card_html(card: dict[str, Any], heading: str = "h2") -> str:
    """The data card as an HTML section (no page around it)."""
    label = badge_random_init() if card.get("random_init") else ""
    t = card.get("totals", {})
    summary = kv_table([("data", card["data_uri"]), ("clips", t.get("clips")), ("sources", t.get("sources_processed")),
                        ("source video", f"{t.get('source_seconds')} s"), ("clips by split", card.get("splits")),
                        ("reject rows", t.get("reject_rows")), ("filtered by score", card.get("filtered_by_score"))])
    return "".join([f"<{heading}>Data card {label}</{heading}>", summary, _kept_vs_filtered(card), _scores(card),
                    _buckets(card), _rejects(card), _captions(card), _contact_sheets(card)])


def render_page(card: dict[str, Any]) -> str:
    """One self-contained HTML page."""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>DiTharos data card</title>"
            f"<style>{CSS}{CARD_CSS}</style></head><body>{card_html(card, 'h1')}</body></html>\n")


def main(argv: list[str] | None = None) -> str:
    from pipeline.datacard import data_card
    from pipeline.manifest import ManifestError, read_manifest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_uri", help="a pipeline output (local path or pyarrow URI)")
    parser.add_argument("--out", default="datacard.html", help="where to write the page (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=8, help="example clips per contact sheet")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.data_uri)
    except (FileNotFoundError, ManifestError) as e:
        sys.exit(f"error: {e}")
    page = render_page(data_card(args.data_uri, manifest, args.examples))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"data card: {args.out} ({len(page) / 1024:.0f} KB)")
    return args.out


if __name__ == "__main__":
    main()
