"""Rectified flow: the training loss and an Euler ODE sampler with classifier-free guidance.

Convention: x_t = (1 − t)·x0 + t·ε with t = 0 data and t = 1 noise; the model predicts the
velocity v = dx_t/dt = ε − x0. Training times are logit-normal and shifted towards noise
for samples with more tokens (SD3 / FLUX resolution-dependent shift), each sample by its
own token count. Everything random takes an explicit `torch.Generator`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from training.model import VideoDiT
from training.packing import PackedBatch, pack, to_device, unpack


@dataclass
class FlowConfig:
    """Rectified-flow objective and sampler settings."""

    cfg_drop_p: float = 0.1  # probability a training sample's text is replaced by the null caption
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std²))
    logit_std: float = 1.0
    shift: bool = True  # resolution-dependent timestep shift, per sample
    base_tokens: int = 256  # token count at which the shift is exp(base_shift)
    max_tokens: int = 4096  # token count at which the shift is exp(max_shift); linear in between and beyond
    base_shift: float = 0.5
    max_shift: float = 1.15
    # Training times restricted to [t_min, t_max] (after the shift): one expert of a mixture over
    # noise levels, as Wan 2.2 A14B's two — the high-noise expert takes t >= boundary (0.875 for
    # T2V: t_min: 0.875), the low-noise one t < boundary (t_max: 0.875). Drawn from the same
    # shifted logit-normal, truncated (inverse CDF), so the density within the range is unchanged.
    t_min: float = 0.0
    t_max: float = 1.0
    sample_steps: int = 50
    guidance_scale: float = 5.0

    def validate(self) -> None:
        if not 0.0 <= self.cfg_drop_p < 1.0:
            raise ValueError(f"flow.cfg_drop_p must be in [0, 1), got {self.cfg_drop_p}")
        if self.logit_std <= 0:
            raise ValueError(f"flow.logit_std must be > 0, got {self.logit_std}")
        if self.max_tokens <= self.base_tokens:
            raise ValueError(f"flow.max_tokens ({self.max_tokens}) must exceed flow.base_tokens ({self.base_tokens})")
        if self.sample_steps < 1:
            raise ValueError(f"flow.sample_steps must be >= 1, got {self.sample_steps}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"flow.t_min and flow.t_max must satisfy 0 <= t_min < t_max <= 1, got "
                             f"{self.t_min} and {self.t_max}")

    @property
    def restricted(self) -> bool:
        """Trained on part of the noise levels only (an expert): sampling needs its partner."""
        return self.t_min > 0.0 or self.t_max < 1.0


# ---------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------


def sample_timesteps(n: int, generator: torch.Generator | None = None, mean: float = 0.0,
                     std: float = 1.0) -> torch.Tensor:
    """(n,) logit-normal times: t = sigmoid(mean + std·z), z ~ N(0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def shift_mu(num_tokens: torch.Tensor, base_tokens: int = 256, max_tokens: int = 4096,
             base_shift: float = 0.5, max_shift: float = 1.15) -> torch.Tensor:
    """mu = base_shift + (max_shift − base_shift)·(n − base_tokens)/(max_tokens − base_tokens)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (num_tokens.double() - base_tokens)


def shift_timesteps(t: torch.Tensor, num_tokens: torch.Tensor | list[int], base_tokens: int = 256,
                    max_tokens: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15) -> torch.Tensor:
    """Shift times towards noise for larger samples (SD3 / FLUX):

        mu = base_shift + (max_shift − base_shift)·(n − base_tokens)/(max_tokens − base_tokens)
        t' = exp(mu) / (exp(mu) + (1/t − 1))      (= exp(mu)·t / (exp(mu)·t + 1 − t), exact at t = 0)

    `t` (B, …) and `num_tokens` (B,): each sample's whole-grid token count sets its own mu.
    """
    n = torch.as_tensor(num_tokens, device=t.device)
    e = shift_mu(n, base_tokens, max_tokens, base_shift, max_shift).exp()  # (B,)
    e = e.reshape(e.shape + (1,) * (t.ndim - 1)).to(t.dtype)
    return e * t / (e * t + (1 - t))  # (1 − t) first: exact 1 at t = 1


def truncated_timesteps(mu: torch.Tensor, t_min: float, t_max: float, generator: torch.Generator | None = None,
                        mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """(B,) shifted logit-normal times t = sigmoid(mean + mu + std·z) conditioned on t_min <= t <= t_max.

    `mu` (B,): each sample's shift (`shift_mu`; zeros when unshifted) — shifting t by exp(mu) adds
    mu to logit(t), so the shifted law is logit-normal again and truncates exactly: z = Φ⁻¹(u) with
    u uniform between Φ of the bounds' z."""
    mu = mu.double()
    lo = torch.special.logit(torch.tensor(t_min, dtype=torch.float64))  # -inf at 0
    hi = torch.special.logit(torch.tensor(t_max, dtype=torch.float64))  # +inf at 1
    a = torch.special.ndtr((lo - mean - mu) / std)  # (B,)
    b = torch.special.ndtr((hi - mean - mu) / std)  # (B,)
    u = a + (b - a) * torch.rand(mu.shape, generator=generator, dtype=torch.float64)  # (B,)
    t = torch.sigmoid(mean + mu + std * torch.special.ndtri(u))  # (B,)
    return t.clamp(t_min, t_max).float()


def training_timesteps(batch: PackedBatch, cfg: FlowConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) training times of a pack's samples: shifted logit-normal, within [t_min, t_max]."""
    if not cfg.restricted:  # the unrestricted draw, as every run before experts made it
        return _shifted(sample_timesteps(batch.num_samples, generator, cfg.logit_mean, cfg.logit_std), batch, cfg)
    n = torch.as_tensor(batch.full_lengths)
    mu = (shift_mu(n, cfg.base_tokens, cfg.max_tokens, cfg.base_shift, cfg.max_shift) if cfg.shift
          else torch.zeros(len(n), dtype=torch.float64))
    return truncated_timesteps(mu, cfg.t_min, cfg.t_max, generator, cfg.logit_mean, cfg.logit_std)


def _shifted(t: torch.Tensor, batch: PackedBatch, cfg: FlowConfig) -> torch.Tensor:
    if not cfg.shift:
        return t
    return shift_timesteps(t, batch.full_lengths, cfg.base_tokens, cfg.max_tokens, cfg.base_shift, cfg.max_shift)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Loss and sampler arithmetic: float32 for half-precision data, float64 kept (exactness tests)."""
    return torch.promote_types(x.dtype, torch.float32)


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def noise_generator(generator: torch.Generator | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` seeded by one draw from the host `generator` (None: the global RNG)."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # a host tensor: no device sync
    return torch.Generator(device=device).manual_seed(seed)


def flow_loss(model: VideoDiT, batch: PackedBatch, cfg: FlowConfig,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow MSE on a packed batch: (scalar mean over real tokens, (B,) per-sample means).

    x0 = batch.tokens. Times, noise and CFG text drops are drawn per sample in sample
    order, so the loss does not depend on how samples were packed or how much padding
    there is; padding tokens never enter the loss.

    The (B,) times and drops come from `generator` on the host; the (R, P) noise is drawn on
    the batch's device by a generator seeded from it (`noise_generator`), so nothing of size R
    crosses the bus and the draw is still a function of the pack's generator only.
    """
    device = batch.tokens.device
    dtype = compute_dtype(batch.tokens)
    b = batch.num_samples
    t = training_timesteps(batch, cfg, generator)  # (B,)
    drop = torch.rand(b, generator=generator) < cfg.cfg_drop_p  # (B,)
    real = batch.real_index()  # (R,)
    x0 = batch.tokens.to(dtype)  # (N, P)
    noise = torch.zeros_like(x0)  # (N, P): padding stays exactly zero
    noise[real] = torch.randn(len(real), x0.shape[1], generator=noise_generator(generator, device), dtype=dtype,
                              device=device)
    token_sample = torch.where(batch.sample_ids < 0, b, batch.sample_ids)  # (N,)
    t_dev = to_device(t, device)  # (B,)
    t_tok = torch.cat([t_dev, t_dev.new_zeros(1)])[token_sample][:, None]  # (N, 1)
    x_t = (1 - t_tok) * x0 + t_tok * noise  # (N, P)
    target = noise - x0  # (N, P)
    pred = model(x_t, t_dev, batch, drop)  # (N, P)
    err = (pred.to(dtype) - target).pow(2).mean(dim=1)  # (N,)
    err_real = err[real]  # (R,)
    lengths = to_device(torch.tensor(batch.lengths), device)
    per_sample = torch.zeros(b, device=device, dtype=dtype).index_add_(0, batch.sample_ids[real], err_real) / lengths  # (B,)
    return err_real.mean(), per_sample


# ---------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------

PRECISIONS = ("auto", "bf16", "fp32")


def forward_precision(device: torch.device | str, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The DiT forward's precision while sampling: bf16 autocast ("auto" on CUDA — the dtype it
    was trained in, and the fused attention kernels' only path) or fp32 ("auto" on the CPU,
    where the exactness tests run). The ODE state and its updates stay fp32 either way."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def sample(
    model: VideoDiT,
    shapes: list[tuple[int, int, int, int]],
    text: list[torch.Tensor],
    cfg: FlowConfig,
    generator: torch.Generator | None = None,
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
    text_mask: list[torch.Tensor] | None = None,
    budget: int | None = None,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    low_noise: tuple[nn.Module, float] | None = None,
    low_noise_guidance: float | None = None,
) -> list[torch.Tensor]:
    """Euler ODE from t = 1 (noise) to t = 0: x_{t−Δ} = x_t − Δ·v, one latent (C, T, H, W) per shape.

    Classifier-free guidance v = v_uncond + s·(v_cond − v_uncond), with the conditional and
    unconditional copies of every sample packed together in one forward. Each sample's
    time grid is shifted by its own token count, as in training. Seeded by `generator`.
    `precision` of the model's forward: see `forward_precision`.
    `low_noise` (model, boundary): a second expert for the steps whose time is below `boundary`,
    `model` taking those at or above it (Wan 2.2 A14B's high- and low-noise experts; WanPipeline's
    rule `t >= boundary_timestep`, per sample: samples of different sizes cross it at different steps),
    with its own guidance scale `low_noise_guidance` (default: the same; WanPipeline's guidance_scale_2).
    """
    autocast = forward_precision(device, precision)
    steps = cfg.sample_steps if steps is None else steps
    scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
    scale_low = scale if low_noise is None or low_noise_guidance is None else low_noise_guidance
    b = len(shapes)
    guided = scale != 1.0 or scale_low != 1.0
    noise = [torch.randn(s, generator=generator) for s in shapes]
    copies = 2 if guided else 1
    lat, txt = noise * copies, list(text) * copies
    mask = None if text_mask is None else list(text_mask) * copies
    patch = model.patch
    if budget is None:  # one sequence holding everything
        budget = sum(math.prod(s.shape[1:]) // math.prod(patch) for s in lat)
    batch = pack(lat, txt, patch, budget, text_mask=mask).to(device)
    drop = torch.tensor([False] * b + [True] * b * (copies - 1))
    real = batch.real_index()  # (R,): the conditional copies' tokens first, then the unconditional ones
    dtype = compute_dtype(batch.tokens)
    x = batch.tokens.to(dtype)[real]  # (R, P)
    half = x.shape[0] // copies
    x = x[:half]  # (R/copies, P) one state per sample, shared by both copies
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[None].expand(copies * b, -1)  # (2B, steps+1)
    grid_host = _shifted(grid, batch, cfg).to(dtype)  # (2B, steps+1) per-sample schedules
    grid = grid_host.to(device)
    experts = [model] if low_noise is None else [model, low_noise[0]]
    was_training = [m.training for m in experts]
    for m in experts:
        m.eval()
    tokens = batch.tokens.to(dtype).clone()  # (N, P)
    lengths = torch.tensor(batch.lengths[:b], device=device)  # (B,)
    for i in range(steps):
        tokens[real] = x.repeat(copies, 1)
        # WanPipeline's rule, per sample, decided on the host (no sync): the high-noise expert at t >= boundary
        is_high = None if low_noise is None else grid_host[:, i] >= low_noise[1]  # (copies·B,)
        with autocast:
            if low_noise is None:
                v = model(tokens, grid[:, i], batch, drop).to(dtype)[real]  # (R, P)
            else:
                v = _expert_velocity(model, low_noise[0], is_high, tokens, grid[:, i], batch, drop)[real]
        if guided and scale_low == scale:
            v = v[half:] + scale * (v[:half] - v[half:])  # (R/2, P)
        elif guided:  # each sample's scale is its expert's
            s_b = torch.where(is_high[:b], scale, scale_low).to(device)  # (B,)
            v = v[half:] + torch.repeat_interleave(s_b, lengths)[:, None] * (v[:half] - v[half:])  # (R/2, P)
        dt = (grid[:b, i] - grid[:b, i + 1])  # (B,)
        dt_tok = torch.repeat_interleave(dt, lengths)[:, None]  # (R/copies, 1)
        x = x - dt_tok * v  # (R/copies, P)
    for m, mode in zip(experts, was_training):
        m.train(mode)
    tokens[real] = x.repeat(copies, 1)
    return unpack(tokens, batch)[:b]


def _expert_velocity(high: nn.Module, low: nn.Module, is_high: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor,
                     batch: PackedBatch, drop: torch.Tensor) -> torch.Tensor:
    """(N, P) velocity of each sample from its expert: `high` where `is_high` (B,) (on the host), else `low`."""
    if is_high.all():
        return high(tokens, t, batch, drop).to(tokens.dtype)
    if not is_high.any():
        return low(tokens, t, batch, drop).to(tokens.dtype)
    v_high = high(tokens, t, batch, drop).to(tokens.dtype)  # (N, P) both experts over the whole pack,
    v_low = low(tokens, t, batch, drop).to(tokens.dtype)  # then each token from its sample's expert
    token_sample = torch.where(batch.sample_ids < 0, batch.num_samples, batch.sample_ids)  # (N,)
    pick = to_device(torch.cat([is_high, is_high.new_zeros(1)]), tokens.device)[token_sample][:, None]  # (N, 1)
    return torch.where(pick, v_high, v_low)
