"""Sample videos from a training checkpoint: EMA weights → Euler/CFG sampler → the pipeline's VAE → mp4.

    python training/sample.py --checkpoint RUN/checkpoint-NNNNNNNN --prompt "a dog" [--prompt ...]
        [--prompts FILE] [--width 224 --height 128 --frames 17] [--steps 50 --cfg 5.0 --seed 0]
        [--out DIR] [--fps 8] [--device auto] [--data URI] [--other-expert CHECKPOINT_OR_FOLDER]

`--checkpoint` may also be a run dir (its latest checkpoint). Each prompt gives
`OUT/NNN-seedS.mp4` plus `OUT/NNN-seedS.json` holding every setting that made it
(checkpoint, steps done, prompt, seed, size, steps, guidance, timestep shift, model config,
data / CLIP / VAE fingerprints, code versions, random-init flag), and `OUT/summary.json`.
Default OUT: `<run dir>/samples/<checkpoint name>/`.

Text is encoded by the very CLIP text tower the pipeline used for the training captions and
latents are decoded by the pipeline's VAE: both are rebuilt from the data's `config.yaml` and
refused unless their weights hash to what the data's `manifest.json` recorded. Any size the
model supports works, not only training buckets. Video i uses seed + i and depends on nothing
else in the batch. No Ray here: `load_sampler(...).generate(...)` is what eval/nightly.py calls.
A checkpoint of one expert (trained on one side of a noise boundary, Wan 2.2 A14B) samples with
`--other-expert`, the expert for the other side (`load_sampler`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python training/sample.py`: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import av
import numpy as np
import torch
import yaml
from torch import nn

from pipeline import storage
from pipeline.clip_model import ClipConfig, ClipModel, load_clip
from pipeline.config import ConfigError, from_dict
from pipeline.logs import get_logger
from pipeline.manifest import read_manifest
from pipeline.text_encoder import config_of, load_umt5
from pipeline.vae import VAEConfig, VideoVAE, load_vae
from pipeline.version import code_version
from training import checkpoint as ckpt
from training.backbone import BackboneError, build, from_record, load_trained, null_text_of
from training.flow import FlowConfig, sample
from training.packing import num_patches
from training.settings import ModelConfig

log = get_logger("training.sample")

H264_ENCODERS = ("libx264", "h264")  # PyAV wheels ship libx264; fall back to MPEG-4 Part 2 without it
RANDOM_INIT = "random-init"


class SamplerError(ValueError):
    """A checkpoint, its data, or a request the sampler cannot honour; the message says why."""


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint dir as given, or the latest checkpoint of a run dir."""
    try:
        return ckpt.resolve(uri)
    except FileNotFoundError as e:
        raise SamplerError(str(e)) from None


def _section(data: dict[str, Any], path: str, cls: type, where: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise SamplerError(f"{where} has no {path!r} section")
        node = node[key]
    try:
        return from_dict(cls, node, path)
    except (ConfigError, ValueError) as e:
        raise SamplerError(f"{where}: {e}") from None


def _check_weights(what: str, loaded: dict[str, Any], recorded: dict[str, Any]) -> None:
    if loaded["weights_sha256"] != recorded.get("weights_sha256"):
        raise SamplerError(
            f"refusing to sample: the {what} loaded from the data config ({loaded['weights']}) has weights sha256 "
            f"{loaded['weights_sha256'][:16]}…, but the data's manifest records "
            f"{str(recorded.get('weights_sha256'))[:16]}… "
            f"({recorded.get('weights')}); the model was trained on embeddings of the recorded weights")


@dataclass
class Sampler:
    """A checkpoint's EMA backbone (DiT or Wan) with the exact text encoder and VAE its training data was made with."""

    model: nn.Module  # training.backbone's module: VideoDiT or PackedWan
    flow: FlowConfig
    clip: ClipModel
    vae: VideoVAE
    state: ckpt.TrainerState
    checkpoint_uri: str
    data_uri: str
    manifest: dict[str, Any]
    device: torch.device
    encoder: Any = None  # what encodes prompts for the model: the data's text encoder (None: its CLIP)
    # Wan 2.2 A14B style experts: `model` is the high-noise expert (t >= boundary) and `low_noise`
    # the low-noise one (t < boundary); one of them is the checkpoint's, the other from `other_expert`.
    low_noise: nn.Module | None = None
    boundary: float | None = None
    other_expert: str | None = None

    def __post_init__(self) -> None:
        if self.encoder is None:
            self.encoder = self.clip

    @property
    def fps(self) -> float:
        return float(self.manifest["fingerprint"]["buckets"]["fps"])

    @property
    def random_init_models(self) -> list[str]:
        """Models whose weights are random-init (the demo's CLIP and VAE): their outputs mean nothing."""
        models = self.manifest["fingerprint"]["models"]
        return sorted(name for name, fp in models.items() if fp.get("weights") == RANDOM_INIT)

    @property
    def random_init(self) -> bool:
        return bool(self.manifest.get("random_init")) or bool(self.random_init_models)

    # --- requests ---------------------------------------------------------------

    def latent_shape(self, width_px: int, height_px: int, num_frames: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of a video this model can make; SamplerError naming valid sizes otherwise."""
        pt, ph, pw = self.model.patch
        fs = self.vae.spatial_factor
        for name, value, p in (("width", width_px, pw), ("height", height_px, ph)):
            step = fs * p
            if value < step or value % step:
                lower, upper = max(step, value // step * step), (value // step + 1) * step
                raise SamplerError(f"{name} {value} px: this model makes multiples of {step} px (VAE {fs}x × "
                                   f"patch {p}); nearest: {lower} or {upper}")
        try:
            shape = self.vae.latent_shape(num_frames, height_px, width_px)
        except ValueError as e:
            raise SamplerError(f"{num_frames} frames: {e}") from None
        if shape[1] % pt:
            raise SamplerError(f"{num_frames} frames give {shape[1]} latent frames, not a multiple of the "
                               f"temporal patch {pt}")
        num_patches(shape, (pt, ph, pw))  # cannot fail after the checks above; kept as the contract
        return shape

    def memory_bytes(self, width_px: int, height_px: int, num_frames: int) -> int:
        """Estimated peak memory of one video beyond the loaded models.

        Linear in the video: the DiT's live activations (conditional + unconditional pass, fp32,
        one block's width at a time; attention kernels work blockwise, no n² scores) and the decoded
        video (float32, a rearranged copy, uint8). Measured on CPU with DiT-tiny, 224×128 px:
        0.95 MB per frame (100 → 1,600 frames) against 1.06 MB estimated, plus ~270 MB fixed.
        """
        shape = self.latent_shape(width_px, height_px, num_frames)
        tokens = math.prod(num_patches(shape, self.model.patch))
        dit = 2 * tokens * self.model.activation_floats_per_token() * 4
        video = num_frames * height_px * width_px * 3 * (4 + 4 + 1)
        return FIXED_SAMPLING_BYTES + dit + video

    def check_fits(self, width_px: int, height_px: int, num_frames: int) -> None:
        """SamplerError when the estimate exceeds free memory, naming the most frames that fit."""
        need, free = self.memory_bytes(width_px, height_px, num_frames), free_memory_bytes(self.device)
        if need <= free:
            return
        # The estimate is linear in the frame count: scale, then step down to a valid count that fits.
        guess = min(num_frames - 1, int(num_frames * max(0, free - FIXED_SAMPLING_BYTES)
                                        / max(1, need - FIXED_SAMPLING_BYTES)) + 8)
        best = next((f for f in range(guess, 0, -1) if self._fits_valid(width_px, height_px, f, free)), 0)
        hint = f"at most {best} frames fit at {width_px}x{height_px} px" if best else \
            "not even one frame fits at this size"
        raise SamplerError(f"{num_frames} frames at {width_px}x{height_px} px need ~{need / 1e9:.1f} GB on "
                           f"{self.device.type}, {free / 1e9:.1f} GB is free: {hint}")

    def _fits_valid(self, width_px: int, height_px: int, num_frames: int, free: int) -> bool:
        try:
            return self.memory_bytes(width_px, height_px, num_frames) <= free
        except SamplerError:
            return False

    def truncated_prompts(self, prompts: list[str]) -> list[int]:
        """Indices of prompts longer than the text encoder reads (CLIP: 77 tokens with SOT/EOT; umT5: max_tokens)."""
        if hasattr(self.encoder, "token_count"):
            return [i for i, p in enumerate(prompts) if self.encoder.token_count(p) > self.encoder.context_length]
        encode = getattr(self.encoder.tokenizer, "encode", None)
        if encode is None:
            return []
        return [i for i, p in enumerate(prompts) if len(encode(p)) + 2 > self.encoder.context_length]

    def encode_prompts(self, prompts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-prompt token states (L, D) and masks (L,) of the data's text encoder, rounded through
        float16 as the shards store them."""
        states, mask = self.encoder.text_tokens(prompts)  # (N, L, D), (N, L)
        states = states.half().float().cpu()  # what training read back from the float16 shard column
        return list(states), list(mask.cpu())

    @torch.no_grad()
    def generate(self, prompts: list[str], width_px: int, height_px: int, num_frames: int,
                 steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 low_noise_guidance: float | None = None) -> np.ndarray:
        """uint8 videos (N, T, H, W, 3), one per prompt; video i is drawn with seed + i.

        `steps` / `guidance_scale` default to the checkpoint's flow config (sample_steps, guidance_scale);
        `low_noise_guidance`: the low-noise expert's own scale, with a pair of experts (default: the same).
        """
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise SamplerError("prompts must be a non-empty list of strings")
        steps = self.flow.sample_steps if steps is None else int(steps)
        if steps < 1:
            raise SamplerError(f"steps must be >= 1, got {steps}")
        shape = self.latent_shape(width_px, height_px, num_frames)
        self.check_fits(width_px, height_px, num_frames)
        for i in self.truncated_prompts(prompts):
            log.warning("prompt %d (%d characters) is longer than the text encoder's %d tokens; the rest is cut",
                        i, len(prompts[i]), self.encoder.context_length)
        videos = []
        for i, prompt in enumerate(prompts):
            text, mask = self.encode_prompts([prompt])
            # Video by video (text, noise, ODE, decode), with a generator each: a video depends on its
            # prompt, size and seed only, never on its batch neighbours (batched kernels round differently).
            g = torch.Generator().manual_seed(seed + i)
            experts = None if self.low_noise is None else (self.low_noise, self.boundary)
            z = sample(self.model, [shape], text, self.flow, g, steps=steps, guidance_scale=guidance_scale,
                       text_mask=mask, device=self.device, low_noise=experts,
                       low_noise_guidance=low_noise_guidance)[0]  # (C, T', H', W')
            videos.append(self.vae.decode(z[None])[0])  # (T, H, W, 3)
        return np.stack(videos)  # (N, T, H, W, 3)

    def settings(self, prompt: str, seed: int, width_px: int, height_px: int, num_frames: int,
                 steps: int | None, guidance_scale: float | None,
                 low_noise_guidance: float | None = None) -> dict[str, Any]:
        """Everything that determines one generated video (written beside it as JSON)."""
        f = self.flow
        shape = self.latent_shape(width_px, height_px, num_frames)
        tokens = math.prod(num_patches(shape, self.model.patch))
        fp = self.manifest["fingerprint"]
        scale = f.guidance_scale if guidance_scale is None else float(guidance_scale)
        return {
            "checkpoint": self.checkpoint_uri,
            "steps_done": self.state.steps_done,
            "weights": self.state.weights,
            "prompt": prompt,
            "seed": seed,
            "width_px": width_px,
            "height_px": height_px,
            "num_frames": num_frames,
            "fps": self.fps,
            "steps": f.sample_steps if steps is None else int(steps),
            "guidance_scale": scale,
            "latent_shape": list(shape),
            "num_tokens": tokens,
            "shift": {"enabled": f.shift, "base_tokens": f.base_tokens, "max_tokens": f.max_tokens,
                      "base_shift": f.base_shift, "max_shift": f.max_shift},
            "model": self.state.model,
            "experts": None if self.low_noise is None else {
                "boundary": self.boundary, "other_expert": self.other_expert,
                "checkpoint_is": "high-noise" if self.flow.t_min > 0 else "low-noise",
                "low_noise_guidance": scale if low_noise_guidance is None else float(low_noise_guidance)},
            "data_uri": self.data_uri,
            "data_fingerprint": self.state.data_fingerprint,
            "clip": fp["models"]["clip"],
            "vae": {k: v for k, v in fp["models"]["vae"].items() if k != "config"},
            "code_version": {"checkpoint": self.state.code_version, "sampler": code_version()},
            "random_init": self.random_init,
            "random_init_models": self.random_init_models,
        }


FIXED_SAMPLING_BYTES = 512 << 20  # convolution workspaces, the text encoder's pass, allocator slack


def free_memory_bytes(device: torch.device) -> int:
    """Memory a sampling run may still use: the GPU's free memory, or the host's available memory
    within this process's cgroup limit (a container's limit is what the OOM killer enforces)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    free = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return int(free)


def pick_device(device: str = "auto") -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        "cpu" if device == "auto" else device)


def load_data_models(data_uri: str, manifest: dict[str, Any],
                     device: str | torch.device = "cpu") -> tuple[ClipModel, VideoVAE]:
    """The CLIP and VAE that made the shards at `data_uri`: rebuilt from its config.yaml, checked by hash.

    Refused (SamplerError) unless each model's weights hash to the sha256 the manifest recorded.
    """
    config_uri = storage.join(data_uri, "config.yaml")
    if not storage.exists(config_uri):
        raise SamplerError(f"{data_uri} has no config.yaml: cannot tell which CLIP and VAE made the data")
    data_cfg = yaml.safe_load(storage.read_bytes(config_uri).decode()) or {}
    models = manifest["fingerprint"]["models"]
    clip = load_clip(_section(data_cfg, "caption.clip", ClipConfig, config_uri), device)
    _check_weights("CLIP", clip.fingerprint(), models["clip"])
    vae = load_vae(_section(data_cfg, "vae", VAEConfig, config_uri), device)
    _check_weights("VAE", vae.fingerprint(), models["vae"])
    return clip, vae


def load_text_encoder(data_uri: str, manifest: dict[str, Any], clip: ClipModel,
                      device: str | torch.device = "cpu") -> Any:
    """The text encoder whose states the shards at `data_uri` hold (the manifest's record; data made
    before the choice existed: its CLIP), checked by hash like the other models."""
    recorded = manifest["fingerprint"]["models"].get("text_encoder", {"kind": "clip"})
    if recorded.get("kind", "clip") == "clip":
        return clip
    try:
        encoder = load_umt5(config_of(recorded), device)
    except (OSError, ValueError) as e:
        raise SamplerError(f"{data_uri}: its text encoder {recorded.get('weights')} cannot be loaded here: {e}") from None
    _check_weights("umT5 text encoder", encoder.fingerprint(), recorded)
    return encoder


def load_sampler(checkpoint: str, device: str = "auto", data_uri: str | None = None,
                 other_expert: str | None = None) -> Sampler:
    """Load a checkpoint's EMA weights and the text encoder + VAE of the data it was trained on.

    `data_uri` overrides the data location the checkpoint recorded (data moved); the shards
    there must have the fingerprint the checkpoint was trained on. CLIP and VAE are rebuilt
    from the data's config.yaml and refused unless their weights hash to the manifest's record.

    A checkpoint trained on one side of a boundary b (`flow.t_min` = b: the high-noise expert;
    `flow.t_max` = b: the low-noise one — Wan 2.2 A14B's pair) samples only with `other_expert`
    for the other side: a checkpoint trained on exactly that side of the same b, on the same data,
    or a diffusers Wan folder used as it is (the pretrained expert the run did not fine-tune).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    dev = pick_device(device)
    state, tensors = ckpt.load_weights(checkpoint)
    data_uri = data_uri or state.data_uri
    try:
        manifest = read_manifest(data_uri)
    except FileNotFoundError as e:
        raise SamplerError(f"{checkpoint} was trained on {data_uri}: {e} (moved? pass --data URI)") from None
    data_sha = manifest["fingerprint"]["data_sha256"]
    if data_sha != state.data_fingerprint:
        raise SamplerError(f"{checkpoint} was trained on data {state.data_fingerprint[:16]}…, but {data_uri} has "
                           f"fingerprint {data_sha[:16]}…: its text encoder / VAE record does not apply")
    clip, vae = load_data_models(data_uri, manifest, dev)
    encoder = load_text_encoder(data_uri, manifest, clip, dev)
    null_text = null_text_of(data_uri, manifest) if state.model.get("kind", "ditharos") == "wan" or other_expert \
        else None  # a pretrained backbone's null caption; the native DiT learns its own

    def backbone(uri: str, record: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> nn.Module:
        try:
            if weights is None:  # a pretrained diffusers folder, as it is
                model = build(ModelConfig(kind="wan", path=uri), vae.latent_channels, encoder.text_width,
                              null_text=null_text).module
            else:
                model = from_record(record, in_channels=vae.latent_channels, text_dim=encoder.text_width,
                                    null_text=null_text).module
                load_trained(model, weights, uri)
        except BackboneError as e:
            raise SamplerError(f"{uri}: {e}") from None
        return model.to(dev).eval().requires_grad_(False)

    model, flow = backbone(checkpoint, state.model, tensors), _flow_of(checkpoint)
    del tensors
    sampler = Sampler(model, flow, clip, vae, state, checkpoint, data_uri, manifest, dev, encoder)
    if other_expert is None:
        if flow.restricted:
            raise SamplerError(f"{checkpoint} was trained on noise levels t in [{flow.t_min}, {flow.t_max}] only: "
                               "one expert of a pair. Name the expert for the other levels with --other-expert "
                               "(its checkpoint, or the pretrained diffusers folder)")
        return sampler
    if not flow.restricted or (flow.t_min > 0 and flow.t_max < 1):
        raise SamplerError(f"{checkpoint} was trained on t in [{flow.t_min}, {flow.t_max}]: an expert pair needs one "
                           "trained on [b, 1] (high noise) or [0, b] (low noise)")
    high_side = flow.t_min > 0
    boundary = flow.t_min if high_side else flow.t_max
    pipeline_index = Path(other_expert) / "model_index.json"
    if pipeline_index.is_file():  # a whole Wan 2.2 A14B pipeline folder: the expert of the other side
        other = backbone(_pipeline_expert(other_expert, json.loads(pipeline_index.read_text()), high_side, boundary),
                         {}, None)
    elif any((Path(other_expert) / sub / "config.json").is_file() for sub in ("", "transformer")):
        other = backbone(other_expert, {}, None)
    else:
        other_uri = resolve_checkpoint(other_expert)
        other_state, other_tensors = ckpt.load_weights(other_uri)
        other_flow = _flow_of(other_uri)
        if other_state.data_fingerprint != state.data_fingerprint:
            raise SamplerError(f"the experts were trained on different data ({checkpoint}: "
                               f"{state.data_fingerprint[:16]}…, {other_uri}: {other_state.data_fingerprint[:16]}…): "
                               "they do not share a VAE and text encoder")
        want = (0.0, boundary) if high_side else (boundary, 1.0)
        if (other_flow.t_min, other_flow.t_max) != want:
            raise SamplerError(f"not a pair of experts: {checkpoint} was trained on t in [{flow.t_min}, {flow.t_max}], "
                               f"so its partner needs [{want[0]}, {want[1]}]; {other_uri} was trained on "
                               f"[{other_flow.t_min}, {other_flow.t_max}]")
        other = backbone(other_uri, other_state.model, other_tensors)
    if tuple(other.patch) != tuple(model.patch):
        raise SamplerError(f"the experts patch differently ({model.patch} and {other.patch}): not a pair")
    if high_side:
        sampler.low_noise = other
    else:
        sampler.model, sampler.low_noise = other, model
    sampler.boundary, sampler.other_expert = boundary, other_expert
    return sampler


def _pipeline_expert(folder: str, index: dict[str, Any], high_side: bool, boundary: float) -> str:
    """The transformer folder of a diffusers Wan pipeline that serves the other side of `boundary`:
    `transformer_2/` (low noise) for a high-noise checkpoint, `transformer/` (high noise) for a
    low-noise one; refused when the pipeline has one transformer or splits at another boundary."""
    if "transformer_2" not in index or not index.get("boundary_ratio"):
        raise SamplerError(f"{folder} is a pipeline with one transformer, not a pair of experts: name the "
                           "transformer folder to use for the other noise levels")
    if abs(float(index["boundary_ratio"]) - boundary) > 1e-9:
        raise SamplerError(f"{folder} splits its experts at t = {index['boundary_ratio']} (boundary_ratio), the "
                           f"checkpoint was trained on one side of t = {boundary}: train with that boundary, or "
                           "name a transformer folder explicitly")
    return str(Path(folder) / ("transformer_2" if high_side else "transformer"))


def _flow_of(checkpoint: str) -> FlowConfig:
    """The checkpoint's flow section: the sampler needs its shift settings, defaults and noise range."""
    saved = storage.join(checkpoint, "config.yaml")
    if storage.exists(saved):
        return _section(yaml.safe_load(storage.read_bytes(saved).decode()) or {}, "flow", FlowConfig, saved)
    log.warning("%s has no config.yaml: using the default flow settings", checkpoint)
    return FlowConfig()


# ---------------------------------------------------------------------------
# mp4
# ---------------------------------------------------------------------------


def video_encoder() -> str:
    """H.264 when this PyAV build can encode it, else MPEG-4 Part 2."""
    for name in H264_ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.codec.codec.UnknownCodecError, ValueError):
            continue
    return "mpeg4"


def encode_mp4(frames: np.ndarray, fps: float) -> tuple[bytes, dict[str, Any]]:
    """uint8 (T, H, W, 3) → (mp4 bytes, {codec, pix_fmt, width_px, height_px}) in yuv420p.

    yuv420p halves chroma in both directions, so an odd width/height is padded by repeating the
    last column/row; the stored size is reported.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 (T >= 1, H, W, 3), got {frames.dtype} {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    codec = video_encoder()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 8_000_000
        else:
            stream.options = {"crf": "15"}  # near-lossless: the file should show what the model made
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(stream.encode(None))
    info = {"codec": codec, "pix_fmt": "yuv420p", "width_px": int(frames.shape[2]), "height_px": int(frames.shape[1])}
    return buf.getvalue(), info


def write_video(out_uri: str, name: str, frames: np.ndarray, settings: dict[str, Any]) -> str:
    """`out_uri/name.mp4` + `out_uri/name.json` (settings + stored file info); returns the mp4's URI."""
    data, info = encode_mp4(frames, settings["fps"])
    uri = storage.join(out_uri, f"{name}.mp4")
    storage.write_bytes_atomic(uri, data)
    meta = dict(settings, file=f"{name}.mp4", video=info)
    storage.write_bytes_atomic(storage.join(out_uri, f"{name}.json"), (json.dumps(meta, indent=2) + "\n").encode())
    return uri


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def read_prompts_file(path: str) -> list[str]:
    """.json (a list of strings) or text (one prompt per non-empty line)."""
    if not storage.exists(path):
        raise SamplerError(f"prompts file {path!r} does not exist")
    text = storage.read_bytes(path).decode()
    if path.endswith(".json"):
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise SamplerError(f"{path}: expected a JSON list of strings")
        return prompts
    return [line.strip() for line in text.splitlines() if line.strip()]


def default_size(manifest: dict[str, Any]) -> tuple[int, int, int]:
    """(width, height, frames) of the training bucket with the most clips (ties: the largest)."""
    specs = manifest["buckets"].values()
    if not specs:
        raise SamplerError("the data has no buckets: give --width, --height and --frames")
    b = max(specs, key=lambda s: (s["rows"], s["num_frames"] * s["height_px"] * s["width_px"]))
    return b["width_px"], b["height_px"], b["num_frames"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its latest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    p.add_argument("--prompts", help="file of prompts: .txt one per line, or a .json list")
    p.add_argument("--width", type=int, help="pixels (default: the most common training bucket's)")
    p.add_argument("--height", type=int, help="pixels (default: the most common training bucket's)")
    p.add_argument("--frames", type=int, help="frame count (default: the most common training bucket's)")
    p.add_argument("--steps", type=int, help="Euler steps (default: the run's flow.sample_steps)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: flow.guidance_scale)")
    p.add_argument("--seed", type=int, default=0, help="video i is drawn with seed + i")
    p.add_argument("--out", help="output folder or URI (default: <run dir>/samples/<checkpoint name>)")
    p.add_argument("--fps", type=float, help="mp4 frame rate (default: the data's bucket fps)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--data", help="the shards' location, if they moved since training")
    p.add_argument("--cfg-low-noise", type=float, help="with --other-expert: the low-noise expert's own guidance "
                   "scale (WanPipeline's guidance_scale_2; default: --cfg)")
    p.add_argument("--other-expert", help="when --checkpoint is one expert of a pair (trained with flow.t_min or "
                   "flow.t_max = the boundary, Wan 2.2 A14B style): the other — its checkpoint or run dir, or "
                   "the pretrained diffusers folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        for name in ("width", "height", "frames"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise SamplerError(f"--{name} {getattr(args, name)}: must be >= 1 (leave it out for the most "
                                   "common training bucket's)")
        prompts = list(args.prompt) + (read_prompts_file(args.prompts) if args.prompts else [])
        if not prompts:
            raise SamplerError("no prompts: give --prompt TEXT (repeatable) and/or --prompts FILE")
        sampler = load_sampler(args.checkpoint, args.device, args.data, args.other_expert)
        if args.cfg_low_noise is not None and sampler.low_noise is None:
            raise SamplerError("--cfg-low-noise applies to a pair of experts (--other-expert) only")
        width, height, frames = args.width, args.height, args.frames
        if None in (width, height, frames):
            default = default_size(sampler.manifest)
            width, height, frames = (default[0] if width is None else width, default[1] if height is None else height,
                                     default[2] if frames is None else frames)
        sampler.latent_shape(width, height, frames)  # refuse a bad size before any work
        sampler.check_fits(width, height, frames)
        out = args.out or storage.join(sampler.checkpoint_uri.rstrip("/").rsplit("/", 1)[0], "samples",
                                       sampler.checkpoint_uri.rstrip("/").rsplit("/", 1)[1])
        videos = sampler.generate(prompts, width, height, frames, args.steps, args.cfg, args.seed, args.cfg_low_noise)
    except (SamplerError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    files = []
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        settings = sampler.settings(prompt, args.seed + i, width, height, frames, args.steps, args.cfg,
                                    args.cfg_low_noise)
        if args.fps:
            settings["fps"] = args.fps
        files.append(write_video(out, f"{i:03d}-seed{args.seed + i}", video, settings))
    summary = {
        "checkpoint": sampler.checkpoint_uri, "other_expert": sampler.other_expert,
        "steps_done": sampler.state.steps_done, "out": out,
        "videos": files, "prompts": prompts, "width_px": width, "height_px": height, "num_frames": frames,
        "steps": settings["steps"], "guidance_scale": settings["guidance_scale"], "seed": args.seed,
        "device": str(sampler.device), "boundary": sampler.boundary, "random_init": sampler.random_init,
        "random_init_models": sampler.random_init_models, "wall_s": round(time.perf_counter() - t0, 2),
    }
    storage.write_bytes_atomic(storage.join(out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def print_summary(s: dict[str, Any]) -> None:
    label = f"  ({RANDOM_INIT}: {', '.join(s['random_init_models']) or 'data'})" if s["random_init"] else ""
    print("\n=== DiTharos sampling summary ===")
    print(f"checkpoint  {s['checkpoint']}  (step {s['steps_done']}){label}")
    if s["other_expert"]:
        print(f"experts     with {s['other_expert']}, boundary t = {s['boundary']}")
    print(f"videos      {len(s['videos'])} × {s['width_px']}x{s['height_px']} px, {s['num_frames']} frames")
    print(f"sampler     {s['steps']} Euler steps, guidance {s['guidance_scale']}, seeds {s['seed']}.."
          f"{s['seed'] + len(s['videos']) - 1}, on {s['device']}")
    for prompt, uri in zip(s["prompts"], s["videos"]):
        print(f"  {uri}  {prompt!r}")
    print(f"wall        {s['wall_s']} s")
    print(f"out         {s['out']}")


__all__ = ["Sampler", "SamplerError", "encode_mp4", "load_data_models", "load_sampler", "read_prompts_file",
           "resolve_checkpoint", "video_encoder", "write_video"]


if __name__ == "__main__":
    print_summary(main())
