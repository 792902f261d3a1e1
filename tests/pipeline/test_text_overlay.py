"""pipeline/text_overlay.py: PP-OCR finds title cards and subtitles on real footage and nothing on
clean footage; the classical fallback finds text on plain backgrounds; config and loading."""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.samples import sample_dir
from pipeline.settings import PipelineConfig
from pipeline.text_overlay import ClassicalText, PPOCRText, TextConfig, bundled_model, load_text_detector, text_area

NAMES = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def footage(name: str, count: int = 6) -> list[np.ndarray]:
    with av.open(str(sample_dir() / name)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]


def at_short_side(frame: np.ndarray, short: int) -> np.ndarray:
    """A frame as a bucket of that resolution holds it."""
    h, w = frame.shape[:2]
    s = short / min(h, w)
    return cv2.resize(frame, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)


def subtitle(frame: np.ndarray, text: str = "We should have left before") -> np.ndarray:
    """One outlined subtitle line, glyphs ~5.5% of the height, centred low."""
    f = frame.copy()
    h, w = f.shape[:2]
    scale = min(0.055 * h / 22, 0.8 * w / cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 2)[0][0])
    (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    org = ((w - tw) // 2, int(h * 0.9))
    cv2.putText(f, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), max(3, int(scale * 5)), cv2.LINE_AA)
    cv2.putText(f, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(1, int(scale * 2)), cv2.LINE_AA)
    return f


def title_card(frame: np.ndarray, lines=("Chapter 3", "The long road", "north of the river", "1998 - 2004")):
    """Four lines of large white text over the darkened frame."""
    f = (frame * 0.4).astype(np.uint8)
    h, w = f.shape[:2]
    for k, text in enumerate(lines):
        scale = min(0.09 * h / 22, 0.85 * w / cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 2)[0][0])
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
        cv2.putText(f, text, ((w - tw) // 2, int(h * (0.25 + 0.18 * k))), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), max(1, int(scale * 2.5)), cv2.LINE_AA)
    return f


# (detector, clean footage at most, title cards at least, subtitles within): measured on these
# frames (title cards: the mean over a clip's frames) — PP-OCR 0-0.027 / 0.18-0.27 / 0.035-0.053,
# classical 0-0.002 / 0.11-0.23 / 0.016-0.041.
BOUNDS = {"ppocr": (0.03, 0.15, (0.02, 0.1)), "classical": (0.01, 0.105, (0.01, 0.1))}


@pytest.mark.parametrize("short", [128, 240])
@pytest.mark.parametrize("kind", ["ppocr", "classical"])
def test_detectors_tell_title_cards_and_subtitles_from_clean_footage(kind: str, short: int) -> None:
    if kind == "ppocr" and bundled_model() is None:
        pytest.skip("rapidocr_onnxruntime is not installed (pip install '.[ocr]')")
    detector = load_text_detector(kind, "")
    clean_max, card_min, (sub_lo, sub_hi) = BOUNDS[kind]
    default_max = PipelineConfig().filter.text_area.max
    assert sub_hi <= default_max < card_min  # the default drops title cards and keeps a subtitle line
    for name in NAMES:
        frames = [at_short_side(f, short) for f in footage(name)]
        clean = text_area(frames, detector)
        cards = [detector.area(title_card(f)) for f in frames]
        subs = text_area([subtitle(f) for f in frames], detector)
        assert clean <= clean_max, (name, clean)
        assert np.mean(cards) >= card_min and min(cards) >= 0.08, (name, cards)  # the filter sees the mean
        assert sub_lo <= subs <= sub_hi, (name, subs)


@pytest.mark.parametrize("kind", ["ppocr", "classical"])
def test_solid_shapes_are_not_text(kind: str) -> None:
    """PP-OCR's detector once read the generated test scenes' moving square as text (0.11 of the
    frame, probability 0.99) and filtered a whole video of the odd-inputs corpus."""
    from tests.media import scene_frames

    if kind == "ppocr" and bundled_model() is None:
        pytest.skip("rapidocr_onnxruntime is not installed")
    detector = load_text_detector(kind, "")
    for seed in (1, 10):
        frames = list(scene_frames(320, 240, 120, 30, seed=seed))
        assert max(detector.area(f) for f in frames[::10]) < 0.01


def test_classical_reads_a_plain_background_as_no_text() -> None:
    classical = ClassicalText()
    plain = np.tile(np.linspace(40, 120, 480, dtype=np.uint8)[None, :, None], (270, 1, 3))  # a grey ramp
    assert classical.area(plain) == 0.0
    assert classical.area(title_card(plain, ("Chapter 3", "The long road", "north of the river"))) >= 0.1


def test_loading_and_config() -> None:
    assert isinstance(load_text_detector("classical", ""), ClassicalText)
    auto = load_text_detector("auto", "")
    assert isinstance(auto, PPOCRText if bundled_model() else ClassicalText)
    assert load_text_detector("auto", "") is auto  # once per process
    if bundled_model():
        fp = auto.fingerprint()
        assert fp["detector"] == "ppocr" and len(fp["weights_sha256"]) == 64
    with pytest.raises((ConfigError, ValueError), match="filter.text.detector='tesseract': use one of"):
        load_config(PipelineConfig, None, ["filter.text.detector=tesseract"])
    with pytest.raises((ConfigError, ValueError), match="is not a file"):
        load_config(PipelineConfig, None, ["filter.text.model=/nope/det.onnx"])
    assert TextConfig().detector == "auto"


@pytest.mark.skipif(bundled_model() is None, reason="the ocr extra (onnxruntime + rapidocr_onnxruntime) is not installed")
def test_ppocr_batches_a_clip_s_keyframes_and_takes_the_gpu_only_through_onnxruntime_s_cuda_provider(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    frames = footage("bikes.mp4", 3)
    frames = [frames[0], subtitle(frames[1]), title_card(frames[2])]
    cpu = PPOCRText(bundled_model())
    single = [cpu.area(f) for f in frames]
    assert single[0] < 0.03 and single[1] > 0.02 and single[2] > 0.15
    assert cpu.areas(frames) == pytest.approx(single, abs=1e-3)  # one batch, the same boxes
    assert text_area(frames, cpu) == pytest.approx(np.mean(single), abs=1e-3)
    mixed = [frames[0], at_short_side(frames[1], 128)]  # two sizes: two batches, each frame its own
    assert cpu.areas(mixed) == pytest.approx([cpu.area(f) for f in mixed], abs=1e-3)
    # An actor with a GPU but onnxruntime without the CUDA provider (this machine): the CPU, said so.
    on_gpu = PPOCRText(bundled_model(), "cuda")
    assert on_gpu.providers == ["CPUExecutionProvider"] and "no CUDA execution provider" in caplog.text
    # With onnxruntime-gpu: the CUDA provider first on the actor's device, the CPU after it.
    seen = {}

    class Session(ort.InferenceSession):
        def __init__(self, path, options, providers):
            seen["providers"] = providers
            super().__init__(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    PPOCRText(bundled_model(), "cuda:1")
    assert seen["providers"] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def test_the_caption_stage_scores_text_and_files_a_title_card_as_a_filter_reject(
        sample_clips: dict[str, Path]) -> None:
    from pipeline.steps import CaptionStage, VAEStage, make_cut_fn
    from tests.pipeline.test_steps import as_batch, probed

    cfg = load_config(PipelineConfig, None, ["filter.example_fraction=1"])
    rows = [r for r in make_cut_fn(cfg)(probed(sample_clips["carphone_pristine"], cfg)) if r["kind"] == "clip"]
    card = dict(rows[0], clip_id=rows[0]["clip_id"] + "-card",
                frames=np.stack([title_card(f) for f in rows[0]["frames"]]))
    out = CaptionStage(cfg)(as_batch(rows + [card]))
    kinds = list(out["kind"])
    assert kinds == ["clip"] * len(rows) + ["reject"]
    assert all(float(out["text_area"][i]) <= 0.03 for i in range(len(rows)))  # scored, kept
    rec = json.loads(out["record_json"][-1])
    assert rec["stage"] == "filter" and rec["score"] == "text_area" and rec["value"] > 0.1
    assert rec["text_area"] == rec["value"] and rec["clip_id"] == card["clip_id"] and rec["keyframe_jpeg"]
    assert rec["reason"].startswith("text_area ") and "> max 0.1 (filter.text_area)" in rec["reason"]
    after = VAEStage(cfg)(out)  # the VAE skips it
    assert sum(lat.size > 0 for lat in after["latents"]) == len(rows)
    # filter.enabled=false: scored, nothing dropped
    off = CaptionStage(load_config(PipelineConfig, None, ["filter.enabled=false"]))(as_batch(rows + [card]))
    assert list(off["kind"]) == ["clip"] * (len(rows) + 1) and float(off["text_area"][-1]) > 0.1


@pytest.mark.skipif(bundled_model() is None, reason="the ocr extra (onnxruntime + rapidocr_onnxruntime) is not installed")
def test_the_cascade_reads_the_middle_keyframe_and_the_others_only_where_text_is_likely() -> None:
    class Counting:  # the onnxruntime session, counting the frames DBNet reads
        def __init__(self, session):
            self.session, self.frames = session, 0

        def run(self, names, feeds):
            self.frames += len(next(iter(feeds.values())))
            return self.session.run(names, feeds)

    full, cascade = PPOCRText(bundled_model(), cascade=False), PPOCRText(bundled_model())
    assert full.fingerprint()["cascade"] is False and cascade.fingerprint()["cascade"] is True
    cascade.session = Counting(cascade.session)
    for name in NAMES:
        clean = footage(name, 3)
        cases = {"clean": (clean, 1),  # no text: DBNet reads the middle keyframe only
                 "subtitles": ([subtitle(f) for f in clean], 3),  # text in the middle: every keyframe
                 "subtitle first": ([subtitle(clean[0]), clean[1], clean[2]], 2),  # the gate sends the first
                 "card last": ([clean[0], clean[1], title_card(clean[2])], 2)}
        for case, (frames, reads) in cases.items():
            cascade.session.frames = 0
            got = text_area(frames, cascade)
            assert cascade.session.frames == reads, (name, case)
            assert got == pytest.approx(text_area(frames, full), abs=1e-6), (name, case)  # equal to the full mean
    image = subtitle(footage("bikes.mp4", 1)[0])
    assert text_area([image], cascade) == pytest.approx(full.area(image), abs=1e-6)  # a 1-frame clip: itself
    default = load_config(PipelineConfig, None, [])
    assert default.filter.text.cascade is True
    assert load_config(PipelineConfig, None, ["filter.text.cascade=false"]).filter.text.cascade is False
    assert load_text_detector("ppocr", "", "cpu", False).fingerprint()["cascade"] is False
