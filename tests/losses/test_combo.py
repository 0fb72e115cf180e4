"""Tests of ctlosses.combo: hand-computed values from Taghanaki et al. 2019 (eq. 3) on tiny tensors, a plain
dense float64 reference over the argument grid, MONAI anchors (alpha = 0 is DiceLoss, alpha = 1 a BCE), numerical
stability for huge logits, gradcheck, hypothesis properties, torch.compile, half precision and bad input."""

from __future__ import annotations

import itertools
import math

import monai.losses
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ctlosses import LOSSES, get_loss
from ctlosses.combo import ComboLoss, log1m_softmax
from ctlosses.core import LossInputError

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


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def paper_combo(probs, targets, alpha, beta, smooth):
    """Taghanaki et al. 2019 eq. 3 for one class, literally: alpha * wCE - (1 - alpha) * Dice (with add-one
    smoothing S on numerator and denominator)."""
    n = len(probs)
    wce = -sum(beta * t * math.log(p) + (1 - beta) * (1 - t) * math.log(1 - p) for p, t in zip(probs, targets)) / n
    dice = (2 * sum(p * t for p, t in zip(probs, targets)) + smooth) / (sum(probs) + sum(targets) + smooth)
    return alpha * wce - (1 - alpha) * dice


def test_hand_computed_binary_value():
    """One image, one sigmoid channel, four voxels: ours is the paper's value plus (1 - alpha)."""
    logits, targets = [2.0, -1.0, 0.5, -3.0], [1.0, 0.0, 0.0, 1.0]
    alpha, beta = 0.6, 0.7
    expected = paper_combo([sigmoid(x) for x in logits], targets, alpha, beta, smooth=1.0) + (1 - alpha)
    loss = ComboLoss(sigmoid=True, alpha=alpha, beta=beta, smooth_nr=1.0, smooth_dr=1.0)
    actual = loss(torch.tensor(logits).view(1, 1, 2, 2), torch.tensor(targets).view(1, 1, 2, 2))
    torch.testing.assert_close(actual, torch.tensor(expected), **TOL)
    # by hand: wCE = (0.7*0.12693 + 0.3*0.31326 + 0.3*0.97408 + 0.7*3.04859) / 4, Dice = 2.85644 / 4.81954
    assert abs(float(actual) - (0.6 * 0.652266 + 0.4 * (1 - 0.592670))) < 1e-5


def test_hand_computed_multiclass_value():
    """Softmax over three classes, each one-vs-rest: the class mean of alpha wCE_c + (1 - alpha)(1 - Dice_c)."""
    logits = [[1.0, 0.2, -0.5], [0.0, 2.0, 0.3], [-1.0, 0.5, 1.5]]  # [voxel][class]
    labels = [0, 1, 1]
    alpha, beta = 0.3, 0.8
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    per_class = []
    for c in range(3):
        p = [row[c] for row in probs]
        t = [1.0 if label == c else 0.0 for label in labels]
        per_class.append(paper_combo(p, t, alpha, beta, smooth=1e-5) + (1 - alpha))
    x = torch.tensor(logits).t().reshape(1, 3, 3, 1)
    y = torch.tensor(labels).reshape(1, 1, 3, 1)
    loss = ComboLoss(to_onehot_y=True, softmax=True, alpha=alpha, beta=beta, reduction="none")
    torch.testing.assert_close(loss(x, y), torch.tensor(per_class).view(1, 3, 1, 1), **TOL)
    without_background = ComboLoss(include_background=False, to_onehot_y=True, softmax=True, alpha=alpha, beta=beta)
    torch.testing.assert_close(without_background(x, y), torch.tensor(sum(per_class[1:]) / 2), **TOL)


def test_beta_above_half_penalises_false_negatives_more():
    """A missed foreground voxel (t = 1, logit -2) against a false alarm (t = 0, logit +2), cross-entropy only."""
    for beta in (0.6, 0.8, 0.95):
        loss = ComboLoss(sigmoid=True, alpha=1.0, beta=beta)
        false_negative = loss(torch.tensor([[[-2.0]]]), torch.tensor([[[1.0]]]))
        false_positive = loss(torch.tensor([[[2.0]]]), torch.tensor([[[0.0]]]))
        assert false_negative > false_positive
        torch.testing.assert_close(false_negative / false_positive, torch.tensor(beta / (1 - beta)))


def reference(probs, onehot, valid, alpha, beta, include_background, batch, weight, reduction, smooth=1e-5):
    """Plain dense float64 Combo: probabilities, one-hot target and a (B, 1, ...) valid mask, formulas as written."""
    probs, onehot, valid = probs.double(), onehot.double(), valid.double()
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    axes = [0, *range(2, probs.ndim)] if batch else list(range(2, probs.ndim))
    terms = beta * onehot * torch.log(probs) + (1 - beta) * (1 - onehot) * torch.log(1 - probs)
    wce = -(terms * valid).sum(axes) / valid.expand_as(probs[:, :1]).sum(axes)
    tp = (probs * onehot * valid).sum(axes)
    dice = 1 - (2 * tp + smooth) / ((probs * valid).sum(axes) + (onehot * valid).sum(axes) + smooth)
    per_class = alpha * wce + (1 - alpha) * dice
    if weight is not None and per_class.shape[-1] > 1:
        per_class = per_class * torch.tensor(weight, dtype=per_class.dtype)
    return {"mean": per_class.mean(), "sum": per_class.sum(), "none": per_class}[reduction]


GRID = list(
    itertools.product([True, False], [False, True], ["mean", "sum", "none"], [None, SENTINEL, 1], [False, True])
)  # include_background, batch, reduction, ignore_index, weighted


@pytest.mark.parametrize("activation", ["sigmoid", "softmax", None])
@pytest.mark.parametrize("kind", ["index", "onehot"])
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)], ids=["2d", "3d"])
def test_equals_dense_reference(spatial, kind, activation):
    mismatches = []
    for seed, (include_background, batch, reduction, ignore_index, weighted) in enumerate(GRID):
        generator = torch.Generator().manual_seed(seed)
        logits = 2 * torch.randn(2, 3, *spatial, generator=generator)
        labels = torch.randint(0, 3, (2, 1, *spatial), generator=generator)
        if ignore_index is not None:
            labels = labels.masked_fill(torch.rand(labels.shape, generator=generator) < 0.3, ignore_index)
        onehot = F.one_hot(labels[:, 0].clamp_max(2), 3).movedim(-1, 1).float() * (labels != SENTINEL)
        valid = torch.ones_like(labels) if ignore_index is None else labels != ignore_index
        if activation is None:
            logits = torch.rand(logits.shape, generator=generator) * 0.98 + 0.01  # probabilities
        activate = {"sigmoid": torch.sigmoid, "softmax": lambda x: torch.softmax(x, 1), None: lambda x: x}
        probs = activate[activation](logits)
        weight = [0.5, 2.0, 1.5][(0 if include_background else 1) :] if weighted else None
        kwargs = dict(
            include_background=include_background,
            to_onehot_y=kind == "index",
            sigmoid=activation == "sigmoid",
            softmax=activation == "softmax",
            alpha=0.3,
            beta=0.8,
            reduction=reduction,
            batch=batch,
            weight=weight,
            ignore_index=ignore_index,
        )
        actual = ComboLoss(**kwargs)(logits, labels if kind == "index" else onehot)
        expected = reference(probs, onehot, valid, 0.3, 0.8, include_background, batch, weight, reduction)
        if not torch.allclose(actual.double(), expected.reshape(actual.shape), **TOL):
            mismatches.append((kwargs, actual, expected))
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize(
    "kwargs", [dict(to_onehot_y=True, softmax=True), dict(sigmoid=True, batch=True, weight=[1.0, 2.0, 3.0])]
)
def test_alpha_zero_is_monai_dice(kwargs):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, 3, generator=generator)
    labels = torch.randint(0, 3, (2, 1, 4, 5, 3), generator=generator)
    target = labels if kwargs.get("to_onehot_y") else F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    for reduction in ("mean", "sum", "none"):
        ours = ComboLoss(alpha=0.0, reduction=reduction, **kwargs)(logits, target)
        torch.testing.assert_close(ours, monai.losses.DiceLoss(reduction=reduction, **kwargs)(logits, target), **TOL)


def test_alpha_one_beta_half_is_half_bce():
    generator = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(2, 4, 6, 5, generator=generator)
    target = torch.rand(2, 4, 6, 5, generator=generator)
    ours = ComboLoss(sigmoid=True, alpha=1.0, beta=0.5)(logits, target)
    torch.testing.assert_close(ours, 0.5 * F.binary_cross_entropy_with_logits(logits, target), **TOL)


def test_log1m_softmax_is_accurate_and_finite():
    logits = torch.tensor([[0.3, -1.2, 2.0], [40.0, 0.0, -3.0], [1e4, -1e4, 0.0], [-1e30, 1e30, 5.0]]).t().unsqueeze(0)
    actual = log1m_softmax(logits.log_softmax(1))
    wide = logits.double()
    # log(1 - p_c) = logsumexp over the other classes - logsumexp over all, in float64
    others = torch.stack([wide[:, [j for j in range(3) if j != c]].logsumexp(1) for c in range(3)], 1)
    expected = others - wide.logsumexp(1, keepdim=True)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_finite_for_huge_logits(activation):
    """The seed post's log(p + 1e-9) saturates in float32; log-sigmoid / log-softmax stay finite, gradient too."""
    for scale in (50.0, 1e4, 1e30):
        logits = scale * torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0]])
        logits = logits.t().reshape(1, 2, 3, 1).requires_grad_()
        labels = torch.tensor([0, 0, 1]).reshape(1, 1, 3, 1)  # two confidently wrong voxels
        loss = ComboLoss(to_onehot_y=True, **{activation: True})
        value = loss(logits, labels)
        value.backward()
        assert torch.isfinite(value) and value > 0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_fused_index_path_equals_plain_path(activation):
    """Index targets go through the fused path with its hand-written gradient; it gives the one-hot path's value
    and gradient (the one-hot target takes the plain autograd formulas)."""
    generator = torch.Generator().manual_seed(6)
    logits = 4 * torch.randn(2, 3, 16, 16, 10, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 16, 16, 10), generator=generator).masked_fill(
        torch.rand(2, 1, 16, 16, 10, generator=generator) < 0.2, SENTINEL
    )
    onehot = F.one_hot(labels[:, 0].clamp_max(2), 3).movedim(-1, 1).double() * (labels != SENTINEL)
    kwargs = dict(ignore_index=SENTINEL, beta=0.7, include_background=False, **{activation: True})
    fused_input, plain_input = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fused = ComboLoss(to_onehot_y=True, **kwargs)(fused_input, labels)
    plain = ComboLoss(**kwargs)(plain_input, onehot)
    fused.backward()
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_input.grad, plain_input.grad, rtol=1e-10, atol=1e-12)


def test_non_finite_logits_give_non_finite_loss():
    logits = torch.randn(1, 3, 4, 4)
    logits[0, 0, 1, 1] = float("inf")
    labels = torch.randint(0, 3, (1, 1, 4, 4))
    for activation in ("sigmoid", "softmax"):
        assert not torch.isfinite(ComboLoss(to_onehot_y=True, **{activation: True})(logits, labels))


def test_index_target_builds_no_one_hot(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("one_hot called")

    monkeypatch.setattr(F, "one_hot", refuse)
    logits = torch.randn(2, 5, 4, 4, 4)
    labels = torch.randint(0, 5, (2, 1, 4, 4, 4))
    ComboLoss(to_onehot_y=True, softmax=True, ignore_index=SENTINEL)(logits, labels)


@pytest.mark.parametrize(
    "kwargs, kind",
    [
        (dict(to_onehot_y=True, softmax=True, ignore_index=SENTINEL, beta=0.7), "index"),
        (dict(sigmoid=True, include_background=False, batch=True, reduction="none", weight=[2.0, 0.5]), "soft"),
        (dict(softmax=True, ignore_index=1, alpha=0.8), "onehot"),
        (dict(alpha=0.4, reduction="sum"), "probabilities"),
    ],
)
def test_gradcheck(kwargs, kind):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 3, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 3, 4), generator=generator)
    labels[0, 0, 0] = SENTINEL
    target = {
        "index": labels,
        "soft": torch.rand(logits.shape, generator=generator, dtype=torch.float64),
        "onehot": F.one_hot(labels[:, 0].clamp_max(2), 3).movedim(-1, 1).double(),
        "probabilities": F.one_hot(labels[:, 0].clamp_max(2), 3).movedim(-1, 1).double(),
    }[kind]
    if kind == "probabilities":
        logits = torch.rand(logits.shape, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    loss = ComboLoss(**kwargs)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits.requires_grad_(),))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(to_onehot_y=True, softmax=True, ignore_index=SENTINEL, weight=[1.0, 2.0, 3.0]),
        dict(to_onehot_y=True, sigmoid=True, batch=True, reduction="none", ignore_index=SENTINEL),
    ],
)
def test_compiles_without_graph_breaks(kwargs):
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 1, 4, 5))
    labels[1, 0, 0] = SENTINEL
    loss = ComboLoss(**kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, labels), loss(logits, labels), **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_half_precision_equals_float32(dtype, activation):
    logits = (8 * torch.randn(2, 4, 16, 16, 16, generator=torch.Generator().manual_seed(4))).to(dtype)
    labels = torch.randint(0, 4, (2, 1, 16, 16, 16), generator=torch.Generator().manual_seed(5))
    loss = ComboLoss(to_onehot_y=True, **{activation: True})
    value = loss(logits, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, loss(logits.float(), labels), rtol=1e-3, atol=0)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_autocast_does_not_lower_precision(activation):
    """Under autocast the masked sums (einsum) would run in bfloat16, in forward and in the chunked backward."""
    logits = torch.randn(2, 4, 8, 8, 8)
    labels = torch.randint(0, 4, (2, 1, 8, 8, 8)).masked_fill(torch.rand(2, 1, 8, 8, 8) < 0.2, SENTINEL)
    loss = ComboLoss(to_onehot_y=True, ignore_index=SENTINEL, **{activation: True})
    expected_input, autocast_input = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    expected = loss(expected_input, labels)
    expected.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(autocast_input, labels)
        value.backward()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    torch.testing.assert_close(autocast_input.grad, expected_input.grad, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_finite_with_zero_gradient(reduction, batch):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 1, 4, 4), SENTINEL)
    loss = ComboLoss(to_onehot_y=True, softmax=True, ignore_index=SENTINEL, reduction=reduction, batch=batch)
    value = loss(logits, labels)
    value.sum().backward()
    assert torch.isfinite(value).all()
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=1.5), "alpha"),
        (dict(beta=-0.1), "beta"),
        (dict(sigmoid=True, softmax=True), "Incompatible"),
        (dict(reduction="batchmean"), "reduction"),
        (dict(weight=[-1.0, 1.0]), "weight"),
        (dict(smooth_dr=-1.0), "smooth_dr"),
    ],
)
def test_bad_hyperparameters_fail_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ComboLoss(**kwargs)


def test_bad_inputs_name_expected_and_got():
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(LossInputError, match="weight has 2 values"):
        ComboLoss(softmax=True, weight=[1.0, 2.0])(logits, torch.zeros(2, 3, 4, 4))
    with pytest.raises(LossInputError, match="does not match input shape"):
        ComboLoss(softmax=True)(logits, torch.zeros(2, 3, 4, 5))
    labels = torch.randint(0, 3, (2, 1, 4, 4))
    labels[0, 0, 0, 0] = -1
    with pytest.raises(LossInputError, match=r"\[0, 3\)"):
        ComboLoss(to_onehot_y=True, softmax=True)(logits, labels)


def test_registry():
    assert LOSSES["combo"] is ComboLoss
    loss = get_loss("combo", softmax=True, to_onehot_y=True, alpha=0.2, beta=0.9)
    assert isinstance(loss, ComboLoss) and (loss.alpha, loss.beta) == (0.2, 0.9)


# ------------------------------------------------------------------ properties


@st.composite
def cases(draw):
    num_classes = draw(st.integers(2, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=3)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logits = 3 * torch.randn(2, num_classes, *spatial, generator=generator)
    labels = torch.randint(0, num_classes, (2, 1, *spatial), generator=generator)
    labels = labels.masked_fill(torch.rand(labels.shape, generator=generator) < 0.3, SENTINEL)
    kwargs = dict(
        to_onehot_y=True,
        ignore_index=SENTINEL,
        alpha=draw(st.floats(0.0, 1.0)),
        beta=draw(st.floats(0.0, 1.0)),
        batch=draw(st.booleans()),
        **{draw(st.sampled_from(["sigmoid", "softmax"])): True},
    )
    return logits, labels, kwargs


@given(cases())
def test_non_negative_and_index_equals_one_hot(case):
    logits, labels, kwargs = case
    value = ComboLoss(**kwargs)(logits, labels)
    onehot = F.one_hot(labels[:, 0].masked_fill(labels[:, 0] == SENTINEL, 0), logits.shape[1]).movedim(-1, 1).float()
    onehot = onehot * (labels != SENTINEL)
    dense = ComboLoss(**{**kwargs, "to_onehot_y": False})(logits, onehot)  # sentinel: all-zero voxels ignored
    assert float(value) >= 0
    torch.testing.assert_close(value, dense, **TOL)


@given(cases())
def test_ignored_voxels_change_nothing(case):
    logits, labels, kwargs = case
    loss = ComboLoss(**kwargs)
    ignored = (labels == SENTINEL).expand_as(logits)
    moved = logits.masked_fill(ignored, -40.0).requires_grad_()
    torch.testing.assert_close(loss(moved, labels), loss(logits, labels), **TOL)
    loss(moved, labels).backward()
    assert torch.count_nonzero(moved.grad[ignored]) == 0


@given(cases(), st.sampled_from(["mean", "sum"]))
def test_batch_permutation_invariance(case, reduction):
    logits, labels, kwargs = case
    loss = ComboLoss(reduction=reduction, **kwargs)
    order = torch.tensor([1, 0])
    torch.testing.assert_close(loss(logits[order], labels[order]), loss(logits, labels), **TOL)


@given(cases())
def test_perfect_prediction_is_near_zero(case):
    _, labels, kwargs = case
    labels = labels.masked_fill(labels == SENTINEL, 0)
    logits = 60.0 * F.one_hot(labels[:, 0], max(int(labels.max()) + 1, 2)).movedim(-1, 1).float() - 30.0
    assert float(ComboLoss(**kwargs)(logits, labels)) < 1e-4


@pytest.mark.parametrize("scale", [30.0, 100.0, 1e4])
def test_saturated_softmax_gradient_equals_float64_one_hot_path(scale):
    """Logits far apart: p of the dominant class rounds to 1 in float32 and the other classes underflow, so the
    index path's log(1 - p_d) and its gradient come from the log-space fallback; they match the float64 one-hot
    path (a gradient that vanished there would fail, a finite one is not enough)."""
    generator = torch.Generator().manual_seed(0)
    logits = scale * torch.randn(2, 4, 6, 5, generator=generator)
    labels = torch.randint(0, 4, (2, 1, 6, 5), generator=generator)
    onehot = F.one_hot(labels[:, 0], 4).movedim(-1, 1).double()
    index_input, reference_input = logits.clone().requires_grad_(), logits.double().requires_grad_()
    ComboLoss(to_onehot_y=True, softmax=True, beta=0.3)(index_input, labels).backward()
    ComboLoss(softmax=True, beta=0.3)(reference_input, onehot).backward()
    torch.testing.assert_close(index_input.grad.double(), reference_input.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("margin", [5.0, 8.0, 12.0, 16.0])
def test_confidently_wrong_voxels_are_exact_in_float32(margin):
    """A wrong class ahead by ``margin``: 1 - p_d is about e^-margin, which float32's log1p(-p_d) gets wrong by
    e^margin * 6e-8 relative; the index path takes log(1 - p_d) from the other classes' sum there (p_d > 15/16, most
    voxels from a margin of 8) and matches float64 (at a margin of 5 most voxels keep log1p(-p_d), still exact)."""
    generator = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 4, (2, 1, 10, 9), generator=generator)
    wrong = (labels + torch.randint(1, 4, labels.shape, generator=generator)) % 4
    logits = torch.randn(2, 4, 10, 9, generator=generator)
    logits.scatter_add_(1, wrong, torch.full(labels.shape, margin))
    onehot = F.one_hot(labels[:, 0], 4).movedim(-1, 1).double()
    index_input, reference_input = logits.clone().requires_grad_(), logits.double().requires_grad_()
    value = ComboLoss(to_onehot_y=True, softmax=True, beta=0.3)(index_input, labels)
    expected = ComboLoss(softmax=True, beta=0.3)(reference_input, onehot)
    value.backward()
    expected.backward()
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(index_input.grad.double(), reference_input.grad, rtol=1e-5, atol=1e-8)
