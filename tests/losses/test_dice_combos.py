"""Tests of ctlosses.dice_combos: DiceCELoss / DiceBCELoss / DiceFocalLoss against monai.losses 1.6.1 over
the argument grid, ignore_index against MONAI's DiceLoss / FocalLoss and torch's CrossEntropyLoss, gradcheck,
hypothesis properties, torch.compile, half precision and bad input."""

from __future__ import annotations

import itertools
import warnings

import monai.losses
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ctlosses import LOSSES, GeneralizedDiceLoss, LovaszHingeLoss, get_loss
from ctlosses.core import LossInputError
from ctlosses.dice_combos import DiceBCELoss, DiceCELoss, DiceFocalLoss

SENTINEL = 255
TOL = {"rtol": 1e-5, "atol": 1e-6}
WEIGHTED_DICE_CE = DiceCELoss(
    to_onehot_y=True, softmax=True, weight=[0.5, 1.0, 2.0], label_smoothing=0.1, ignore_index=SENTINEL
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """torch's CPU log_sigmoid opens an OpenMP region even for tiny tensors, which costs milliseconds per call on
    a busy 2-core machine; these tests use tiny tensors only (the setting is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_case(spatial, num_classes, kind, activation="softmax", ignore_index=None, seed=0, dtype=torch.float32):
    """Input ``(2, C, *spatial)`` (logits, or probabilities when ``activation`` is None: a Dice of signed
    logits is meaningless and ill-conditioned) and a target of ``kind`` "index", "onehot" or "soft"."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(2, num_classes, *spatial, generator=generator, dtype=dtype)
    if activation is None:
        logits = torch.rand(logits.shape, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_classes, (2, 1, *spatial), generator=generator)
    if ignore_index is not None:
        labels = labels.masked_fill(torch.rand(labels.shape, generator=generator) < 0.3, ignore_index)
    if kind == "index":
        return logits, labels if num_classes > 1 else labels.to(dtype)  # one channel: to_onehot_y is ignored
    if kind == "soft":
        return logits, torch.rand(logits.shape, generator=generator, dtype=dtype)
    if num_classes == 1:
        return logits, labels.to(dtype)
    onehot = F.one_hot(labels[:, 0].clamp_max(num_classes - 1), num_classes).movedim(-1, 1).to(dtype)
    return logits, onehot * (labels != SENTINEL)


def activation_kwargs(activation):
    return {"sigmoid": activation == "sigmoid", "softmax": activation == "softmax", "other_act": None}


def outcome(loss, logits, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return loss(logits, target)
        except (ValueError, AssertionError) as error:
            return type(error)


def compare(ours, theirs, logits, target):
    """None when both give the same value (or both refuse the input), else a description."""
    expected, actual = outcome(theirs, logits, target), outcome(ours, logits, target)
    if isinstance(expected, type) or isinstance(actual, type):
        return None if isinstance(expected, type) and isinstance(actual, type) else (expected, actual)
    if expected.shape == actual.shape and torch.allclose(expected, actual, **TOL):
        return None
    return expected, actual


GRID = list(
    itertools.product(
        [True, False],  # include_background
        ["sigmoid", "softmax", None],
        [False, True],  # batch
        [False, True],  # squared_pred / jaccard
        [None, "per-class", 2.0],  # weight
    )
)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["index", "onehot", "soft"])
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_dice_ce_equals_monai(num_classes, spatial, kind, reduction):
    mismatches = []
    for seed, (include_background, activation, batch, variant, weight) in enumerate(GRID):
        logits, target = make_case(spatial, num_classes, kind, activation, seed=seed)
        if weight == "per-class":  # DiceCE: one value per channel including background (CE / BCE pos_weight)
            weight = torch.linspace(0.5, 2.0, num_classes)
        elif weight == 2.0:
            weight = None if num_classes == 1 else torch.full((num_classes,), 2.0)  # MONAI needs a 1-D CE weight
        kwargs = dict(
            include_background=include_background,
            to_onehot_y=kind == "index",
            **activation_kwargs(activation),
            squared_pred=variant,
            jaccard=variant and batch,
            reduction=reduction,
            batch=batch,
            weight=weight,
            lambda_dice=0.7,
            lambda_ce=1.3,
            label_smoothing=0.1 if num_classes > 1 else 0.0,
        )
        difference = compare(DiceCELoss(**kwargs), monai.losses.DiceCELoss(**kwargs), logits, target)
        if difference is not None:
            mismatches.append((kwargs, difference))
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "onehot", "soft"])
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_dice_focal_equals_monai(num_classes, spatial, kind, reduction):
    mismatches = []
    for seed, (include_background, activation, batch, variant, weight) in enumerate(GRID):
        logits, target = make_case(spatial, num_classes, kind, activation, seed=seed)
        used = num_classes - (0 if include_background or num_classes == 1 else 1)
        kwargs = dict(
            include_background=include_background,
            to_onehot_y=kind == "index",
            **activation_kwargs(activation),
            squared_pred=variant,
            jaccard=variant and batch,
            reduction=reduction,
            batch=batch,
            gamma=1.5,
            weight=[0.5, 2.0, 1.5][:used] if weight == "per-class" else weight,
            lambda_dice=0.7,
            lambda_focal=1.3,
            alpha=0.3 if seed % 2 else None,
        )
        difference = compare(DiceFocalLoss(**kwargs), monai.losses.DiceFocalLoss(**kwargs), logits, target)
        if difference is not None:
            mismatches.append((kwargs, difference))
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("ignore_index", [SENTINEL, 0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_ce_ignore_index_equals_monai_dice_plus_torch_ce(ignore_index, reduction, include_background):
    """MONAI's DiceCE has no ignore_index: ours is MONAI's DiceLoss(ignore_index) + torch's CE(ignore_index)."""
    logits, labels = make_case((4, 5, 3), 3, "index", ignore_index=ignore_index, seed=7)
    weight = torch.tensor([0.5, 1.0, 2.0])
    ours = DiceCELoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        weight=weight,
        reduction=reduction,
        label_smoothing=0.05,
        lambda_dice=0.4,
        ignore_index=ignore_index,
    )
    dice = monai.losses.DiceLoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        reduction=reduction,
        weight=weight if include_background else weight[1:],
        ignore_index=ignore_index,
    )
    cross_entropy = torch.nn.CrossEntropyLoss(
        weight, reduction=reduction, label_smoothing=0.05, ignore_index=ignore_index
    )
    expected = 0.4 * dice(logits, labels) + cross_entropy(logits, labels[:, 0])
    torch.testing.assert_close(ours(logits, labels), expected, **TOL)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_dice_ce_ignore_index_dense_target_drops_voxels(num_classes):
    """For one-hot / single-channel targets the CE term is the CE of the voxels that count."""
    logits, target = make_case((6, 5), num_classes, "onehot", ignore_index=SENTINEL, seed=2)
    ours = DiceCELoss(sigmoid=num_classes == 1, softmax=num_classes > 1, ignore_index=SENTINEL, lambda_dice=0.0)
    if num_classes == 1:
        keep = target[:, 0] != SENTINEL
        expected = F.binary_cross_entropy_with_logits(logits[:, 0][keep], target[:, 0][keep])
    else:
        keep = target.sum(1) > 0  # MONAI's sentinel rule for one-hot targets: all-zero voxels are ignored
        expected = F.cross_entropy(logits.movedim(1, -1)[keep], target.movedim(1, -1)[keep])
    torch.testing.assert_close(ours(logits, target), expected, **TOL)


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dice_focal_ignore_index_equals_monai_terms(use_softmax, reduction):
    logits, labels = make_case((4, 5, 3), 3, "index", ignore_index=SENTINEL, seed=5)
    common = dict(
        include_background=False, to_onehot_y=True, reduction=reduction, weight=[2.0, 0.5], ignore_index=SENTINEL
    )
    ours = DiceFocalLoss(softmax=True, gamma=1.0, alpha=[0.3, 0.7], use_softmax=use_softmax, lambda_focal=2.0, **common)
    dice = monai.losses.DiceLoss(softmax=True, **common)
    focal = monai.losses.FocalLoss(gamma=1.0, alpha=[0.3, 0.7], use_softmax=use_softmax, **common)
    torch.testing.assert_close(ours(logits, labels), dice(logits, labels) + 2.0 * focal(logits, labels), **TOL)


def test_dice_ce_none_broadcasts_dice_over_voxel_ce():
    logits, labels = make_case((4, 5), 3, "index", seed=4)
    kwargs = dict(include_background=False, to_onehot_y=True, softmax=True)
    per_element = DiceCELoss(reduction="none", **kwargs)(logits, labels)
    assert per_element.shape == (2, 2, 4, 5)
    torch.testing.assert_close(per_element.mean(), DiceCELoss(**kwargs)(logits, labels), **TOL)
    single = DiceCELoss(sigmoid=True, reduction="none")(logits[:, :1], (labels == 1).float())
    assert single.shape == (2, 1, 4, 5)


def test_aliases_and_registry():
    assert DiceBCELoss is DiceCELoss
    assert LOSSES["dice_ce"] is DiceCELoss and LOSSES["dice_bce"] is DiceCELoss
    assert LOSSES["dice_focal"] is DiceFocalLoss
    loss = get_loss("dice_focal", to_onehot_y=True, softmax=True, gamma=1.0, lambda_focal=0.5)
    assert isinstance(loss, DiceFocalLoss) and loss.focal.gamma == 1.0 and loss.lambda_focal == 0.5


def test_label_smoothing_on_one_channel_warns():
    logits, target = make_case((4, 4), 1, "onehot", "sigmoid")
    with pytest.warns(UserWarning, match="label_smoothing"):
        DiceBCELoss(sigmoid=True, label_smoothing=0.1)(logits, target)


@pytest.mark.parametrize(
    "loss, kind, num_classes",
    [
        (WEIGHTED_DICE_CE, "index", 3),
        (DiceCELoss(softmax=True, batch=True, ignore_index=1), "soft", 3),
        (DiceBCELoss(sigmoid=True, weight=[3.0], ignore_index=SENTINEL, reduction="sum"), "onehot", 1),
        (DiceFocalLoss(to_onehot_y=True, softmax=True, use_softmax=True, gamma=0.5, ignore_index=SENTINEL), "index", 3),
        (DiceFocalLoss(sigmoid=True, include_background=False, alpha=0.25, reduction="none"), "soft", 3),
    ],
)
def test_gradcheck(loss, kind, num_classes):
    ignore_index = getattr(loss, "ignore_index", None) or getattr(getattr(loss, "focal", None), "ignore_index", None)
    logits, target = make_case((3, 4), num_classes, kind, ignore_index=ignore_index, dtype=torch.float64)
    logits = logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


@pytest.mark.parametrize(
    "loss, kind",
    [
        (WEIGHTED_DICE_CE, "index"),
        (DiceCELoss(softmax=True, ignore_index=SENTINEL), "onehot"),
        (DiceFocalLoss(to_onehot_y=True, softmax=True, alpha=0.25, ignore_index=SENTINEL, reduction="none"), "index"),
    ],
)
def test_compiles_without_graph_breaks(loss, kind):
    logits, target = make_case((4, 5), 3, kind, ignore_index=SENTINEL)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, target), loss(logits, target), **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [DiceCELoss, DiceFocalLoss])
def test_half_precision_equals_float32(cls, dtype):
    logits, labels = make_case((16, 16, 16), 4, "index", ignore_index=SENTINEL)
    low = (3 * logits).to(dtype)
    loss = cls(to_onehot_y=True, softmax=True, ignore_index=SENTINEL)
    value = loss(low, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, loss(low.float(), labels), rtol=1e-3, atol=0)


@pytest.mark.parametrize("cls", [DiceCELoss, DiceFocalLoss])
def test_autocast_does_not_lower_precision(cls):
    """Under autocast the Dice sums (bmm) would run in bfloat16; the loss keeps float32 instead."""
    logits, labels = make_case((8, 8, 8), 4, "index", ignore_index=SENTINEL)
    loss = cls(to_onehot_y=True, softmax=True, ignore_index=SENTINEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits, labels), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cls", [DiceCELoss, DiceFocalLoss])
def test_all_ignored_is_finite_with_zero_gradient(cls, reduction):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 1, 4, 4), SENTINEL)
    value = cls(to_onehot_y=True, softmax=True, ignore_index=SENTINEL, reduction=reduction)(logits, labels)
    value.sum().backward()
    assert torch.isfinite(value).all()
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (DiceCELoss, dict(lambda_dice=-1.0), "lambda_dice"),
        (DiceCELoss, dict(lambda_ce=-0.5), "lambda_ce"),
        (DiceCELoss, dict(label_smoothing=1.5), "label_smoothing"),
        (DiceCELoss, dict(reduction="avg"), "reduction"),
        (DiceFocalLoss, dict(lambda_focal=-1.0), "lambda_focal"),
        (DiceFocalLoss, dict(gamma=-2.0), "gamma"),
        (DiceFocalLoss, dict(alpha=2.0), "alpha"),
        (DiceFocalLoss, dict(sigmoid=True, softmax=True), "Incompatible"),
    ],
)
def test_bad_hyperparameters_fail_in_init(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize(
    "loss, target_shape, message",
    [
        (DiceCELoss(softmax=True, weight=[1.0, 2.0]), (2, 3, 4, 4), "weight has 2 values"),
        (DiceCELoss(softmax=True, include_background=False, weight=[1.0, 2.0]), (2, 3, 4, 4), "weight has"),
        (DiceFocalLoss(softmax=True, weight=[1.0, 2.0]), (2, 3, 4, 4), "weight has 2 values"),
        (DiceCELoss(softmax=True), (2, 3, 4), "does not match input shape"),
        (DiceFocalLoss(softmax=True), (2, 2, 4, 4), "channels"),
    ],
)
def test_bad_inputs_name_expected_and_got(loss, target_shape, message):
    with pytest.raises(LossInputError, match=message):
        loss(torch.randn(2, 3, 4, 4), torch.zeros(target_shape))


def test_out_of_range_labels_are_refused():
    labels = torch.randint(0, 3, (2, 1, 4, 4))
    labels[0, 0, 1, 1] = 3
    for loss in (DiceCELoss(to_onehot_y=True, softmax=True), DiceFocalLoss(to_onehot_y=True, softmax=True)):
        with pytest.raises(LossInputError, match=r"\[0, 3\)"):
            loss(torch.randn(2, 3, 4, 4), labels)


# ------------------------------------------------------------------ properties


@st.composite
def index_cases(draw):
    num_classes = draw(st.integers(2, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=3)))
    logits, labels = make_case(spatial, num_classes, "index", ignore_index=SENTINEL, seed=draw(st.integers(0, 2**16)))
    cls = draw(st.sampled_from([DiceCELoss, DiceFocalLoss]))
    return cls, logits, labels


@given(index_cases())
def test_ignored_voxels_change_nothing(case):
    cls, logits, labels = case
    loss = cls(to_onehot_y=True, softmax=True, ignore_index=SENTINEL)
    ignored = (labels == SENTINEL).expand_as(logits)
    moved = logits.masked_fill(ignored, 30.0).requires_grad_()
    torch.testing.assert_close(loss(moved, labels), loss(logits, labels), **TOL)
    loss(moved, labels).backward()
    assert torch.count_nonzero(moved.grad[ignored]) == 0


@given(index_cases(), st.sampled_from(["mean", "sum"]), st.booleans())
def test_batch_permutation_invariance(case, reduction, batch):
    cls, logits, labels = case
    loss = cls(to_onehot_y=True, softmax=True, ignore_index=SENTINEL, reduction=reduction, batch=batch)
    order = torch.tensor([1, 0])
    torch.testing.assert_close(loss(logits[order], labels[order]), loss(logits, labels), **TOL)


@given(index_cases())
def test_perfect_prediction_has_near_zero_loss(case):
    cls, _, labels = case
    num_classes = int(labels[labels != SENTINEL].max()) + 1 if (labels != SENTINEL).any() else 1
    labels = labels.masked_fill(labels == SENTINEL, 0)
    # +-30: the sigmoid focal term sees every channel as a binary problem, so the wrong classes need -30
    logits = 60.0 * F.one_hot(labels[:, 0], max(num_classes, 2)).movedim(-1, 1).float() - 30.0
    value = cls(to_onehot_y=True, softmax=True, include_background=True)(logits, labels)
    assert 0 <= float(value) < 1e-4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(weight=[0.5, 1.0, 2.0], ignore_index=SENTINEL, include_background=False),
        dict(ignore_index=1, batch=True, squared_pred=True, reduction="sum"),
        dict(weight=[2.0, 0.5, 1.0], jaccard=True, reduction="none", lambda_dice=0.3, lambda_ce=1.7),
        dict(ignore_index=SENTINEL, squared_pred=True, reduction="none", batch=True),
    ],
)
def test_dice_ce_shared_log_softmax_equals_separate_terms(kwargs):
    """Index targets with softmax take one log-softmax for both terms and one fused backward; value and gradient
    equal those of the Dice term and the CE term computed apart (each of which is checked against MONAI / torch)."""
    generator = torch.Generator().manual_seed(11)
    logits = 3 * torch.randn(2, 3, 5, 4, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 5, 4, 3), generator=generator)
    labels[0, 0, :2] = SENTINEL if kwargs.get("ignore_index") == SENTINEL else labels[0, 0, :2]
    loss = DiceCELoss(to_onehot_y=True, softmax=True, **kwargs)
    assert loss._shares_log_softmax(logits)
    fused_input, apart_input = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fused = loss(fused_input, labels)
    apart = loss.lambda_dice * loss.dice(apart_input, labels) + loss.lambda_ce * loss.cross_entropy(apart_input, labels)
    torch.testing.assert_close(fused, apart, rtol=1e-12, atol=1e-12)
    fused.sum().backward()
    apart.sum().backward()
    torch.testing.assert_close(fused_input.grad, apart_input.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (logits.clone().requires_grad_(),))


@pytest.mark.parametrize("cls", [LovaszHingeLoss, GeneralizedDiceLoss])
def test_cross_entropy_beside_refuses_reduction_none_and_negative_weight(cls):
    # the hinge and the generalised Dice ratio are per image, the cross-entropy per voxel: no common "none" shape
    with pytest.raises(LossInputError, match='reduction="none"'):
        cls(reduction="none", lambda_ce=1.0)
    with pytest.raises(LossInputError, match="lambda_ce"):
        cls(lambda_ce=-0.1)
    assert cls(reduction="none").lambda_ce == 0.0  # the loss alone keeps every reduction
