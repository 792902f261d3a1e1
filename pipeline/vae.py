"""One VAE interface over diffusers VAEs: uint8 video <-> normalised float latents.

`load_vae(VAEConfig)` gives a `VideoVAE` wrapping either a diffusers `AutoencoderKL`
applied frame-wise (kind "image": no temporal compression) or an `AutoencoderKLWan`
(kind "wan": 4x temporal, 8x spatial; clips of 4k+1 frames). Weights come from a local
diffusers folder (`path`) or, with no path, from a named tiny preset built with seeded
random init (fingerprinted as "random-init"). Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from diffusers.utils import is_accelerate_available
from einops import rearrange

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class VAEConfig:
    """Which VAE to load and how to run it."""

    kind: Literal["image", "wan"] = "image"  # image: AutoencoderKL per frame; wan: AutoencoderKLWan (4x time)
    path: str = ""  # local diffusers model folder; "" -> build `preset` with random init
    preset: str = "tiny-image"  # random-init preset used when path is "" (see PRESETS)
    seed: int = 0  # random-init seed: same (preset, seed) -> bit-identical weights in every process
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    latent_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # storage dtype (the pipeline casts)
    batch_frames: int = 32  # frames per AutoencoderKL call, bounds activation memory

    def validate(self) -> None:
        if self.batch_frames < 1:
            raise ValueError(f"vae.batch_frames must be >= 1, got {self.batch_frames}")
        if not self.path:
            if self.preset not in PRESETS:
                raise ValueError(f"vae.preset {self.preset!r} is not one of {sorted(PRESETS)}")
            preset_kind = PRESETS[self.preset][0]
            if preset_kind != self.kind:
                # Guessing would make the saved config lie about which model made the latents.
                raise ValueError(
                    f"vae.preset {self.preset!r} is a {preset_kind!r} VAE but vae.kind is {self.kind!r}; "
                    f"pick a {self.kind!r} preset: {[p for p, (k, _, _) in PRESETS.items() if k == self.kind]}"
                )


# ---------------------------------------------------------------------------
# Random-init presets: real diffusers classes, real compression, tiny widths
# ---------------------------------------------------------------------------

# Non-trivial normalisation constants so a missing/wrong normalisation shows up in tests.
PRESETS: dict[str, tuple[str, type, dict[str, Any]]] = {
    "tiny-image": (
        "image",
        AutoencoderKL,
        dict(
            down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples -> 8x spatial
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.5,
            shift_factor=0.1,
        ),
    ),
    "tiny-wan": (
        "wan",
        AutoencoderKLWan,
        dict(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2, 2, 2],  # 3 downsamples -> 8x spatial
            num_res_blocks=1,
            temperal_downsample=[False, True, True],  # (sic, diffusers' spelling) -> 4x temporal
            latents_mean=[0.1, -0.2, 0.3, -0.4],
            latents_std=[0.5, 1.5, 2.0, 0.8],
        ),
    ),
    # Wan 2.2's VAE (TI2V-5B): the same class with residual blocks over 2x2 pixel patches (12 input
    # channels), so 16x spatial, and a wider decoder.
    "tiny-wan2.2": (
        "wan",
        AutoencoderKLWan,
        dict(
            base_dim=8,
            decoder_base_dim=12,
            z_dim=6,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            latents_mean=[0.1, -0.2, 0.3, -0.4, 0.2, 0.0],
            latents_std=[0.5, 1.5, 2.0, 0.8, 1.0, 1.2],
        ),
    ),
}
CLASSES: dict[str, tuple[str, type]] = {  # config.json `_class_name` -> (kind, class)
    "AutoencoderKL": ("image", AutoencoderKL),
    "AutoencoderKLWan": ("wan", AutoencoderKLWan),
}


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in sorted-key order."""
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # view as bytes so bf16 (which numpy lacks) hashes too
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples -> lists; anything odd -> str


# ---------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------


class VideoVAE:
    """A diffusers VAE behind one video interface: uint8 (B, T, H, W, 3) <-> (B, C, T', H', W')."""

    def __init__(self, model: AutoencoderKL | AutoencoderKLWan, cfg: VAEConfig, weights: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg
        self.weights = weights  # "random-init" or the local folder
        self.kind = "wan" if isinstance(model, AutoencoderKLWan) else "image"
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype  # compute dtype, as loaded
        mc = model.config
        self.spatial_factor = spatial_factor(self.kind, mc)
        if self.kind == "wan":
            self.temporal_factor = int(mc.scale_factor_temporal)
            self.latent_channels = int(mc.z_dim)
            # per-channel normalisation, shaped to broadcast over (B, C, T, H, W)
            self._mean = torch.tensor(mc.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
            self._std = torch.tensor(mc.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        else:
            self.temporal_factor = 1
            self.latent_channels = int(mc.latent_channels)
            # SD/Flux style: (z - shift_factor) * scaling_factor; SDXL-pipeline style when the
            # config carries per-channel stats (e.g. Playground v2.5): (z - mean) * scaling / std
            c = self.latent_channels
            mean = mc.latents_mean if mc.latents_mean is not None else [float(mc.shift_factor or 0.0)] * c
            std = mc.latents_std if mc.latents_std is not None else [1.0] * c
            self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
            self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1) / float(mc.scaling_factor)
        self._sha: str | None = None

    # --- shapes -------------------------------------------------------------

    def latent_shape(self, num_frames: int, height_px: int, width_px: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') for a clip of this size; ValueError if the VAE cannot take it."""
        f = self.spatial_factor
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if height_px % f or width_px % f or height_px < f or width_px < f:
            raise ValueError(
                f"{self.kind} VAE needs height and width that are positive multiples of {f}, "
                f"got {height_px}x{width_px}px"
            )
        if self.kind == "wan":
            if (num_frames - 1) % self.temporal_factor:
                k = (num_frames - 1) // self.temporal_factor
                raise ValueError(
                    f"wan VAE needs {self.temporal_factor}k+1 frames, got {num_frames} "
                    f"(nearest valid: {self.temporal_factor * k + 1} or {self.temporal_factor * (k + 1) + 1})"
                )
            t_lat = 1 + (num_frames - 1) // self.temporal_factor
        else:
            t_lat = num_frames
        return (self.latent_channels, t_lat, height_px // f, width_px // f)

    # --- encode / decode ----------------------------------------------------

    def _check_video(self, video: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(video, np.ndarray):
            video = torch.from_numpy(np.ascontiguousarray(video))
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video must be a numpy array or torch tensor, got {type(video).__name__}")
        if video.dtype != torch.uint8:
            raise ValueError(f"video must be uint8 RGB, got dtype {video.dtype}")
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"video must have shape (B, T, H, W, 3), got {tuple(video.shape)}")
        self.latent_shape(*video.shape[1:4])  # raises a helpful ValueError on bad sizes
        return video

    # no_grad, not inference_mode: latents may flow into training graphs, which refuse inference tensors
    @torch.no_grad()
    def encode(self, video: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> normalised float32 latents (B, C, T', H', W') from the posterior mode."""
        video = self._check_video(video)
        x = video.to(self.device).to(self.dtype) / 127.5 - 1.0  # (B, T, H, W, 3) in [-1, 1]
        if self.kind == "wan":
            x = rearrange(x, "b t h w c -> b c t h w")
            # one clip at a time: the causal conv cache spans the whole clip, so only B can be chunked
            z = torch.cat([self.model.encode(xi).latent_dist.mode() for xi in x.split(1)])  # (B, C, T', H', W')
        else:
            b = x.shape[0]
            x = rearrange(x, "b t h w c -> (b t) c h w")
            z = torch.cat([self.model.encode(xi).latent_dist.mode() for xi in x.split(self.cfg.batch_frames)])
            z = rearrange(z, "(b t) c h w -> b c t h w", b=b)  # (B, C, T, H', W')
        return (z.float() - self._mean.to(z.device)) / self._std.to(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents (B, C, T', H', W') -> uint8 video (B, T, H, W, 3)."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape (B, {self.latent_channels}, T', H', W'), got {shape}")
        z = latents.to(self.device).float() * self._std.to(self.device) + self._mean.to(self.device)
        z = z.to(self.dtype)
        if self.kind == "wan":
            x = torch.cat([self.model.decode(zi).sample for zi in z.split(1)])  # (B, 3, T, H, W)
            x = rearrange(x, "b c t h w -> b t h w c")
        else:
            b = z.shape[0]
            z = rearrange(z, "b c t h w -> (b t) c h w")
            x = torch.cat([self.model.decode(zi).sample for zi in z.split(self.cfg.batch_frames)])
            x = rearrange(x, "(b t) c h w -> b t h w c", b=b)
        x = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
        return x.to(torch.uint8).cpu().numpy()

    # --- provenance ---------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """What produced the latents: class, weights source, weight hash, model config."""
        if self._sha is None:
            self._sha = state_dict_sha256(self.model)  # cached: hashing a real VAE takes seconds
        random_init = self.weights == "random-init"
        config = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
        return {
            "class": type(self.model).__name__,
            "kind": self.kind,
            "weights": self.weights,
            "preset": self.cfg.preset if random_init else None,
            "seed": self.cfg.seed if random_init else None,
            "dtype": self.cfg.dtype,
            "weights_sha256": self._sha,
            "config": _json_safe(config),
        }

    def save(self, directory: str | Path) -> None:
        """Write a diffusers folder (config.json + safetensors) loadable via VAEConfig(path=directory)."""
        self.model.save_pretrained(str(directory), safe_serialization=True)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _load_local(cfg: VAEConfig) -> tuple[AutoencoderKL | AutoencoderKLWan, str]:
    folder = Path(cfg.path).expanduser()
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"vae.path {cfg.path!r} is not a directory (expected a diffusers VAE folder)")
    if not config_file.is_file():
        raise FileNotFoundError(f"vae.path {cfg.path!r} has no config.json; is it a diffusers model folder?")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in CLASSES:
        raise ValueError(f"{config_file} declares _class_name={class_name!r}; supported: {sorted(CLASSES)}")
    kind, cls = CLASSES[class_name]
    if kind != cfg.kind:
        raise ValueError(f"{cfg.path!r} holds a {class_name} ({kind!r} VAE) but vae.kind is {cfg.kind!r}")
    model = cls.from_pretrained(
        str(folder),
        local_files_only=True,
        torch_dtype=DTYPES[cfg.dtype],
        low_cpu_mem_usage=is_accelerate_available(),  # the default warns when accelerate is absent
    )
    return model, str(folder.resolve())


def spatial_factor_of(cfg: VAEConfig) -> int | None:
    """The VAE's spatial compression read from its preset or its folder's config.json, without
    building it; None when the folder is not readable here (the workers check when they load it)."""
    if cfg.path:
        config_file = Path(cfg.path).expanduser() / "config.json"
        if not config_file.is_file():
            return None
        config = json.loads(config_file.read_text())
        kind = CLASSES.get(config.get("_class_name"), (cfg.kind, None))[0]
    else:
        kind, _, config = PRESETS[cfg.preset]
    return spatial_factor(kind, config)


def spatial_factor(kind: str, config: Any) -> int:
    """Pixels per latent side of a VAE of this kind and (diffusers) config mapping."""
    if kind == "wan":
        return int(config.get("scale_factor_spatial") or 8)  # diffusers' default: 2.1's 8x
    return 2 ** (len(config.get("block_out_channels") or [64]) - 1)  # AutoencoderKL: one downsample per block


def build_preset(preset: str, seed: int) -> AutoencoderKL | AutoencoderKLWan:
    """A random-init preset VAE; the same (preset, seed) gives bit-identical weights anywhere."""
    if preset not in PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose from {sorted(PRESETS)}")
    _, cls, kwargs = PRESETS[preset]
    # fork_rng: seed construction without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**kwargs)


def load_vae(cfg: VAEConfig, device: str | torch.device = "cpu") -> VideoVAE:
    """Build the VideoVAE that `cfg` names, on `device`, in eval mode."""
    cfg.validate()
    if cfg.path:
        model, weights = _load_local(cfg)
    else:
        model, weights = build_preset(cfg.preset, cfg.seed), "random-init"
    if next(model.parameters()).dtype != DTYPES[cfg.dtype]:
        # presets are built in float32 (so a seed means the same weights in every dtype) then cast;
        # plain nn.Module.to, since diffusers' override warns on every dtype cast even when the
        # class keeps no modules in float32 (true of both preset classes)
        assert not model._keep_in_fp32_modules
        model = torch.nn.Module.to(model, dtype=DTYPES[cfg.dtype])
    model = model.to(device=device)
    return VideoVAE(model, cfg, weights)


__all__ = ["PRESETS", "VAEConfig", "VideoVAE", "build_preset", "load_vae", "spatial_factor_of",
           "state_dict_sha256"]
