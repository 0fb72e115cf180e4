"""The cases of MONAI 1.6.1's own loss tests that our differential tests did not cover, written for our classes.

MONAI's wheel does not ship its tests; running its ``tests/losses/test_focal_loss.py`` (and the Dice, Dice+CE,
Dice+Focal, Tversky files) against our classes failed only on classification input ``(B, C)``, which FocalLoss
now takes, and on ``torch.jit.script``, which our losses do not support on purpose (they use
``torch.autograd.Function`` for the memory-light path; ``torch.compile`` is tested instead).
"""

from __future__ import annotations

import contextlib
import itertools

import monai.losses
import pytest
import torch
import torch.nn.functional as F

from ctlosses import FocalLoss


def _classification_batch(seed: int, batch: int = 128, classes: int = 10, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, classes, generator=generator, dtype=dtype)
    labels = torch.randint(0, classes, (batch, 1), generator=generator)
    return scores, labels


@pytest.mark.parametrize("seed", range(5))
def test_classification_focal_with_gamma_0_is_binary_cross_entropy(seed):
    """MONAI's test_consistency_with_cross_entropy_classification: (B, C) scores, (B, 1) labels."""
    scores, labels = _classification_batch(seed)
    focal = FocalLoss(to_onehot_y=True, gamma=0.0)(scores, labels)
    one_hot = F.one_hot(labels[:, 0], scores.shape[1]).to(scores.dtype)
    torch.testing.assert_close(focal, F.binary_cross_entropy_with_logits(scores, one_hot), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_classification_softmax_focal_with_gamma_0_is_cross_entropy(seed):
    """MONAI's ..._classification_01, softmax variant: the mean over voxels and classes of -log p_y."""
    scores, labels = _classification_batch(seed)
    focal = FocalLoss(to_onehot_y=True, gamma=0.0, use_softmax=True)(scores, labels)
    # MONAI's mean also divides by the classes: the cross-entropy over C
    expected = F.cross_entropy(scores, labels[:, 0]) / scores.shape[1]
    torch.testing.assert_close(focal, expected, rtol=1e-12, atol=1e-12)


GRID = list(
    itertools.product(
        [0.0, 2.0],  # gamma
        [None, 0.25],  # alpha
        [False, True],  # use_softmax
        ["none", "mean", "sum"],  # reduction
        [True, False],  # include_background
        ["index", "one-hot"],  # target format
    )
)


@pytest.mark.parametrize("gamma, alpha, use_softmax, reduction, include_background, target_format", GRID)
def test_classification_input_equals_monai(gamma, alpha, use_softmax, reduction, include_background, target_format):
    # float32: MONAI's weighted focal loss returns float32 for float64 input
    scores, labels = _classification_batch(7, batch=16, classes=4, dtype=torch.float32)
    scores = (scores - 0.5) * 6
    index = target_format == "index"
    target = labels if index else F.one_hot(labels[:, 0], 4).to(scores.dtype)
    kwargs = dict(
        gamma=gamma,
        alpha=alpha,
        use_softmax=use_softmax,
        reduction=reduction,
        include_background=include_background,
        to_onehot_y=index,
        weight=[1.0, 2.0, 0.5, 3.0][int(not include_background) :],
    )
    # MONAI's warning: a scalar alpha is ignored by the softmax loss without the background
    warns = use_softmax and alpha is not None and not include_background
    with pytest.warns(UserWarning, match="alpha") if warns else contextlib.nullcontext():
        ours = FocalLoss(**kwargs)(scores, target)
    theirs = monai.losses.FocalLoss(**kwargs)(scores, target)
    if reduction == "sum":
        # MONAI 1.6.1 means over the spatial axes before summing; with none, mean(dim=[]) reduces every axis and
        # its "sum" is the mean. Ours is the sum, as for images (the sum of each image's per-class means).
        theirs = theirs * ours.new_tensor(scores.shape[0] * (scores.shape[1] - int(not include_background)))
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_classification_gradient_equals_monai():
    scores, labels = _classification_batch(3, batch=8, classes=3, dtype=torch.float32)
    ours_input, theirs_input = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    FocalLoss(to_onehot_y=True, use_softmax=True)(ours_input, labels).backward()
    monai.losses.FocalLoss(to_onehot_y=True, use_softmax=True)(theirs_input, labels).backward()
    torch.testing.assert_close(ours_input.grad, theirs_input.grad, rtol=1e-5, atol=1e-8)
