"""DiceLoss / JaccardLoss (IoULoss): differential tests against monai.losses.DiceLoss over the argument grid,
gradcheck, hypothesis properties, torch.compile, half precision and bad input."""

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

from ctlosses import DiceLoss, IoULoss, JaccardLoss
from ctlosses.core import LossInputError


def assert_same_as_monai(kwargs, logits, target, ours=DiceLoss, theirs=monai.losses.DiceLoss):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value, grad = loss_and_grad(ours(**kwargs), logits, target)
        expected_value, expected_grad = loss_and_grad(theirs(**kwargs), logits, target)
    assert value.shape == expected_value.shape, kwargs
    torch.testing.assert_close(value, expected_value, **TOL, msg=lambda m: f"{kwargs}: {m}")
    torch.testing.assert_close(grad, expected_grad, **TOL, msg=lambda m: f"{kwargs}: {m}")


@pytest.mark.parametrize("spatial", [(5, 4), (4, 3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("target_kind", ["index", "onehot", "soft"])
@pytest.mark.parametrize("ignore", [None, "class", "sentinel"])
def test_equals_monai_dice(spatial, activation, target_kind, ignore):
    logits, target, ignore_index, to_onehot_y = make_case(spatial, target_kind, ignore)
    grid = itertools.product([True, False], [False, True], ["mean", "sum", "none"])
    for include_background, batch, reduction in grid:
        weight = None if reduction == "mean" else [0.5, 2.0, 1.0][1 - include_background :]
        kwargs = dict(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            batch=batch,
            reduction=reduction,
            weight=weight,
            soft_label=target_kind == "soft",
            ignore_index=ignore_index,
            **ACTIVATIONS[activation],
        )
        assert_same_as_monai(kwargs, logits, target)


@pytest.mark.parametrize("target_kind", ["index", "soft"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("variant", ["squared_pred", "jaccard", "both", "smooth", "scalar_weight", "class_weight"])
def test_equals_monai_dice_variants(target_kind, activation, variant):
    logits, target, ignore_index, to_onehot_y = make_case((4, 3, 5), target_kind, "sentinel")
    extra = {
        "squared_pred": {"squared_pred": True},
        "jaccard": {"jaccard": True},
        "both": {"squared_pred": True, "jaccard": True, "soft_label": True},
        "smooth": {"smooth_nr": 0.0, "smooth_dr": 1e-3},
        "scalar_weight": {"weight": 3.0},
        "class_weight": {"weight": torch.tensor([0.5, 2.0, 1.0])},
    }[variant]
    for batch in (False, True):
        kwargs = dict(to_onehot_y=to_onehot_y, ignore_index=ignore_index, batch=batch, **ACTIVATIONS[activation])
        assert_same_as_monai({**kwargs, **extra}, logits, target)


@pytest.mark.parametrize("kwargs", [{"sigmoid": True}, {"softmax": True}, {"sigmoid": True, "to_onehot_y": True}])
def test_single_channel_equals_monai_and_warns(kwargs):
    """One channel: MONAI ignores softmax / to_onehot_y / include_background=False with a warning; so do we."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 6, 5, generator=generator)
    target = (torch.rand(2, 1, 6, 5, generator=generator) > 0.5).float()
    with pytest.warns(UserWarning, match="single channel"):
        DiceLoss(include_background=False, **kwargs)(logits, target)
    assert_same_as_monai({"include_background": False, "weight": [3.0, 4.0], **kwargs}, logits, target)


def test_jaccard_is_monai_dice_with_jaccard_and_iou_is_an_alias():
    logits, target, ignore_index, _ = make_case((6, 5), "index", "sentinel", num_classes=4)
    kwargs = dict(to_onehot_y=True, softmax=True, ignore_index=ignore_index, reduction="none")
    assert IoULoss is JaccardLoss
    monai_jaccard = lambda **kw: monai.losses.DiceLoss(jaccard=True, **kw)  # noqa: E731
    assert_same_as_monai(kwargs, logits, target, ours=JaccardLoss, theirs=monai_jaccard)
    assert JaccardLoss().jaccard and not DiceLoss().jaccard
    with pytest.raises(TypeError):
        JaccardLoss(jaccard=False)


def test_monai_dice_has_nan_in_float16_where_ours_matches_float32():
    """The issue's motivation: per-class sums over a 3D volume overflow float16 in MONAI (inf / inf)."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, 48, 48, 32, generator=generator)
    target = torch.zeros(1, 2, 48, 48, 32)
    target[:, 0] = 1  # 73728 background voxels: more than float16's largest value, 65504
    kwargs = dict(softmax=True)
    for dtype in (torch.float16, torch.bfloat16):
        half, half_target = logits.to(dtype), target.to(dtype)
        value = DiceLoss(**kwargs)(half, half_target)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value, DiceLoss(**kwargs)(half.float(), target), rtol=1e-3, atol=0)
    assert torch.isnan(monai.losses.DiceLoss(**kwargs)(logits.half(), target.half()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target_kind", ["index", "onehot"])
def test_half_precision_equals_float32(dtype, target_kind):
    logits, target, ignore_index, to_onehot_y = make_case((8, 7, 6), target_kind, "sentinel", num_classes=4)
    logits = logits.to(dtype)  # compare on the same (rounded) logits: the loss itself must not lose precision
    loss = DiceLoss(to_onehot_y=to_onehot_y, softmax=True, ignore_index=ignore_index, batch=True)
    value, grad = loss_and_grad(loss, logits, target.to(dtype))
    expected, expected_grad = loss_and_grad(loss, logits.float(), target)
    assert torch.isfinite(value) and grad.dtype == dtype
    torch.testing.assert_close(value, expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(grad.float(), expected_grad, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(to_onehot_y=True, softmax=True, ignore_index=SENTINEL),
        dict(to_onehot_y=True, sigmoid=True, squared_pred=True, ignore_index=1, batch=True),
        dict(to_onehot_y=True, soft_label=True, jaccard=True, include_background=False),
        dict(to_onehot_y=True, other_act=torch.tanh, weight=[1.0, 2.0, 3.0], reduction="none"),
        dict(softmax=True, soft_label=True, ignore_index=0),
    ],
)
def test_gradcheck_float64(kwargs):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 3), generator=generator)
    labels[0, 0, 0] = SENTINEL if kwargs.get("ignore_index") == SENTINEL else labels[0, 0, 0]
    target = labels if kwargs.get("to_onehot_y") else F.one_hot(labels[:, 0], 3).movedim(-1, 1).double()
    loss = DiceLoss(**kwargs)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


@pytest.mark.parametrize("loss_class, to_onehot_y", [(DiceLoss, True), (JaccardLoss, False)])
def test_compiles_without_graph_breaks(loss_class, to_onehot_y):
    logits, target, ignore_index, _ = make_case((4, 3, 5), "index" if to_onehot_y else "onehot", "sentinel")
    loss = loss_class(to_onehot_y=to_onehot_y, softmax=True, ignore_index=ignore_index, include_background=False)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value, grad = loss_and_grad(compiled, logits, target)
    expected, expected_grad = loss_and_grad(loss, logits, target)
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


# ---------------------------------------------------------------------------------------------------------
# properties

cases = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(2, 4),  # classes
    st.sampled_from([(4, 5), (3, 4, 2)]),
    st.integers(0, 2**16),  # seed
    st.booleans(),  # include_background
    st.booleans(),  # jaccard
)


@given(cases, st.sampled_from(["mean", "none"]))
def test_loss_in_unit_interval(case, reduction):
    batch, classes, spatial, seed, include_background, jaccard = case
    logits, labels, _ = random_case(batch, classes, spatial, seed)
    loss = DiceLoss(include_background, to_onehot_y=True, softmax=True, jaccard=jaccard, reduction=reduction)
    value = loss(logits, labels)
    assert ((value >= 0) & (value <= 1)).all()


@given(cases)
def test_zero_at_perfect_prediction(case):
    batch, classes, spatial, seed, include_background, jaccard = case
    _, labels, _ = random_case(batch, classes, spatial, seed)
    probs = F.one_hot(labels[:, 0], classes).movedim(-1, 1).double()
    loss = DiceLoss(include_background, to_onehot_y=True, jaccard=jaccard, reduction="none")
    assert loss(probs, labels).abs().max() < 1e-6


@given(cases, st.booleans())
def test_invariant_to_batch_permutation(case, batch_reduced):
    batch, classes, spatial, seed, include_background, jaccard = case
    logits, labels, _ = random_case(batch, classes, spatial, seed)
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    loss = DiceLoss(include_background, to_onehot_y=True, softmax=True, jaccard=jaccard, batch=batch_reduced)
    torch.testing.assert_close(loss(logits[order], labels[order]), loss(logits, labels), rtol=1e-12, atol=1e-12)


@given(cases, st.sampled_from([SENTINEL, -1, 1]), st.booleans())
def test_ignored_voxels_change_nothing(case, ignore_index, batch_reduced):
    """Changing the logits of ignored voxels changes neither the loss nor any gradient; theirs is zero."""
    batch, classes, spatial, seed, include_background, jaccard = case
    logits, labels, ignored = random_case(batch, classes, spatial, seed)
    labels = labels.masked_fill(ignored, ignore_index) if ignore_index != 1 else labels
    ignored = labels == ignore_index
    loss = DiceLoss(
        include_background, True, softmax=True, jaccard=jaccard, batch=batch_reduced, ignore_index=ignore_index
    )
    value, grad = loss_and_grad(loss, logits, labels)
    scrambled = torch.where(ignored, 50 * torch.randn_like(logits), logits)
    scrambled_value, scrambled_grad = loss_and_grad(loss, scrambled, labels)
    torch.testing.assert_close(scrambled_value, value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scrambled_grad, grad, rtol=1e-12, atol=1e-12)
    assert (grad.masked_select(ignored.expand_as(grad)) == 0).all()


# ---------------------------------------------------------------------------------------------------------
# degenerate batches and bad input


@pytest.mark.parametrize("to_onehot_y", [True, False])
def test_all_ignored_batch_is_finite_with_zero_gradient(to_onehot_y):
    logits = torch.randn(2, 3, 4, 5)
    target = torch.full((2, 1, 4, 5), SENTINEL) if to_onehot_y else torch.zeros(2, 3, 4, 5)
    for batch in (False, True):
        loss = DiceLoss(to_onehot_y=to_onehot_y, softmax=True, ignore_index=SENTINEL, batch=batch)
        value, grad = loss_and_grad(loss, logits, target)
        assert torch.isfinite(value) and value.abs() < 1e-6
        assert (grad == 0).all()


def test_all_background_batch_is_finite():
    logits = torch.randn(2, 3, 4, 5)
    logits[:, 0] += 30  # a confident, correct background prediction: nothing is left to learn
    target = torch.zeros(2, 1, 4, 5)
    loss = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)
    value, grad = loss_and_grad(loss, logits, target)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert value < 1e-3 and grad.abs().max() < 1e-3


def test_non_finite_logits_give_non_finite_loss():
    logits, target, _, _ = make_case((4, 5), "index", None)
    logits[0, 1, 2, 3] = float("nan")
    assert not torch.isfinite(DiceLoss(to_onehot_y=True, softmax=True)(logits, target))


@pytest.mark.parametrize(
    "kwargs, logits_shape, target, message",
    [
        ({}, (2, 3, 4, 5), torch.zeros(2, 3, 4, 6), "does not match input shape"),
        ({}, (2, 3, 4, 5), torch.zeros(2, 3, 4, 5, 1), "does not match input shape"),
        ({}, (2, 3, 4, 5), torch.zeros(3, 3, 4, 5), "does not match input shape"),
        ({"to_onehot_y": True}, (2, 3, 4, 5), torch.zeros(2, 2, 4, 5), "target has 2 channels"),
        ({"to_onehot_y": True}, (2, 3, 4, 5), torch.zeros(2, 3, 4, 5), "target has 3 channels"),
        ({}, (2, 3, 4, 5), torch.zeros(2, 1, 4, 5), "to_onehot_y=True"),
        ({}, (2, 3, 4, 5), torch.zeros(2, 2, 4, 5), "target has 2 channels"),
        ({"to_onehot_y": True}, (2, 3, 4, 5), torch.full((2, 1, 4, 5), 3), r"integers in \[0, 3\)"),
        ({"to_onehot_y": True}, (2, 3, 4, 5), torch.full((2, 1, 4, 5), -1), r"integers in \[0, 3\)"),
        ({"to_onehot_y": True}, (2, 3, 4, 5), torch.full((2, 1, 4, 5), 1.5), r"integers in \[0, 3\)"),
        ({"to_onehot_y": True, "ignore_index": 255}, (2, 3, 4, 5), torch.full((2, 1, 4, 5), 254), "ignore_index=255"),
        ({"include_background": False, "weight": [1, 2, 3]}, (2, 3, 4, 5), torch.zeros(2, 3, 4, 5), "weight has 3"),
        ({"weight": [1, 2]}, (2, 3, 4, 5), torch.zeros(2, 3, 4, 5), "weight has 2 values"),
        ({}, (2, 3), torch.zeros(2, 3), "at least 3 dims"),
    ],
)
def test_bad_forward_input_raises(kwargs, logits_shape, target, message):
    with pytest.raises(LossInputError, match=message) as error:
        DiceLoss(**kwargs)(torch.randn(logits_shape), target)
    assert isinstance(error.value, ValueError) and isinstance(error.value, AssertionError)


def test_integer_input_is_rejected():
    with pytest.raises(LossInputError, match="floating point"):
        DiceLoss()(torch.ones(2, 3, 4, 5, dtype=torch.long), torch.zeros(2, 3, 4, 5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "average"}, "reduction must be one of"),
        ({"weight": [1.0, -1.0]}, "no less than 0"),
        ({"weight": [[1.0, 2.0]]}, "1-D"),
        ({"sigmoid": True, "softmax": True}, "Incompatible values"),
        ({"softmax": True, "other_act": torch.tanh}, "Incompatible values"),
        ({"smooth_dr": -1.0}, "smooth_dr"),
        ({"ignore_index": 1.5}, "ignore_index"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiceLoss(**kwargs)


def test_non_callable_other_act_is_a_type_error_as_in_monai():
    with pytest.raises(TypeError, match="other_act"):
        DiceLoss(other_act="tanh")


@pytest.mark.parametrize("target_kind, ignore", [("index", "sentinel"), ("onehot", "class"), ("index", None)])
def test_bfloat16_autocast_gives_the_float32_loss(target_kind, ignore):
    """Under AMP the sums (bmm) must not drop to bfloat16: the loss is computed in float32 regardless."""
    logits, target, ignore_index, to_onehot_y = make_case((8, 7, 6), target_kind, ignore, num_classes=4)
    loss = DiceLoss(to_onehot_y=to_onehot_y, softmax=True, ignore_index=ignore_index, squared_pred=ignore is None)
    expected, expected_grad = loss_and_grad(loss, logits, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, grad = loss_and_grad(loss, logits, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
