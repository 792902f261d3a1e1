"""The nightly report: one self-contained HTML file (inline CSS, images as base64 data URIs, no links out).

`render_report(ReportData) -> str` is pure: the nightly driver gathers history, training
metrics, the data card, sample strips and fingerprints; this module only lays them out.
Sections: metrics table, trends over checkpoints and nights, training loss, sample strips,
data card, fingerprints, eval config and method notes. Anything measured with random-init
models carries a visible `random-init` label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from eval import plots
from pipeline.inspect import CARD_CSS, card_html
from pipeline.pages import CSS, JPEG, RANDOM_INIT, badge_random_init, esc, fmt, img, kv_table, table
from training.runlog import MetricsDigest


@dataclass
class ReportData:
    """Everything the report shows, gathered by the driver."""

    run_uri: str
    generated_at: str
    eval_sha256: str  # the current eval set; rows of other sets are listed but not plotted
    history: list[dict[str, Any]]
    metrics: MetricsDigest  # the training run log's rows, thinned
    card: dict[str, Any]  # pipeline.datacard.data_card
    plan: dict[str, Any]  # num_frames, reals_split, held_out, reals (clip ids), videos (prompt/seed/size)
    fingerprints: dict[str, Any]  # run-level: data, models, detector, eval config, code versions
    config_yaml: str
    strips: dict[str, bytes] = field(default_factory=dict)  # history row samples_uri → strip JPEG
    reals_strip: bytes | None = None
    evaluated_now: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Small builders
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def _header(d: ReportData, current: list[dict[str, Any]]) -> str:
    random_models = sorted({m for r in d.history for m in r.get("random_init_models", [])}
                           | {m for m, fp in d.card.get("models", {}).items() if fp.get("weights") == RANDOM_INIT})
    if d.card.get("random_init") and not random_models:
        random_models = ["data"]
    parts = [f"<h1>DiTharos nightly eval</h1><p class='note'>run <code>{esc(d.run_uri)}</code> · "
             f"generated {esc(d.generated_at)} · eval set <code>{esc(d.eval_sha256[:12])}</code></p>"]
    if random_models:
        parts.append(f"<div class='warn'>{badge_random_init(random_models)} Models here have random-init "
                     "weights: captions, latents, FVD and CLIP-scores are structurally real but say nothing "
                     "about video quality.</div>")
    if not d.plan.get("held_out", True):
        parts.append("<div class='warn'><b>Reals are not held out.</b> The shards hold too few clips of the "
                     "eval split (reals.split), so the real clips for FVD come from every split (reals.allow_train) "
                     "and include clips the model trained on.</div>")
    for e in d.errors:
        parts.append(f"<div class='warn'><b>Error:</b> {esc(e)}</div>")
    now = ", ".join(d.evaluated_now) or "nothing new"
    latest = current[-1] if current else None
    summary = [("evaluated this run", now), ("checkpoints in history (this eval set)", len(current))]
    if latest:
        summary += [("latest FVD", f"{latest['fvd']:.2f} at step {latest['steps_done']}"),
                    ("latest CLIP-score", f"{latest['clip_score']:.2f} (real clips {latest['clip_score_real']:.2f})")]
    return "".join(parts) + kv_table(summary)


def _metrics_table(d: ReportData) -> str:
    rows, classes = [], []
    for r in sorted(d.history, key=lambda r: (r["timestamp"], r["steps_done"]), reverse=True):
        label = badge_random_init() if r.get("random_init") else ""
        reals = r.get("reals_split", "") + ("" if r.get("reals_held_out", True) else " (not held out)")
        rows.append([esc(r["night"]), esc(r["checkpoint"]), fmt(r["steps_done"]), fmt(r["fvd"]),
                     fmt(r["clip_score"]), fmt(r["clip_score_real"]), f"{r['n_real']} / {r['n_fake']}",
                     fmt(r["num_frames"]), esc(", ".join(r.get("sizes_px", []))), esc(reals),
                     f"<code>{esc(r['eval_sha256'][:8])}</code>", label])
        classes.append("" if r["eval_sha256"] == d.eval_sha256 else "old")
    headers = ["night", "checkpoint", "steps", "FVD ↓", "CLIP-score ↑", "CLIP-score (real)", "real / generated",
               "frames", "sizes", "reals", "eval set", ""]
    note = ("<p class='note'>Grey rows were measured on another eval set (config or prompts changed); "
            "they are not plotted.</p>")
    return "<h2>Metrics</h2>" + table(headers, rows, classes) + note


def _trends(current: list[dict[str, Any]]) -> str:
    if not current:
        return "<h2>Trends</h2><p>No evaluated checkpoints yet.</p>"
    figs = [
        (plots.trend_plot(current, "fvd", "FVD"), "FVD by checkpoint (lower is better)"),
        (plots.trend_plot(current, "clip_score", "CLIP-score", "clip_score_real", "real clips vs their captions"),
         "CLIP-score of generated videos vs their prompts; dashed: the real clips vs their captions"),
        (plots.nights_plot(current, "fvd", "FVD"), "FVD by night of evaluation"),
    ]
    body = "".join(f"<figure>{img(png, cap)}<figcaption>{esc(cap)}</figcaption></figure>" for png, cap in figs)
    return f"<h2>Trends</h2><div class='grid'>{body}</div>"


def _loss(d: ReportData, current: list[dict[str, Any]]) -> str:
    if not d.metrics.num_rows:
        return "<h2>Training loss</h2><p>No training metrics in the run dir.</p>"
    png = plots.loss_plot(d.metrics.points, sorted({r["steps_done"] for r in current}))
    last = d.metrics.last
    info = kv_table([("steps logged", d.metrics.num_rows), ("last loss", fmt(last.get("loss"), 4)),
                     ("last tokens/s", fmt(last.get("tokens_per_s"), 0))])
    return f"<h2>Training loss</h2><figure>{img(png, 'training loss')}</figure>{info}"


def _samples(d: ReportData, current: list[dict[str, Any]]) -> str:
    videos = d.plan.get("videos", [])
    prompts = "".join(f"<li><code>{esc(v['index'])}</code> seed {esc(v['seed'])}, {esc(v['width_px'])}×"
                      f"{esc(v['height_px'])} px: {esc(v['prompt'])}</li>" for v in videos[:8])
    parts = ["<h2>Samples</h2>",
             f"<p class='note'>Rows = the first videos of the fixed eval set, evenly spaced frames; "
             f"{esc(d.plan.get('num_frames'))} frames each. Prompts:</p><ol class='note'>{prompts}</ol>"]
    if d.reals_strip:
        parts.append(f"<h3>Real clips (decoded from their latents)</h3>{img(d.reals_strip, 'real clips', JPEG)}")
    for r in sorted(current, key=lambda r: r["steps_done"], reverse=True):
        strip = d.strips.get(r["samples_uri"])
        label = badge_random_init() if r.get("random_init") else ""
        parts.append(f"<h3>{esc(r['checkpoint'])} · step {esc(r['steps_done'])} · FVD {fmt(r['fvd'])} {label}</h3>")
        parts.append(img(strip, f"samples of {r['checkpoint']}", JPEG) if strip else "<p>strip not found</p>")
        parts.append(f"<p class='note mono'>{esc(r['samples_uri'])}</p>")
    return "".join(parts)


def _data_card(card: dict[str, Any]) -> str:
    return card_html(card)  # the same card `python pipeline/inspect.py` writes as a page


def _fingerprints(d: ReportData) -> str:
    f = d.fingerprints
    pairs = [(k, v) for k, v in f.items() if not isinstance(v, dict)]
    parts = ["<h2>Fingerprints</h2>", kv_table(pairs)]
    for name, value in f.items():
        if isinstance(value, dict):
            label = f" {badge_random_init()}" if value.get("weights") == RANDOM_INIT else ""
            parts.append(f"<h3>{esc(name)}{label}</h3>" + kv_table(list(value.items())))
    code = lambda value: f"<code>{esc(value)}</code>"  # noqa: E731
    rows = [[esc(r["checkpoint"]), fmt(r["steps_done"]), code(r["fingerprints"]["checkpoint_weights_sha256"]),
             code(r["fingerprints"]["checkpoint_code_version"]), code(r["fingerprints"]["data_sha256"][:16]),
             code(r["eval_sha256"][:16])]
            for r in sorted(d.history, key=lambda r: (r["steps_done"], r["timestamp"]))]
    parts.append("<h3>Checkpoints</h3>" + table(["checkpoint", "steps", "weights sha256", "code version",
                                                 "data sha256", "eval set"], rows))
    return "".join(parts)


def _method(d: ReportData) -> str:
    p = d.plan
    reals = ("held-out clips (split " + esc(p.get("reals_split")) + ")" if p.get("held_out", True)
             else "clips of every split (<b>not held out</b>)")
    return (
        "<h2>Method</h2><ul class='note'>"
        f"<li><b>Real clips for FVD</b> are {len(p.get('reals', []))} {reals} of the shards, decoded from their "
        "stored latents by the data's own VAE (VAE reconstructions). Shards keep latents, not pixels; decoding "
        "gives reals at exactly the generated size and frame count through the same decoder, so FVD measures "
        "the DiT and not the VAE's reconstruction error.</li>"
        f"<li><b>Generated videos</b>: one per prompt with fixed seeds (video i: seed + i), paired with real clip "
        f"i for its default prompt (the caption) and size; {esc(p.get('num_frames'))} frames.</li>"
        "<li><b>FVD</b>: Kinetics-400 I3D (TF-Hub i3d-kinetics-400/1 weights), TF protocol (bilinear 224², "
        "logits averaged over time, Fréchet distance). With N ≤ 400 videos per set the covariances are "
        "rank-deficient and FVD is biased upwards: compare only numbers of one eval set.</li>"
        "<li><b>CLIP-score</b>: 100 · cosine(frame, prompt) averaged over frames and videos (torchmetrics "
        "convention). The reference line scores the real clips against their captions; when the scoring CLIP "
        "is the one that chose those captions, that reference is biased upwards.</li></ul>"
        f"<h3>Eval config</h3><pre>{esc(d.config_yaml)}</pre>"
        f"<h3>Eval set</h3><pre>{esc(json.dumps({k: p[k] for k in ('reals', 'num_frames') if k in p}, indent=1))}</pre>"
    )


def render_report(d: ReportData) -> str:
    """The whole report as one HTML string."""
    current = sorted((r for r in d.history if r["eval_sha256"] == d.eval_sha256), key=lambda r: r["steps_done"])
    body = "".join([_header(d, current), _metrics_table(d), _trends(current), _loss(d, current),
                    _samples(d, current), _data_card(d.card), _fingerprints(d), _method(d)])
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>DiTharos nightly eval</title>"
            f"<style>{CSS}{CARD_CSS}</style></head><body>{body}</body></html>\n")


__all__ = ["RANDOM_INIT", "ReportData", "render_report"]
