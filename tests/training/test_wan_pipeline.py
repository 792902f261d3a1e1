"""Sampling a Wan backbone (training.flow.sample + the pipeline's VideoVAE, what training/sample.py runs
per prompt) equals diffusers' own WanPipeline end to end: the same transformer, the same Wan VAE with
its latents_mean / latents_std, the same noise, time grid and guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.vae import VAEConfig, load_vae
from training.flow import FlowConfig, sample, shift_timesteps
from training.wan import WAN_TEXT_LEN, PackedWan

from .test_wan import tiny_wan


@pytest.mark.parametrize("null_tokens", [0, 1, 3])
def test_wan_sampling_and_latent_normalisation_equal_diffusers_wan_pipeline(null_tokens: int) -> None:
    """null_tokens: rows of the data's encoding of "" (0: data without one, the null text is zero rows);
    diffusers gets them as negative_prompt_embeds padded with zeros, as encode_prompt("") gives them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = load_vae(VAEConfig(kind="wan", preset="tiny-wan"))
    assert vae.latent_channels == 4 and vae.model.config.latents_std != [1.0] * 4  # a real normalisation
    model = tiny_wan(seed=3).eval()  # 4 latent channels, 16-wide text
    null = torch.randn(null_tokens, 16, generator=torch.Generator().manual_seed(2)) if null_tokens else None
    packed = PackedWan(model, null_text=null)
    flow = FlowConfig()  # the resolution shift on, as sampling defaults
    shape, steps, scale = (4, 2, 4, 6), 4, 3.0  # 5 frames of 32×48 pixels
    text = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))  # what sample() draws first from g
    with torch.no_grad():
        z = sample(packed, [shape], [text], flow, g, steps=steps, guidance_scale=scale)[0]  # (C, T', H', W')
        ours = vae.decode(z[None])[0]  # (T, H, W, 3) uint8

    # diffusers: Euler flow matching on the same per-sample shifted grid (t = sigma, timestep = 1000·sigma)
    n_tokens = 2 * (4 // 2) * (6 // 2)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[None]
    sigmas = shift_timesteps(grid, torch.tensor([n_tokens]), flow.base_tokens, flow.max_tokens, flow.base_shift,
                             flow.max_shift)[0, :-1].tolist()

    class OurGrid(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):  # noqa: ANN001, ANN003
            super().set_timesteps(sigmas=sigmas, device=device)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=vae.model,
                       scheduler=OurGrid(shift=1.0))
    with torch.no_grad():
        padded = torch.cat([text, torch.zeros(WAN_TEXT_LEN - len(text), 16)])  # as WanPipeline.encode_prompt pads
        negative = torch.zeros(1, WAN_TEXT_LEN, 16)
        if null is not None:
            negative[0, :null_tokens] = null
        theirs = pipe(prompt_embeds=padded[None], negative_prompt_embeds=negative,
                      latents=noise[None], num_frames=5, height=32, width=48, num_inference_steps=steps,
                      guidance_scale=scale, output_type="np").frames[0]  # (T, H, W, 3) float in [0, 1]
    assert theirs.shape == ours.shape == (5, 32, 48, 3)
    diff = np.abs(theirs * 255.0 - ours.astype(np.float64))
    assert diff.max() <= 1.0 and ours.std() > 1  # equal up to uint8 rounding, and not a flat video
