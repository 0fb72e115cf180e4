"""Tests of ctlosses.focal: differential against monai.losses.FocalLoss 1.6.1 over the argument grid,
hand-computed values from Lin et al. 2017, gradcheck, hypothesis properties, torch.compile, half precision and
bad input."""

from __future__ import annotations

import itertools
import math
import warnings

import monai.losses
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ctlosses import LOSSES, get_loss
from ctlosses.core import LossInputError
from ctlosses.focal import FocalLoss

SENTINEL = 255
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """torch's CPU log_sigmoid opens an OpenMP region even for tiny tensors, which costs milliseconds per call on
    a busy 2-core machine; these tests use tiny tensors only (the setting is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_case(spatial, num_classes, kind, ignore_index=None, seed=0, dtype=torch.float32):
    """Logits ``(2, C, *spatial)`` and a target of ``kind`` "index" (``B1...``), "onehot" or "soft" (``BC...``).

    With ``ignore_index`` a few voxels get that label (for one-hot: sentinel -> all-zero voxels, a class index
    -> that class' voxels, which one-hot encoding already produces)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2, num_classes, *spatial, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_classes, (2, 1, *spatial), generator=generator)
    if ignore_index is not None:
        labels = labels.masked_fill(torch.rand(labels.shape, generator=generator) < 0.3, ignore_index)
    if kind == "index":
        return logits, labels
    if kind == "soft":
        return logits, torch.rand(logits.shape, generator=generator, dtype=dtype)
    onehot = F.one_hot(labels[:, 0].clamp_max(num_classes - 1), num_classes).movedim(-1, 1).to(dtype)
    return logits, onehot * (labels != SENTINEL) if num_classes > 1 else labels.to(dtype)


def outcome(loss, logits, target):
    """The loss value, or the exception class it raised (so both libraries can be compared on every case)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return loss(logits, target)
        except (ValueError, AssertionError) as error:
            return type(error)


GRID = list(
    itertools.product(
        [True, False],  # include_background
        ["mean", "sum", "none"],
        [None, 0.25, "per-class"],  # alpha
        [None, 2.0, "per-class"],  # weight
        [None, 0, SENTINEL],  # ignore_index
    )
)


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("kind", ["index", "onehot", "soft"])
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_equals_monai(num_classes, spatial, kind, use_softmax):
    mismatches = []
    for seed, (include_background, reduction, alpha, weight, ignore_index) in enumerate(GRID):
        if kind == "soft" and ignore_index == 0:
            continue  # MONAI's soft mask for an in-range ignore_index is covered by test_soft_ignore_mask_equals_monai
        logits, target = make_case(spatial, num_classes, kind, ignore_index, seed=seed)
        used = num_classes - (0 if include_background or num_classes == 1 else 1)
        kwargs = dict(
            include_background=include_background,
            to_onehot_y=kind == "index",
            gamma=1.5,
            alpha=[0.1, 0.6, 0.9][:used] if alpha == "per-class" else alpha,
            weight=[0.5, 2.0, 1.5][:used] if weight == "per-class" else weight,
            reduction=reduction,
            use_softmax=use_softmax,
            ignore_index=ignore_index,
        )
        expected = outcome(monai.losses.FocalLoss(**kwargs), logits, target)
        actual = outcome(FocalLoss(**kwargs), logits, target)
        if isinstance(expected, type) or isinstance(actual, type):
            same = expected is actual or (isinstance(expected, type) and isinstance(actual, type))
        else:
            same = expected.shape == actual.shape and torch.allclose(expected, actual, **TOL)
        if not same:
            mismatches.append((kwargs, expected, actual))
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("use_softmax", [False, True])
def test_soft_ignore_mask_equals_monai(use_softmax):
    # soft one-hot target and an in-range ignore_index: MONAI scales logits, target and loss by 1 - t[:, idx]
    logits, target = make_case((4, 5), 3, "soft", seed=3)
    for reduction in ("mean", "sum", "none"):
        kwargs = dict(ignore_index=1, reduction=reduction, use_softmax=use_softmax, alpha=0.3)
        torch.testing.assert_close(
            FocalLoss(**kwargs)(logits, target), monai.losses.FocalLoss(**kwargs)(logits, target), **TOL
        )


def test_gamma_zero_is_cross_entropy():
    logits, labels = make_case((4, 5, 3), 4, "index", seed=1)
    onehot = F.one_hot(labels[:, 0], 4).movedim(-1, 1).float()
    sigmoid = FocalLoss(to_onehot_y=True, gamma=0.0, reduction="none")(logits, labels)
    torch.testing.assert_close(sigmoid, F.binary_cross_entropy_with_logits(logits, onehot, reduction="none"), **TOL)
    softmax = FocalLoss(to_onehot_y=True, gamma=0.0, use_softmax=True, reduction="sum")(logits, labels)
    # "sum" sums the per-image spatial means over images and classes
    expected = F.cross_entropy(logits, labels[:, 0], reduction="none").flatten(1).mean(1).sum()
    torch.testing.assert_close(softmax, expected, **TOL)


def test_hand_computed_per_pixel_values():
    """Lin et al. 2017 eq. 5, FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), on two voxels, each channel binary."""
    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0]]])  # (B=1, C=2, N=2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    gamma, alpha = 2.0, 0.25

    def focal(x, t):
        p = 1 / (1 + math.exp(-x))
        p_t, alpha_t = (p, alpha) if t == 1 else (1 - p, 1 - alpha)
        return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)

    expected = torch.tensor([[[focal(2.0, 1), focal(-1.0, 0)], [focal(0.5, 0), focal(3.0, 1)]]])
    actual = FocalLoss(gamma=gamma, alpha=alpha, reduction="none")(logits, target)
    torch.testing.assert_close(actual, expected, **TOL)
    # the same from class indices (voxel 0 is class 0, voxel 1 class 1) and softmax: -(1 - p_y)^gamma log p_y
    labels = torch.tensor([[[0, 1]]])
    p = torch.softmax(logits, 1)
    soft = [-((1 - p[0, 0, 0]) ** gamma) * torch.log(p[0, 0, 0]), -((1 - p[0, 1, 1]) ** gamma) * torch.log(p[0, 1, 1])]
    actual = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma, reduction="mean")(logits, labels)
    torch.testing.assert_close(actual, (soft[0] + soft[1]) / 4, **TOL)  # mean over B * C * N = 4 elements


def test_index_target_builds_no_one_hot(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("one_hot called")

    monkeypatch.setattr(F, "one_hot", refuse)
    monkeypatch.setattr(torch.Tensor, "scatter", refuse)  # the out-of-place one-hot builder
    logits, labels = make_case((4, 4, 4), 5, "index", SENTINEL)
    for use_softmax in (False, True):
        FocalLoss(to_onehot_y=True, use_softmax=use_softmax, ignore_index=SENTINEL)(logits, labels)


@pytest.mark.parametrize(
    "kwargs, kind",
    [
        (dict(to_onehot_y=True, alpha=0.25), "index"),
        (dict(to_onehot_y=True, use_softmax=True, alpha=[0.2, 0.3, 0.5], ignore_index=SENTINEL), "index"),
        (dict(include_background=False, to_onehot_y=True, gamma=0.5, ignore_index=SENTINEL, reduction="sum"), "index"),
        (dict(use_softmax=True, gamma=0.5, weight=[1.0, 2.0, 0.5]), "soft"),
        (dict(alpha=[0.2, 0.3, 0.5], ignore_index=1, reduction="none"), "onehot"),
    ],
)
def test_gradcheck(kwargs, kind):
    logits, target = make_case((3, 4), 3, kind, kwargs.get("ignore_index"), dtype=torch.float64)
    logits = (logits / 3).requires_grad_()
    loss = FocalLoss(**kwargs)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


@pytest.mark.parametrize(
    "kwargs, kind",
    [
        (dict(to_onehot_y=True, alpha=[0.2, 0.3, 0.5], ignore_index=SENTINEL), "index"),
        (dict(to_onehot_y=True, use_softmax=True, alpha=0.25, reduction="sum"), "index"),
        (dict(include_background=False, use_softmax=True, ignore_index=SENTINEL, reduction="none"), "onehot"),
        (dict(weight=2.0), "soft"),
    ],
)
def test_compiles_without_graph_breaks(kwargs, kind):
    logits, target = make_case((4, 5), 3, kind, kwargs.get("ignore_index"))
    loss = FocalLoss(**kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, target), loss(logits, target), **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_softmax", [False, True])
def test_half_precision_equals_float32(dtype, use_softmax):
    logits, labels = make_case((8, 8, 8), 4, "index", SENTINEL)
    low = (4 * logits).to(dtype)  # large logits: the half-precision cross-entropy would saturate
    loss = FocalLoss(to_onehot_y=True, use_softmax=use_softmax, ignore_index=SENTINEL)
    value = loss(low, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, loss(low.float(), labels), rtol=1e-3, atol=0)


@pytest.mark.parametrize("use_softmax", [False, True])
def test_autocast_does_not_lower_precision(use_softmax):
    """Under autocast the masked sums (einsum) would run in bfloat16; the loss keeps float32 instead."""
    logits, labels = make_case((8, 8, 8), 4, "index", SENTINEL)
    loss = FocalLoss(to_onehot_y=True, use_softmax=use_softmax, ignore_index=SENTINEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits, labels), rtol=0, atol=0)


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_finite_with_zero_gradient(use_softmax, reduction):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 1, 4, 4), SENTINEL)
    loss = FocalLoss(to_onehot_y=True, use_softmax=use_softmax, ignore_index=SENTINEL, reduction=reduction)
    value = loss(logits, labels)
    value.sum().backward()
    assert torch.isfinite(value).all() and float(value.detach().sum()) == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_non_finite_logits_give_non_finite_loss():
    logits, labels = make_case((4, 4), 3, "index")
    logits[0, 1, 2, 2] = float("nan")
    for use_softmax in (False, True):
        assert not torch.isfinite(FocalLoss(to_onehot_y=True, use_softmax=use_softmax)(logits, labels))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gamma=-1.0), "gamma"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=[0.5, -0.1]), "alpha"),
        (dict(reduction="avg"), "reduction"),
        (dict(weight=[1.0, -2.0]), "weight"),
    ],
)
def test_bad_hyperparameters_fail_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FocalLoss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, target_shape, message",
    [
        (dict(alpha=[0.2, 0.3]), (2, 3, 4, 4), "alpha has 2 values"),
        (dict(weight=[1.0, 2.0]), (2, 3, 4, 4), "weight has 2 values"),
        (dict(include_background=False, weight=[1.0, 2.0, 3.0]), (2, 3, 4, 4), "weight has 3 values"),
        (dict(), (2, 3, 4, 5), "does not match input shape"),
        (dict(), (2, 1, 4, 4), "to_onehot_y=True"),
        (dict(to_onehot_y=True), (2, 2, 4, 4), "1 channel"),
    ],
)
def test_bad_inputs_name_expected_and_got(kwargs, target_shape, message):
    target = torch.zeros(target_shape)
    with pytest.raises(LossInputError, match=message):
        FocalLoss(**kwargs)(torch.randn(2, 3, 4, 4), target)


def test_out_of_range_labels_are_refused():
    labels = torch.randint(0, 3, (2, 1, 4, 4))
    labels[1, 0, 2, 2] = 7
    with pytest.raises(LossInputError, match=r"\[0, 3\)"):
        FocalLoss(to_onehot_y=True)(torch.randn(2, 3, 4, 4), labels)
    with pytest.raises(LossInputError, match="single channel|1 channel"):
        FocalLoss(weight=[2.0])(torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))


def test_registry():
    assert LOSSES["focal"] is FocalLoss
    loss = get_loss("focal", gamma=3.0, use_softmax=True, to_onehot_y=True)
    assert isinstance(loss, FocalLoss) and loss.gamma == 3.0


# ------------------------------------------------------------------ properties


@st.composite
def index_cases(draw):
    num_classes = draw(st.integers(2, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=3)))
    seed = draw(st.integers(0, 2**16))
    logits, labels = make_case(spatial, num_classes, "index", SENTINEL, seed=seed)
    return logits, labels, draw(st.floats(0.0, 4.0)), draw(st.booleans())


@given(index_cases())
def test_focal_is_at_most_cross_entropy(case):
    """(1 - p_t)^gamma <= 1, so each element is between 0 and its gamma = 0 (cross-entropy) value."""
    logits, labels, gamma, use_softmax = case
    common = dict(to_onehot_y=True, use_softmax=use_softmax, ignore_index=SENTINEL, reduction="none")
    focal = FocalLoss(gamma=gamma, **common)(logits, labels)
    cross_entropy = FocalLoss(gamma=0.0, **common)(logits, labels)
    assert (focal >= 0).all() and (focal <= cross_entropy + 1e-6).all()


@given(index_cases())
def test_ignored_voxels_change_nothing(case):
    logits, labels, gamma, use_softmax = case
    loss = FocalLoss(to_onehot_y=True, gamma=gamma, use_softmax=use_softmax, ignore_index=SENTINEL)
    ignored = (labels == SENTINEL).expand_as(logits)
    moved = logits.masked_fill(ignored, 50.0).requires_grad_()
    torch.testing.assert_close(loss(moved, labels), loss(logits, labels), **TOL)
    loss(moved, labels).backward()
    assert torch.count_nonzero(moved.grad[ignored]) == 0


@given(index_cases(), st.sampled_from(["mean", "sum"]))
def test_batch_permutation_invariance(case, reduction):
    logits, labels, gamma, use_softmax = case
    loss = FocalLoss(to_onehot_y=True, gamma=gamma, use_softmax=use_softmax, ignore_index=SENTINEL, reduction=reduction)
    order = torch.tensor([1, 0])
    torch.testing.assert_close(loss(logits[order], labels[order]), loss(logits, labels), **TOL)
