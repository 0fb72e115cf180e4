"""GeneralizedDiceLoss: differential tests against monai.losses.GeneralizedDiceLoss over its argument grid, the
paper's weighting by hand, ignore_index and weight (ours), half precision, gradcheck and bad input."""

from __future__ import annotations

import itertools

import monai.losses
import pytest
import torch
import torch.nn.functional as F
from monai.metrics.utils import create_ignore_mask

from ctlosses import GeneralizedDiceLoss, LossInputError

SENTINEL = 255


def make_case(spatial=(6, 5, 4), classes=4, batch=2, seed=0, dtype=torch.float64, absent_class=True):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, classes, *spatial), generator=generator, dtype=dtype)
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=generator)
    if absent_class:
        labels[labels == classes - 1] = 0  # the last class is absent: MONAI's infinite-weight rule
    return logits, labels


def one_hot(labels, classes, dtype=torch.float64):
    return F.one_hot(labels[:, 0].clamp(0, classes - 1), classes).movedim(-1, 1).to(dtype)


GRID = list(
    itertools.product(
        ["square", "simple", "uniform"],  # w_type
        [False, True],  # batch
        ["softmax", "sigmoid", "none"],  # activation
        [True, False],  # include_background
        ["index", "one-hot"],  # target format
        ["mean", "sum", "none"],  # reduction
    )
)


@pytest.mark.parametrize("w_type, batch, activation, include_background, target_format, reduction", GRID)
def test_equals_monai(w_type, batch, activation, include_background, target_format, reduction):
    logits, labels = make_case()
    index = target_format == "index"
    target = labels if index else one_hot(labels, 4)
    kwargs = dict(
        w_type=w_type,
        batch=batch,
        include_background=include_background,
        reduction=reduction,
        to_onehot_y=index,
        sigmoid=activation == "sigmoid",
        softmax=activation == "softmax",
    )
    inputs = logits if activation != "none" else torch.softmax(logits, 1)
    ours_input, theirs_input = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
    ours = GeneralizedDiceLoss(**kwargs)(ours_input, target)
    theirs = monai.losses.GeneralizedDiceLoss(**kwargs)(theirs_input, target.double())
    assert ours.shape == theirs.shape
    # MONAI rounds the class weights to float32 (w_func(ground_o.float())): 1e-9 of the loss in float64
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(ours_input.grad, theirs_input.grad, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("soft_label", [False, True])
def test_soft_labels_equal_monai(soft_label):
    logits, labels = make_case(seed=1)
    soft = torch.softmax(torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype), 1)
    ours = GeneralizedDiceLoss(softmax=True, soft_label=soft_label)(logits, soft)
    theirs = monai.losses.GeneralizedDiceLoss(softmax=True, soft_label=soft_label)(logits, soft)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)  # MONAI's float32 weights, as above


def test_square_weights_by_hand():
    """Two classes in one image, probabilities given: w_c = 1 / G_c^2 from the target volumes."""
    probs = torch.tensor([[[0.9, 0.8, 0.3, 0.1], [0.1, 0.2, 0.7, 0.9]]], dtype=torch.float64)  # (1, 2, 4)
    labels = torch.tensor([[[0, 0, 0, 1]]])
    tp = torch.tensor([0.9 + 0.8 + 0.3, 0.9], dtype=torch.float64)
    pred, ground = probs[0].sum(-1), torch.tensor([3.0, 1.0], dtype=torch.float64)
    weights = 1 / ground**2
    expected = 1 - (2 * (weights * tp).sum() + 1e-5) / ((weights * (pred + ground)).sum() + 1e-5)
    torch.testing.assert_close(GeneralizedDiceLoss(to_onehot_y=True)(probs, labels), expected)


def test_ignored_voxels_equal_removing_them():
    logits, labels = make_case(spatial=(24,), seed=3, absent_class=False)
    labels[:, :, ::4] = SENTINEL
    kept = labels[0, 0] != SENTINEL
    masked = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, ignore_index=SENTINEL)(logits[:1], labels[:1])
    removed = GeneralizedDiceLoss(to_onehot_y=True, softmax=True)(logits[:1, :, kept], labels[:1, :, kept])
    torch.testing.assert_close(masked, removed)
    # and MONAI's rule on one-hot targets: ignore_index names a class whose voxels are masked
    dense = one_hot(labels, 4) * create_ignore_mask(labels, SENTINEL)
    via_dense = GeneralizedDiceLoss(softmax=True, ignore_index=SENTINEL)(logits, dense)
    via_index = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, ignore_index=SENTINEL)(logits, labels)
    torch.testing.assert_close(via_dense, via_index)


def test_weight_multiplies_the_class_weights():
    logits, labels = make_case(seed=4, absent_class=False)
    with_weight = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, w_type="uniform", weight=[0.0, 1.0, 1.0, 1.0])
    without_background = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, w_type="uniform", include_background=False)
    torch.testing.assert_close(with_weight(logits, labels), without_background(logits, labels))
    with pytest.raises(LossInputError, match="weight has 2 values but the loss has 4 classes"):
        GeneralizedDiceLoss(to_onehot_y=True, softmax=True, weight=[1.0, 2.0])(logits, labels)


def test_half_precision_gives_the_float32_loss():
    logits, labels = make_case(spatial=(16, 16, 8), seed=5, dtype=torch.float32)
    loss = GeneralizedDiceLoss(to_onehot_y=True, softmax=True)
    half = loss(logits.half(), labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, loss(logits.half().float(), labels))


def test_gradcheck_index_path():
    logits, labels = make_case(spatial=(3, 4), seed=6)
    logits.requires_grad_(True)
    loss = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, ignore_index=SENTINEL, w_type="simple")
    labels[0, 0, 0, 0] = SENTINEL
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (logits,))


def test_bad_w_type_is_named():
    with pytest.raises(LossInputError, match="w_type must be one of"):
        GeneralizedDiceLoss(w_type="cubic")


# ---------------------------------------------------------------------------------- generalised Dice + cross-entropy


@pytest.mark.parametrize("target_format", ["index", "one-hot"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch", [False, True])
def test_cross_entropy_beside_is_monai_gdl_plus_torch_cross_entropy(target_format, reduction, batch):
    logits, labels = make_case(seed=7)
    logits.requires_grad_(True)
    target = labels if target_format == "index" else one_hot(labels, 4)
    settings = dict(to_onehot_y=target_format == "index", softmax=True, w_type="simple", batch=batch)
    both = GeneralizedDiceLoss(**settings, include_background=False, reduction=reduction, lambda_ce=0.7)
    ratio = monai.losses.GeneralizedDiceLoss(**settings, include_background=False, reduction=reduction)
    per_voxel = F.cross_entropy(logits, labels[:, 0], reduction="none")  # every channel, background included
    cross_entropy = per_voxel.mean() if reduction == "mean" else per_voxel.sum()
    expected = ratio(logits, target) + 0.7 * cross_entropy
    value = both(logits, target)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)  # MONAI rounds its weights to float32
    (grad,) = torch.autograd.grad(value, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_cross_entropy_beside_leaves_ignored_voxels_out():
    logits, labels = make_case(spatial=(24,), seed=8, absent_class=False)
    labels[:, :, ::3] = SENTINEL
    kept = labels[0, 0] != SENTINEL
    loss = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, ignore_index=SENTINEL, lambda_ce=1.0)
    removed = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, lambda_ce=1.0)
    torch.testing.assert_close(loss(logits[:1], labels[:1]), removed(logits[:1, :, kept], labels[:1, :, kept]))


def test_cross_entropy_beside_gradcheck_float64():
    logits, labels = make_case(spatial=(3, 4, 3), seed=9)
    logits.requires_grad_(True)
    loss = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, w_type="simple", batch=True, lambda_ce=1.0)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (logits,))


@pytest.mark.parametrize("batch", [False, True])
def test_cross_entropy_beside_from_one_log_softmax_equals_the_two_passes(batch, monkeypatch):
    import ctlosses.generalized_dice as module

    logits, labels = make_case(spatial=(7, 6, 5), seed=10)
    labels[0, 0, 0] = SENTINEL
    loss = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, batch=batch, ignore_index=SENTINEL, lambda_ce=0.8)
    calls = []
    shared = module.region_loss_and_log_likelihood
    monkeypatch.setattr(module, "region_loss_and_log_likelihood", lambda *args: calls.append(1) or shared(*args))
    one_pass = logits.clone().requires_grad_(True)
    value = loss(one_pass, labels)
    value.backward()
    assert calls == [1]  # the index target with softmax takes the one-log-softmax path
    monkeypatch.setattr(module, "takes_fused_index_path", lambda *args: False)  # the ratio and the CE apart
    two_passes = logits.clone().requires_grad_(True)
    expected = loss(two_passes, labels)
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one_pass.grad, two_passes.grad, rtol=1e-10, atol=1e-12)
