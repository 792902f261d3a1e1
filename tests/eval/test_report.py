"""eval/report.py: a self-contained, well-formed HTML report from plain data (no models, no Ray)."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from eval.evaluate import frame_row, jpeg_bytes, stack_rows
from eval.plots import smooth
from eval.report import ReportData, render_report
from pipeline.config import to_dict
from pipeline.datacard import SCORE_AXES, bin_counts, bin_edges
from pipeline.filters import FilterConfig
from tests.browser import render
from training.runlog import MetricsDigest

VOID = {"meta", "img", "br", "hr", "link", "input"}
SHA = {"data": "d" * 64, "ckpt2": "a" * 64, "ckpt4": "b" * 64, "clip": "c" * 64, "vae": "e" * 64,
       "detector": "6efd8dad" + "0" * 56, "eval": "f" * 64, "eval_old": "9" * 64}


class Checker(HTMLParser):
    """Collects tags, attributes and text, and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def row(steps: int, fvd: float, sha: str, eval_sha: str = SHA["eval"], night: str = "2026-11-20") -> dict:
    return {
        "timestamp": f"{night}T02:00:{steps:02d}+00:00", "night": night, "checkpoint": f"checkpoint-{steps:08d}",
        "checkpoint_uri": f"/runs/x/checkpoint-{steps:08d}", "steps_done": steps, "fvd": fvd, "n_real": 5,
        "n_fake": 5, "num_frames": 17, "clip_score": 24.9, "clip_score_real": 24.5,
        "detector_sha256": SHA["detector"], "eval_sha256": eval_sha, "reals_split": "all", "reals_held_out": False,
        "random_init": True, "random_init_models": ["clip", "vae"], "sizes_px": ["224x128"],
        "fingerprints": {"checkpoint_weights_sha256": sha, "checkpoint_code_version": "git:abc123",
                         "data_sha256": SHA["data"], "clip_weights_sha256": SHA["clip"],
                         "vae_weights_sha256": SHA["vae"], "clip_scorer_sha256": SHA["clip"],
                         "detector_sha256": SHA["detector"], "eval_sha256": eval_sha,
                         "eval_code_version": "git:def456"},
        "samples_uri": f"/runs/x/eval/samples/checkpoint-{steps:08d}", "device": "cpu", "wall_s": 3.0,
    }


@pytest.fixture(scope="module")
def data() -> ReportData:
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (17, 128, 224, 3), dtype=np.uint8)
    strip = jpeg_bytes(stack_rows([frame_row(video, 6, 48), frame_row(video[:, :, :176], 6, 48)]))
    history = [row(2, 900.0, SHA["ckpt2"]), row(4, 850.5, SHA["ckpt4"], night="2026-11-21"),
               row(2, 1234.0, SHA["ckpt2"], eval_sha=SHA["eval_old"])]
    card = {
        "data_uri": "/runs/x/data", "data_sha256": SHA["data"], "config_sha256": "0" * 64, "code_version": "git:1",
        "random_init": True, "models": {}, "splits": {"train": 12},
        "totals": {"clips": 12, "sources_processed": 3, "source_seconds": 19.3, "reject_rows": 2},
        "buckets": [{"bucket": "128p_16x9_17f", "width_px": 224, "height_px": 128, "num_frames": 17, "fps": 8.0,
                     "clips": 2, "splits": {"train": 2}}],
        "rejects": [{"stage": "probe", "reason": "no video stream (streams: audio)", "rows": 2}],
        "filtered_by_score": {"sharpness": 3},
        "thresholds": {name: to_dict(rng) for name, rng in FilterConfig().ranges().items()},
        "scores": {name: {"edges": bin_edges(name).tolist(), "log": SCORE_AXES[name][2],
                          "kept": bin_counts(name, rng.uniform(0, 50, 12)).tolist(), "kept_moving": None,
                          "filtered": {"sharpness": bin_counts(name, rng.uniform(0, 10, 3)).tolist()}}
                   for name in SCORE_AXES},
        "captions": {"clips": 12, "sources": {"template": 12}, "word_counts": [0] * 5 + [12] + [0] * 75,
                     "sample_clips": 12, "sample_distinct": 1, "sample_most_common": [("a shot of an airplane", 12)]},
        "examples": [{"clip_id": "abc-0000000-17f", "caption": "a <b>bold</b> caption", "bucket": "128p_16x9_17f",
                      "split": "train", "clip_score": 3.2, "keyframe_jpeg": strip}],
        "filtered_examples": {"sharpness": [{"clip_id": "abc-0000040-17f", "source_uri": "/in/a.mp4",
                                             "reason": "sharpness 3.1 < min 15 (filter.sharpness)", "value": 3.1,
                                             "keyframe_jpeg": strip}]},
    }
    plan = {"num_frames": 17, "reals_split": "all", "held_out": False, "reals": ["abc-0000000-17f"],
            "videos": [{"index": 0, "prompt": "<script>alert(1)</script>", "seed": 0, "width_px": 224,
                        "height_px": 128, "num_frames": 17}]}
    fingerprints = {"run dir": "/runs/x", "eval set sha256": SHA["eval"], "detector sha256": SHA["detector"],
                    "data sha256 (manifest)": SHA["data"],
                    "CLIP (text encoder + captions)": {"arch": "tiny", "weights": "random-init",
                                                       "weights_sha256": SHA["clip"]},
                    "VAE": {"class": "AutoencoderKL", "weights": "random-init", "weights_sha256": SHA["vae"]}}
    metrics = MetricsDigest()
    for s in range(6):
        metrics.add({"step": s, "loss": 1.0 / (1 + s), "lr": 1e-3})
    return ReportData(run_uri="/runs/x", generated_at="2026-11-21T02:10:00+00:00", eval_sha256=SHA["eval"],
                      history=history, metrics=metrics, card=card, plan=plan, fingerprints=fingerprints,
                      config_yaml="sampling:\n  steps: 8\n", strips={history[1]["samples_uri"]: strip},
                      reals_strip=strip, evaluated_now=["checkpoint-00000004"])


@pytest.fixture(scope="module")
def parsed(data: ReportData) -> tuple[str, Checker]:
    page = render_report(data)
    checker = Checker()
    checker.feed(page)
    checker.close()
    return page, checker


def test_report_is_well_formed_html(parsed: tuple[str, Checker]) -> None:
    page, c = parsed
    assert c.doctype.lower() == "doctype html"
    assert c.errors == [] and c.stack == []
    names = [t for t, _ in c.tags]
    assert names[:4] == ["html", "head", "meta", "title"] and "style" in names and "body" in names
    assert names.count("table") >= 6  # summary, metrics, buckets, rejects, fingerprints, checkpoints
    assert "script" not in names  # the prompt's <script> is text, escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &lt;b&gt;bold&lt;/b&gt; caption" in page


def test_report_is_self_contained(parsed: tuple[str, Checker]) -> None:
    page, c = parsed
    images = [a for t, a in c.tags if t == "img"]
    # 3 trends, loss, reals strip, one checkpoint strip, one kept and one filtered keyframe of the data card
    assert len(images) == 3 + 1 + 1 + 1 + 1 + 1
    assert sum(t == "svg" for t, _ in c.tags) == len(SCORE_AXES) + 1  # the card's score histograms, caption lengths
    for attrs in images:
        mime, _, payload = attrs["src"].partition(";base64,")
        assert mime in ("data:image/png", "data:image/jpeg") and attrs["alt"]
        raw = base64.b64decode(payload, validate=True)
        assert raw.startswith(b"\x89PNG" if mime.endswith("png") else b"\xff\xd8")
    for _, attrs in c.tags:
        assert "href" not in attrs
        assert all(v is None or not v.startswith(("http:", "https:", "//")) for v in attrs.values())
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_report_shows_metrics_labels_and_fingerprints(parsed: tuple[str, Checker]) -> None:
    page, c = parsed
    text = " ".join(c.text)
    assert "850.50" in text and "900.00" in text and "1,234.00" in text  # every history row, old set included
    assert 'class="badge random-init"' in page and "random-init" in text
    assert "Reals are not held out" in text
    for sha in SHA.values():  # checkpoint, data, CLIP, VAE, detector and eval-set fingerprints
        assert sha[:16] in page, sha
    assert "git:abc123" in text and "no video stream (streams: audio)" in text
    old_rows = [a for t, a in c.tags if t == "tr" and a.get("class") == "old"]
    assert len(old_rows) == 1  # the row of another eval set is greyed, not plotted


def test_report_without_history_or_metrics(data: ReportData) -> None:
    empty = ReportData(**{**data.__dict__, "history": [], "metrics": MetricsDigest(), "strips": {}, "evaluated_now": []})
    page = render_report(empty)
    assert "No evaluated checkpoints yet" in page and "No training metrics" in page


def test_strips_and_smoothing() -> None:
    video = np.zeros((9, 20, 40, 3), np.uint8)
    r = frame_row(video, 3, 10)
    assert r.shape == (10, 3 * 20 + 2 * 2, 3)  # 3 frames 20 px wide, 2 px white gaps
    assert stack_rows([r, r[:, :30]]).shape == (22, 64, 3)
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0


def test_report_renders_in_a_real_browser(data: ReportData, tmp_path: Path) -> None:
    """Headless Chromium: no console errors (the prompt's <script> stays text), every inline image
    decodes (trend plots, sample strips, the data card's keyframes), a screenshot is kept."""
    path = tmp_path / "report.html"
    path.write_text(render_report(data))
    page = render(path, "report-synthetic")
    assert page.console_errors == [], page.console_errors
    assert page.broken_images == [] and page.images >= 3, page
    assert page.title == "DiTharos nightly eval" and page.screenshot.stat().st_size > 10_000
    # A page with a corrupt image and a script error is caught by the same check (the check can fail).
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><title>x</title></head><body>"
                   "<img alt='broken strip' src='data:image/jpeg;base64,AAAA'><script>undefinedCall()</script>"
                   "</body></html>")
    broken = render(bad, "report-broken-on-purpose")
    assert broken.broken_images == ["broken strip"] and any("undefinedCall" in e for e in broken.console_errors)
