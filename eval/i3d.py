"""Inflated Inception-v1 (I3D) for Kinetics-400 in PyTorch: the video network behind FVD.

Architecture only, matching DeepMind's Sonnet `kinetics-i3d` (`InceptionI3d`, the TF-Hub
module `deepmind/i3d-kinetics-400/1`) layer for layer:

- TF "SAME" padding is asymmetric: the odd pixel goes at the end (`same_padding`). Convs
  pad with zeros, max-pools with -inf (TF's pools ignore padding). PyTorch's symmetric
  `padding=` would shift every strided layer by half a pixel, so it is never used.
- Unit3D = Conv3d (no bias) + Sonnet BatchNorm (eps 1e-3, beta only: the checkpoint has
  no gamma, `scale=False`) at inference (moving statistics) + ReLU.
- Logits = AvgPool (2, 7, 7) stride 1 VALID, dropout (a no-op at inference), a 1x1x1 conv
  with bias (no BN, no ReLU), spatial squeeze, mean over the remaining time steps → 400.
  That time-mean is the tensor `RGB/inception_i3d/Mean:0` that FVD embeds.

Module names are the Sonnet scopes ("Mixed_4b.Branch_1.Conv3d_0b_3x3.conv_3d.weight"), so
the converted checkpoint (eval/weights.py) maps one to one. The network is inference-only:
weights always come from the checkpoint, so there is no init beyond PyTorch's defaults.
Input: (N, 3, T, 224, 224) float in [-1, 1], T >= 9 (eval/fvd.py asks for >= 10).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

Triple = tuple[int, int, int]
NUM_CLASSES = 400

# ---------------------------------------------------------------------------
# TF "SAME" padding
# ---------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding TF's SAME uses on one axis: output ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2  # the odd pixel goes after


def pad_same(x: torch.Tensor, kernel: Triple, stride: Triple, value: float = 0.0) -> torch.Tensor:
    """Pad (N, C, T, H, W) as TF's SAME would for this kernel and stride."""
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):  # F.pad wants the last axis first
        pads += same_padding(size, k, s)
    return F.pad(x, pads, value=value) if any(pads) else x


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


class MaxPool3dSame(nn.Module):
    """Max-pool with TF SAME padding; padded cells are -inf, so they never win."""

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel, self.stride, value=-math.inf)  # (N, C, T+pt, H+ph, W+pw)
        return F.max_pool3d(x, self.kernel, self.stride)  # (N, C, ceil(T/st), ceil(H/sh), ceil(W/sw))


class BatchNorm(nn.Module):
    """Sonnet v1 BatchNorm at inference, no scale: (x - moving_mean) / sqrt(moving_variance + eps) + beta."""

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("moving_mean", torch.zeros(channels))
        self.register_buffer("moving_variance", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.moving_mean, self.moving_variance, None, self.beta, False, 0.0, self.eps)


class Unit3D(nn.Module):
    """Conv3d with TF SAME padding, then (optionally) BatchNorm and ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1),
        batch_norm: bool = True, relu: bool = True, bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv_3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=bias)
        self.batch_norm = BatchNorm(out_channels) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_3d(pad_same(x, self.kernel, self.stride))  # (N, C_out, ceil(T/st), ceil(H/sh), ceil(W/sw))
        if self.batch_norm is not None:
            x = self.batch_norm(x)
        return F.relu(x) if self.relu else x


class InceptionModule(nn.Module):
    """Four branches: 1x1 | 1x1→3x3 | 1x1→3x3 | 3x3 max-pool→1x1, concatenated on channels."""

    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.Branch_0 = nn.Sequential(OrderedDict(Conv3d_0a_1x1=Unit3D(in_channels, out[0])))
        self.Branch_1 = nn.Sequential(OrderedDict(
            Conv3d_0a_1x1=Unit3D(in_channels, out[1]), Conv3d_0b_3x3=Unit3D(out[1], out[2], (3, 3, 3))))
        self.Branch_2 = nn.Sequential(OrderedDict(
            Conv3d_0a_1x1=Unit3D(in_channels, out[3]), Conv3d_0b_3x3=Unit3D(out[3], out[4], (3, 3, 3))))
        self.Branch_3 = nn.Sequential(OrderedDict(
            MaxPool3d_0a_3x3=MaxPool3dSame((3, 3, 3), (1, 1, 1)), Conv3d_0b_1x1=Unit3D(in_channels, out[5])))
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C_in, T, H, W) -> (N, out_channels, T, H, W)
        return torch.cat([self.Branch_0(x), self.Branch_1(x), self.Branch_2(x), self.Branch_3(x)], dim=1)


class Logits(nn.Module):
    """AvgPool (2, 7, 7) VALID → 1x1x1 conv with bias → squeeze space → mean over time."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.Conv3d_0c_1x1 = Unit3D(in_channels, num_classes, batch_norm=False, relu=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] < 2 or x.shape[3:] != (7, 7):
            raise ValueError(f"I3D needs 224x224 input with >= 9 frames; Mixed_5c gave {tuple(x.shape[2:])}")
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (N, 1024, T'-1, 1, 1); dropout is identity at inference
        x = self.Conv3d_0c_1x1(x)  # (N, 400, T'-1, 1, 1)
        return x.squeeze(4).squeeze(3).mean(dim=2)  # (N, 400)


# ---------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------

# Mixed blocks: (input channels, (b0, b1a, b1b, b2a, b2b, b3)) as in kinetics-i3d/i3d.py
MIXED: dict[str, tuple[int, tuple[int, int, int, int, int, int]]] = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """I3D (RGB stream) up to the time-averaged Kinetics-400 logits."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(*MIXED["Mixed_3b"])
        self.Mixed_3c = InceptionModule(*MIXED["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(*MIXED["Mixed_4b"])
        self.Mixed_4c = InceptionModule(*MIXED["Mixed_4c"])
        self.Mixed_4d = InceptionModule(*MIXED["Mixed_4d"])
        self.Mixed_4e = InceptionModule(*MIXED["Mixed_4e"])
        self.Mixed_4f = InceptionModule(*MIXED["Mixed_4f"])
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(*MIXED["Mixed_5b"])
        self.Mixed_5c = InceptionModule(*MIXED["Mixed_5c"])
        self.Logits = Logits(self.Mixed_5c.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, 3, T, 224, 224) in [-1, 1]; shapes below for T = 16
        x = self.Conv3d_1a_7x7(x)  # (N, 64, 8, 112, 112)
        x = self.MaxPool3d_2a_3x3(x)  # (N, 64, 8, 56, 56)
        x = self.Conv3d_2b_1x1(x)  # (N, 64, 8, 56, 56)
        x = self.Conv3d_2c_3x3(x)  # (N, 192, 8, 56, 56)
        x = self.MaxPool3d_3a_3x3(x)  # (N, 192, 8, 28, 28)
        x = self.Mixed_3b(x)  # (N, 256, 8, 28, 28)
        x = self.Mixed_3c(x)  # (N, 480, 8, 28, 28)
        x = self.MaxPool3d_4a_3x3(x)  # (N, 480, 4, 14, 14)
        x = self.Mixed_4b(x)  # (N, 512, 4, 14, 14)
        x = self.Mixed_4c(x)  # (N, 512, 4, 14, 14)
        x = self.Mixed_4d(x)  # (N, 512, 4, 14, 14)
        x = self.Mixed_4e(x)  # (N, 528, 4, 14, 14)
        x = self.Mixed_4f(x)  # (N, 832, 4, 14, 14)
        x = self.MaxPool3d_5a_2x2(x)  # (N, 832, 2, 7, 7)
        x = self.Mixed_5b(x)  # (N, 832, 2, 7, 7)
        x = self.Mixed_5c(x)  # (N, 1024, 2, 7, 7)
        return self.Logits(x)  # (N, 400): logits averaged over time


__all__ = ["InceptionI3d", "MIXED", "NUM_CLASSES", "MaxPool3dSame", "Unit3D", "pad_same", "same_padding"]
