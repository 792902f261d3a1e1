"""I3D architecture pieces: TF SAME padding (asymmetric, -inf for pools), Sonnet BatchNorm, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from eval.i3d import InceptionI3d, MaxPool3dSame, Unit3D, pad_same, same_padding


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (224, 7, 2, (2, 3)),  # Conv3d_1a_7x7 spatially: the odd pixel goes after
    (16, 7, 2, (2, 3)),  # ... and in time for 16 frames
    (112, 3, 2, (0, 1)),  # MaxPool3d_2a_3x3
    (8, 3, 2, (0, 1)),  # MaxPool3d_4a_3x3 in time
    (4, 2, 2, (0, 0)),  # MaxPool3d_5a_2x2
    (3, 2, 2, (0, 1)),
    (56, 3, 1, (1, 1)),  # stride-1 3x3x3 convs: symmetric
    (28, 1, 1, (0, 0)),
])
def test_same_padding_matches_tf(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == expected


def test_strided_conv_pads_at_the_end() -> None:
    # 6 samples, kernel 3 of ones, stride 2 -> TF SAME: windows [0:3], [2:5], [4:6]+one zero
    unit = Unit3D(1, 1, (1, 1, 3), (1, 1, 2), batch_norm=False, relu=False)
    unit.conv_3d.weight.data.fill_(1.0)
    x = torch.arange(1.0, 7.0).view(1, 1, 1, 1, 6)  # 1..6
    assert unit(x).flatten().tolist() == [1 + 2 + 3, 3 + 4 + 5, 5 + 6]  # PyTorch padding=1 would give 3, 9, 15


def test_max_pool_pads_with_minus_inf_at_the_end() -> None:
    pool = MaxPool3dSame((1, 1, 3), (1, 1, 2))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 1, 4)
    assert pool(x).flatten().tolist() == [3.0, 4.0]  # windows [1, 2, 3], [3, 4, pad]
    negative = torch.full((1, 2, 3, 5, 5), -5.0)
    assert pool(negative).max() == -5.0  # zero padding would leak 0s into the border
    assert MaxPool3dSame((3, 3, 3), (1, 1, 1))(negative).max() == -5.0
    padded = pad_same(torch.zeros(1, 1, 8, 112, 112), (3, 3, 3), (2, 2, 2), value=-math.inf)  # MaxPool3d_4a_3x3
    assert padded.shape == (1, 1, 9, 113, 113)
    assert padded[:, :, :8, :112, :112].eq(0).all() and padded[:, :, 8].eq(-math.inf).all()  # padding only at the end


def test_batch_norm_is_sonnet_inference_without_scale() -> None:
    unit = Unit3D(2, 2, relu=False)
    unit.conv_3d.weight.data = torch.eye(2).view(2, 2, 1, 1, 1)
    bn = unit.batch_norm
    bn.moving_mean.copy_(torch.tensor([1.0, -2.0]))
    bn.moving_variance.copy_(torch.tensor([4.0, 0.25]))
    bn.beta.data = torch.tensor([0.5, 0.0])
    x = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1, 1)
    expected = [(3 - 1) / math.sqrt(4 + 1e-3) + 0.5, (1 + 2) / math.sqrt(0.25 + 1e-3)]
    assert unit(x).flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert sorted(dict(unit.named_parameters())) == ["batch_norm.beta", "conv_3d.weight"]  # no gamma, no conv bias


def test_endpoint_shapes_for_16_frames() -> None:
    model = InceptionI3d().eval()
    shapes = {}
    for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "MaxPool3d_3a_3x3", "Mixed_3c", "MaxPool3d_4a_3x3",
                 "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5c"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    with torch.inference_mode():
        logits = model(torch.zeros(1, 3, 16, 224, 224))
    assert logits.shape == (1, 400)
    assert shapes == {
        "Conv3d_1a_7x7": (1, 64, 8, 112, 112), "MaxPool3d_2a_3x3": (1, 64, 8, 56, 56),
        "MaxPool3d_3a_3x3": (1, 192, 8, 28, 28), "Mixed_3c": (1, 480, 8, 28, 28),
        "MaxPool3d_4a_3x3": (1, 480, 4, 14, 14), "Mixed_4f": (1, 832, 4, 14, 14),
        "MaxPool3d_5a_2x2": (1, 832, 2, 7, 7), "Mixed_5c": (1, 1024, 2, 7, 7),
    }


@pytest.mark.parametrize("shape", [(1, 3, 8, 224, 224), (1, 3, 16, 112, 112)])
def test_too_short_or_small_input_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="224x224"), torch.inference_mode():
        InceptionI3d()(torch.zeros(shape))
