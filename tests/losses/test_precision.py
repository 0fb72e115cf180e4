"""Float32 precision at the patch sizes users train with (issue 13, item 0).

Each loss takes class-index targets at full size, in float32, and is compared with a float64 reference: MONAI's
loss where MONAI has it, else our own loss on a float64 one-hot target (the dense path, tied to MONAI and the
papers by the other test modules). Two kinds of prediction: random logits, and confident ones (the end of
training: the true class 8 logits ahead, so a Dice loss near 1e-3, where MONAI's own float32 loss is about 4e-5
off). Before the per-class sums were made exact, the Dice value at 128^3 x 2 was 99 % off here and the
Lovasz-softmax gradient 3 %.

Both the value and the whole gradient must be within 5e-5 (relative; the gradient as ||g - g64|| / ||g64||).
"""

from __future__ import annotations

import functools

import monai.losses
import pytest
import torch
import torch.nn.functional as F

from ctlosses import get_loss

TOLERANCE = 5e-5

# (batch, classes, spatial): a binary spleen-sized patch, a 3-class 96^3 patch, and 14 classes (BTCV) both as one
# anisotropic 128 x 128 x 64 patch and as a batch of two 96^3 patches
SIZES = {
    "128x128x128x2": (1, 2, (128, 128, 128)),
    "96x96x96x3": (1, 3, (96, 96, 96)),
    "128x128x64x14": (1, 14, (128, 128, 64)),
    "2x96x96x96x14": (2, 14, (96, 96, 96)),
}

FOCAL_TVERSKY = {"alpha": 0.3, "beta": 0.7, "gamma": 4 / 3}


def _focal_tversky_reference(logits, labels):
    """Abraham & Khan's per-class ``(1 - TI)^(1/gamma)`` on MONAI's Tversky loss per image and class."""
    tversky = monai.losses.TverskyLoss(
        to_onehot_y=True, softmax=True, alpha=FOCAL_TVERSKY["alpha"], beta=FOCAL_TVERSKY["beta"], reduction="none"
    )
    return tversky(logits, labels).pow(1 / FOCAL_TVERSKY["gamma"]).mean()


def _ours_on_one_hot(name, **kwargs):
    """Our loss on a float64 one-hot target: no index path, no fused or chunked sums."""
    loss = get_loss(name, to_onehot_y=False, **kwargs)

    def reference(logits, labels):
        return loss(logits, F.one_hot(labels[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype))

    return reference


# registry name -> (our keyword arguments, float64 reference taking (logits, labels))
LOSSES = {
    "dice": ({"softmax": True}, monai.losses.DiceLoss(to_onehot_y=True, softmax=True)),
    "jaccard": ({"softmax": True}, monai.losses.DiceLoss(to_onehot_y=True, softmax=True, jaccard=True)),
    "tversky": (
        {"softmax": True, "alpha": 0.3, "beta": 0.7},
        monai.losses.TverskyLoss(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7),
    ),
    "focal_tversky": ({"softmax": True, **FOCAL_TVERSKY}, _focal_tversky_reference),
    "generalized_dice": ({"softmax": True}, monai.losses.GeneralizedDiceLoss(to_onehot_y=True, softmax=True)),
    "dice_ce": ({"softmax": True}, monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)),
    "dice_focal": ({"softmax": True}, monai.losses.DiceFocalLoss(to_onehot_y=True, softmax=True)),
    "focal": ({}, monai.losses.FocalLoss(to_onehot_y=True)),
    "combo": ({"softmax": True}, _ours_on_one_hot("combo", softmax=True)),
    "lovasz_softmax": ({}, _ours_on_one_hot("lovasz_softmax")),
}


@functools.cache
def _case(size: str, confident: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, classes, spatial = SIZES[size]
    generator = torch.Generator().manual_seed(13)
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=generator)
    logits = torch.randn((batch, classes, *spatial), generator=generator)
    if confident:
        logits.scatter_add_(1, labels, torch.full(labels.shape, 8.0))
    return logits, labels


def _value_and_grad(loss, logits, labels):
    logits = logits.detach().clone().requires_grad_(True)
    value = loss(logits, labels)
    value.backward()
    return value.detach().double(), logits.grad.double()


@pytest.mark.parametrize("confident", [True, False], ids=["confident", "random"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_index_path_matches_float64_reference_at_patch_size(name, size, confident):
    kwargs, reference = LOSSES[name]
    logits, labels = _case(size, confident)
    value, grad = _value_and_grad(get_loss(name, to_onehot_y=True, **kwargs), logits, labels)
    expected_value, expected_grad = _value_and_grad(reference, logits.double(), labels)
    value_error = ((value - expected_value).abs() / expected_value.abs()).item()
    grad_error = ((grad - expected_grad).norm() / expected_grad.norm()).item()
    assert value_error < TOLERANCE and grad_error < TOLERANCE, (value_error, grad_error, expected_value.item())
