"""TverskyLoss against monai.losses.TverskyLoss over the argument grid; FocalTverskyLoss against hand-computed
values of Abraham & Khan 2019 (Eq. 4); gradcheck, properties, torch.compile, half precision, bad input."""

from __future__ import annotations

import itertools
import warnings

import monai
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from region_cases import ACTIVATIONS, SENTINEL, TOL, loss_and_grad, make_case, random_case

from ctlosses import FocalTverskyLoss, TverskyLoss
from ctlosses.core import LossInputError


@pytest.mark.parametrize("spatial", [(5, 4), (4, 3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("target_kind", ["index", "onehot", "soft"])
@pytest.mark.parametrize("ignore", [None, "class", "sentinel"])
def test_equals_monai_tversky(spatial, activation, target_kind, ignore):
    logits, target, ignore_index, to_onehot_y = make_case(spatial, target_kind, ignore)
    grid = itertools.product([True, False], [False, True], ["mean", "sum", "none"])
    for (include_background, batch, reduction), (alpha, beta) in zip(grid, itertools.cycle([(0.3, 0.7), (0.9, 0.2)])):
        kwargs = dict(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            alpha=alpha,
            beta=beta,
            batch=batch,
            reduction=reduction,
            soft_label=target_kind == "soft",
            ignore_index=ignore_index,
            **ACTIVATIONS[activation],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value, grad = loss_and_grad(TverskyLoss(**kwargs), logits, target)
            expected, expected_grad = loss_and_grad(monai.losses.TverskyLoss(**kwargs), logits, target)
        assert value.shape == expected.shape, kwargs
        torch.testing.assert_close(value, expected, **TOL, msg=lambda m, kwargs=kwargs: f"{kwargs}: {m}")
        torch.testing.assert_close(grad, expected_grad, **TOL, msg=lambda m, kwargs=kwargs: f"{kwargs}: {m}")


@pytest.mark.parametrize("batch", [False, True])
def test_weight_multiplies_monai_per_class_tversky(batch):
    """MONAI's Tversky has no weight; ours multiplies each class' loss by it, as MONAI's DiceLoss does."""
    logits, target, ignore_index, _ = make_case((4, 3, 5), "index", "sentinel", num_classes=4)
    kwargs = dict(to_onehot_y=True, softmax=True, include_background=False, ignore_index=ignore_index, batch=batch)
    weight = torch.tensor([0.5, 2.0, 1.5])
    per_class = monai.losses.TverskyLoss(reduction="none", **kwargs)(logits, target)
    torch.testing.assert_close(TverskyLoss(weight=weight, **kwargs)(logits, target), (per_class * weight).mean(), **TOL)
    per_class_weighted = TverskyLoss(weight=weight, reduction="none", **kwargs)(logits, target)
    torch.testing.assert_close(per_class_weighted, per_class * weight, **TOL)


# ---------------------------------------------------------------------------------------------------------
# Focal Tversky: hand-computed from Abraham & Khan 2019, Eq. 3-4


def tiny_probabilities():
    """One image, two classes, four voxels; class 1 probabilities 0.9, 0.6, 0.2, 0.1 on labels 1, 1, 0, 0."""
    foreground = torch.tensor([0.9, 0.6, 0.2, 0.1], dtype=torch.float64)
    probs = torch.stack([1 - foreground, foreground]).reshape(1, 2, 4, 1)
    labels = torch.tensor([1, 1, 0, 0]).reshape(1, 1, 4, 1)
    return probs, labels


def test_focal_tversky_hand_computed_defaults():
    # class 1: TP = 0.9 + 0.6 = 1.5, FP = 0.2 + 0.1 = 0.3, FN = 0.1 + 0.4 = 0.5
    #          TI = 1.5 / (1.5 + 0.3 * 0.3 + 0.7 * 0.5) = 1.5 / 1.94
    # class 0: TP = 0.8 + 0.9 = 1.7, FP = 0.1 + 0.4 = 0.5, FN = 0.2 + 0.1 = 0.3
    #          TI = 1.7 / (1.7 + 0.3 * 0.5 + 0.7 * 0.3) = 1.7 / 2.06
    # FTL = mean_c (1 - TI_c) ** (1 / gamma), gamma = 4/3: (0.174757 ** 0.75 + 0.226804 ** 0.75) / 2 = 0.2994706
    expected_per_class = torch.tensor([[(1 - 1.7 / 2.06) ** 0.75, (1 - 1.5 / 1.94) ** 0.75]], dtype=torch.float64)
    probs, labels = tiny_probabilities()
    loss = FocalTverskyLoss(to_onehot_y=True, smooth_nr=0, smooth_dr=0, reduction="none")
    torch.testing.assert_close(loss(probs, labels), expected_per_class, rtol=1e-12, atol=0)
    mean = FocalTverskyLoss(to_onehot_y=True, smooth_nr=0, smooth_dr=0)(probs, labels)
    torch.testing.assert_close(mean, torch.tensor(0.2994706, dtype=torch.float64), rtol=0, atol=1e-7)
    torch.testing.assert_close(mean, expected_per_class.mean(), rtol=1e-12, atol=0)


def test_focal_tversky_hand_computed_other_parameters():
    # alpha = 0.5 (FP), beta = 0.5 (FN), gamma = 2, background excluded, default smoothing 1e-5:
    # class 1: TI = (1.5 + 1e-5) / (1.5 + 0.15 + 0.25 + 1e-5); loss = (1 - TI) ** 0.5
    probs, labels = tiny_probabilities()
    loss = FocalTverskyLoss(to_onehot_y=True, include_background=False, alpha=0.5, beta=0.5, gamma=2)
    expected = (1 - (1.5 + 1e-5) / (1.9 + 1e-5)) ** 0.5
    torch.testing.assert_close(loss(probs, labels), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_focal_tversky_powers_each_class_not_the_mean():
    """The seed post / smp raise the mean Tversky loss to gamma; the paper powers each class' 1 - TI_c."""
    probs, labels = tiny_probabilities()
    tversky = TverskyLoss(to_onehot_y=True, alpha=0.3, beta=0.7, reduction="none")(probs, labels)
    focal = FocalTverskyLoss(to_onehot_y=True)(probs, labels)
    torch.testing.assert_close(focal, (tversky**0.75).mean())
    assert not torch.isclose(focal, tversky.mean() ** 0.75)


@pytest.mark.parametrize("target_kind", ["index", "soft"])
def test_focal_tversky_with_gamma_one_is_tversky(target_kind):
    logits, target, ignore_index, to_onehot_y = make_case((4, 3, 5), target_kind, "sentinel")
    kwargs = dict(
        to_onehot_y=to_onehot_y,
        softmax=True,
        ignore_index=ignore_index,
        alpha=0.3,
        beta=0.7,
        soft_label=target_kind == "soft",
        reduction="none",
    )
    torch.testing.assert_close(
        FocalTverskyLoss(gamma=1.0, **kwargs)(logits, target),
        TverskyLoss(**kwargs)(logits, target),
        rtol=1e-6,
        atol=1e-7,
    )


def test_focal_tversky_defaults_follow_the_paper():
    loss = FocalTverskyLoss()
    assert (loss.alpha, loss.beta, loss.gamma) == (0.3, 0.7, 4 / 3)
    assert (loss.reduction, loss.include_background, loss.batch) == ("mean", True, False)


def test_focal_tversky_perfect_prediction_is_zero_with_zero_gradient():
    """(1 - TI)^(3/4) has an infinite derivative at TI = 1; the loss must stay finite (zero) instead."""
    _, labels = tiny_probabilities()
    probs = F.one_hot(labels[:, 0], 2).movedim(-1, 1).double().requires_grad_(True)
    value = FocalTverskyLoss(to_onehot_y=True)(probs, labels)
    (grad,) = torch.autograd.grad(value, probs)
    assert value == 0 and (grad == 0).all()


# ---------------------------------------------------------------------------------------------------------
# shared checks for both classes

BOTH = [TverskyLoss, FocalTverskyLoss]


@pytest.mark.parametrize("loss_class", BOTH)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(to_onehot_y=True, softmax=True, ignore_index=SENTINEL),
        dict(to_onehot_y=True, sigmoid=True, ignore_index=1, batch=True, weight=[1.0, 2.0, 0.5]),
        dict(to_onehot_y=True, soft_label=True, include_background=False, alpha=0.2, beta=0.8),
        dict(softmax=True, soft_label=True, ignore_index=0, reduction="none"),
    ],
)
def test_gradcheck_float64(loss_class, kwargs):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 3), generator=generator)
    labels[0, 0, 0] = SENTINEL if kwargs.get("ignore_index") == SENTINEL else labels[0, 0, 0]
    target = labels if kwargs.get("to_onehot_y") else F.one_hot(labels[:, 0], 3).movedim(-1, 1).double()
    loss = loss_class(**kwargs)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


@pytest.mark.parametrize("loss_class", BOTH)
def test_compiles_without_graph_breaks(loss_class):
    logits, target, ignore_index, _ = make_case((4, 3, 5), "index", "sentinel")
    loss = loss_class(to_onehot_y=True, softmax=True, ignore_index=ignore_index, weight=[1.0, 2.0, 3.0])
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value, grad = loss_and_grad(compiled, logits, target)
    expected, expected_grad = loss_and_grad(loss, logits, target)
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("loss_class", BOTH)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_equals_float32(loss_class, dtype):
    logits, target, ignore_index, _ = make_case((8, 7, 6), "index", "sentinel", num_classes=4)
    logits = logits.to(dtype)
    loss = loss_class(to_onehot_y=True, softmax=True, ignore_index=ignore_index)
    value, grad = loss_and_grad(loss, logits, target)
    expected, expected_grad = loss_and_grad(loss, logits.float(), target)
    assert value.dtype == torch.float32 and torch.isfinite(value) and grad.dtype == dtype
    torch.testing.assert_close(value, expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(grad.float(), expected_grad, rtol=2e-2, atol=1e-4)


cases = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(2, 4),  # classes
    st.sampled_from([(4, 5), (3, 4, 2)]),
    st.integers(0, 2**16),  # seed
    st.booleans(),  # include_background
    st.sampled_from(BOTH),
    st.sampled_from([(0.3, 0.7), (0.5, 0.5), (1.0, 0.0)]),  # alpha, beta
)


@given(cases)
def test_loss_in_unit_interval_and_zero_at_perfect_prediction(case):
    batch, classes, spatial, seed, include_background, loss_class, (alpha, beta) = case
    logits, labels, _ = random_case(batch, classes, spatial, seed)
    loss = loss_class(include_background, to_onehot_y=True, alpha=alpha, beta=beta, reduction="none")
    value = loss(torch.softmax(logits, 1), labels)
    assert ((value >= 0) & (value <= 1)).all()
    perfect = F.one_hot(labels[:, 0], classes).movedim(-1, 1).double()
    assert loss(perfect, labels).abs().max() < 1e-6


@given(cases, st.booleans())
def test_invariant_to_batch_permutation(case, batch_reduced):
    batch, classes, spatial, seed, include_background, loss_class, (alpha, beta) = case
    logits, labels, _ = random_case(batch, classes, spatial, seed)
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    loss = loss_class(include_background, True, softmax=True, alpha=alpha, beta=beta, batch=batch_reduced)
    torch.testing.assert_close(loss(logits[order], labels[order]), loss(logits, labels), rtol=1e-12, atol=1e-12)


@given(cases, st.sampled_from([SENTINEL, -1, 1]))
def test_ignored_voxels_change_nothing(case, ignore_index):
    batch, classes, spatial, seed, include_background, loss_class, (alpha, beta) = case
    logits, labels, ignored = random_case(batch, classes, spatial, seed)
    labels = labels.masked_fill(ignored, ignore_index) if ignore_index != 1 else labels
    ignored = labels == ignore_index
    loss = loss_class(include_background, True, softmax=True, alpha=alpha, beta=beta, ignore_index=ignore_index)
    value, grad = loss_and_grad(loss, logits, labels)
    scrambled = torch.where(ignored, 50 * torch.randn_like(logits), logits)
    scrambled_value, scrambled_grad = loss_and_grad(loss, scrambled, labels)
    torch.testing.assert_close(scrambled_value, value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scrambled_grad, grad, rtol=1e-12, atol=1e-12)
    assert (grad.masked_select(ignored.expand_as(grad)) == 0).all()


@pytest.mark.parametrize("loss_class", BOTH)
@pytest.mark.parametrize("batch", [False, True])
def test_all_ignored_batch_is_finite_with_zero_gradient(loss_class, batch):
    loss = loss_class(to_onehot_y=True, softmax=True, ignore_index=SENTINEL, batch=batch)
    value, grad = loss_and_grad(loss, torch.randn(2, 3, 4, 5), torch.full((2, 1, 4, 5), SENTINEL))
    assert torch.isfinite(value) and value.abs() < 1e-6 and (grad == 0).all()


@pytest.mark.parametrize("loss_class", BOTH)
def test_all_background_batch_is_finite(loss_class):
    logits = torch.randn(2, 3, 4, 5)
    logits[:, 0] += 30
    loss = loss_class(include_background=False, to_onehot_y=True, softmax=True)
    value, grad = loss_and_grad(loss, logits, torch.zeros(2, 1, 4, 5))
    assert torch.isfinite(value) and torch.isfinite(grad).all() and value < 1e-2


@pytest.mark.parametrize("loss_class", BOTH)
def test_non_finite_logits_give_non_finite_loss(loss_class):
    logits, target, _, _ = make_case((4, 5), "index", None)
    logits[0, 1, 2, 3] = float("inf")
    assert not torch.isfinite(loss_class(to_onehot_y=True, softmax=True)(logits, target))


@pytest.mark.parametrize("loss_class", BOTH)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": -0.1}, r"alpha must be in \[0.0, 1.0\], got -0.1"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"beta": float("nan")}, "beta must be in"),
        ({"beta": 2}, "beta must be in"),
        ({"reduction": "batchmean"}, "reduction must be one of"),
        ({"weight": [-1.0]}, "no less than 0"),
    ],
)
def test_bad_arguments_raise(loss_class, kwargs, message):
    with pytest.raises(LossInputError, match=message):
        loss_class(**kwargs)


@pytest.mark.parametrize("gamma", [0, -1.0, float("inf"), float("nan"), "4/3"])
def test_bad_gamma_raises(gamma):
    with pytest.raises(LossInputError, match="gamma must be"):
        FocalTverskyLoss(gamma=gamma)


@pytest.mark.parametrize("loss_class", BOTH)
@pytest.mark.parametrize(
    "kwargs, target, message",
    [
        ({}, torch.zeros(2, 3, 4, 6), "does not match input shape"),
        ({"to_onehot_y": True}, torch.zeros(2, 2, 4, 5), "target has 2 channels"),
        ({"to_onehot_y": True}, torch.full((2, 1, 4, 5), 3.0), r"integers in \[0, 3\)"),
        ({"weight": [1.0, 2.0]}, torch.zeros(2, 3, 4, 5), "weight has 2 values but the loss has 3 classes"),
    ],
)
def test_bad_forward_input_raises(loss_class, kwargs, target, message):
    with pytest.raises(LossInputError, match=message):
        loss_class(**kwargs)(torch.randn(2, 3, 4, 5), target)
