"""Tests of ctlosses.lovasz against the loop reference written from Algorithm 1 of Berman et al. 2018
(tests/losses/lovasz_reference.py), hand-computed values, gradcheck and hypothesis properties."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from lovasz_reference import (
    lovasz_grad_reference,
    lovasz_hinge_reference,
    lovasz_softmax_reference,
    reduce_table_reference,
)
from torch.utils._python_dispatch import TorchDispatchMode

from ctlosses import LOSSES, get_loss, lovasz
from ctlosses.core import LossInputError
from ctlosses.lovasz import LovaszHingeLoss, LovaszSoftmaxLoss, lovasz_grad, lovasz_weights

SENTINEL = 255
TOL = {"rtol": 1e-6, "atol": 1e-6}


def make_batch(spatial, num_classes=3, batch=2, to_onehot_y=True, ignore=None, seed=0, dtype=torch.float32):
    """Random logits and a target; ``ignore`` is None, "sentinel" (label 255 / all-zero one-hot voxels) or
    "class" (class 1 is the ignored label). Returns (logits, target, ignore_index)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, *spatial, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_classes, (batch, 1, *spatial), generator=generator)
    ignore_index = {None: None, "sentinel": SENTINEL, "class": 1}[ignore]
    if ignore == "sentinel":
        labels = labels.masked_fill(torch.rand(labels.shape, generator=generator) < 0.3, SENTINEL)
    if to_onehot_y:
        return logits, labels, ignore_index
    onehot = F.one_hot(labels[:, 0].clamp_max(num_classes - 1), num_classes).movedim(-1, 1).to(dtype)
    return logits, onehot * (labels != SENTINEL), ignore_index


def reference(
    kind,
    logits,
    target,
    to_onehot_y,
    ignore_index=None,
    include_background=True,
    per_image=None,
    classes="present",
    weight=None,
    reduction="mean",
    softmax=True,
):
    """The loss through the loop reference: dense target, valid mask, then Algorithm 1 per image and class."""
    num_classes = logits.shape[1]
    if to_onehot_y:
        labels = target[:, 0].long()
        valid = None if ignore_index is None else labels != ignore_index
        dense = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).movedim(-1, 1).to(logits.dtype)
    else:
        dense = target.to(logits.dtype)
        if ignore_index is None:
            valid = None
        elif 0 <= ignore_index < num_classes:
            valid = dense[:, ignore_index] < 1  # MONAI: voxels of the ignored class
        else:
            valid = dense.sum(1) > 0  # MONAI: all-zero voxels
    scores = torch.softmax(logits, 1) if kind == "softmax" and softmax else logits
    if not include_background:
        scores, dense = scores[:, 1:], dense[:, 1:]
    if kind == "softmax":
        per_image = False if per_image is None else per_image
        table, counted = lovasz_softmax_reference(scores, dense, valid, per_image, classes)
    else:
        per_image = True if per_image is None else per_image
        table, counted = lovasz_hinge_reference(scores, dense, valid, per_image)
    weight = None if weight is None else torch.as_tensor(weight, dtype=logits.dtype)
    loss = reduce_table_reference(table, counted, weight, reduction)
    return loss.reshape(*loss.shape, *[1] * (logits.ndim - 2)) if reduction == "none" else loss


def value_and_grad(fn, logits):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    return loss.detach(), grad


# ------------------------------------------------------------------ Algorithm 1 and hand-computed values


def jaccard_of_prefix(fg, i):
    """Delta_J of the set S of the first i voxels, straight from the set definition |S| / |fg u S|."""
    prefix = set(range(i))
    foreground = {k for k, v in enumerate(fg) if v}
    return len(prefix) / len(foreground | prefix) if prefix else 0.0


@pytest.mark.parametrize("fg", [[1, 0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0]])
def test_lovasz_grad_matches_set_definition(fg):
    expected = [jaccard_of_prefix(fg, i + 1) - jaccard_of_prefix(fg, i) for i in range(len(fg))]
    fg_sorted = torch.tensor(fg, dtype=torch.float64)
    torch.testing.assert_close(lovasz_grad(fg_sorted), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(lovasz_grad_reference(fg_sorted), torch.tensor(expected, dtype=torch.float64))
    as_bool = lovasz_grad(fg_sorted.bool(), dtype=torch.float64)  # index targets reach it as bool
    torch.testing.assert_close(as_bool, torch.tensor(expected, dtype=torch.float64))


def test_lovasz_grad_by_hand():
    # fg = [1, 0, 1, 0]: Delta_J of the prefixes is 1/2, 2/3, 3/3, 4/4
    grad = lovasz_grad(torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([1 / 2, 1 / 6, 1 / 3, 0.0], dtype=torch.float64))


def test_lovasz_grad_padding_equals_shorter_rows():
    rows = [[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    lengths = [5, 3, 0]
    grad = lovasz_grad(torch.tensor(rows), torch.tensor(lengths, dtype=torch.float32).unsqueeze(-1))
    for row, n, g in zip(rows, lengths, grad):
        expected = torch.zeros(5)
        expected[:n] = lovasz_grad_reference(torch.tensor(row[:n])) if n else 0.0
        torch.testing.assert_close(g, expected)


def test_lovasz_weights_reproduce_sorted_dot():
    generator = torch.Generator().manual_seed(3)
    errors = torch.rand(4, 3, 50, generator=generator)
    fg = (torch.rand(4, 3, 50, generator=generator) < 0.4).float()
    value = (errors * lovasz_weights(errors, fg, torch.ones_like(fg, dtype=torch.bool))).sum(-1)
    # past the last foreground voxel the gradient is 0: sorting only the voxels above it changes nothing
    above = fg.bool() | (errors >= errors.masked_fill(fg == 0, 2.0).amin(-1, keepdim=True))
    assert above.sum() < above.numel()
    torch.testing.assert_close((errors * lovasz_weights(errors, fg, above)).sum(-1), value)
    for index in itertools.product(range(4), range(3)):
        sorted_errors, order = errors[index].sort(descending=True)
        torch.testing.assert_close(value[index], sorted_errors @ lovasz_grad_reference(fg[index][order]))


@pytest.mark.parametrize("fg_fraction", [0.1, 0.6])
def test_lovasz_weights_with_compacted_candidates(fg_fraction):
    # foreground errors above every background error: only the foreground can have a weight, which _compact
    # left-aligns (fg_fraction 0.1) or keeps in full rows (0.6)
    generator = torch.Generator().manual_seed(4)
    fg = torch.rand(3, 2, 60, generator=generator) < fg_fraction
    errors = 0.5 * torch.rand(3, 2, 60, generator=generator) + 0.5 * fg
    for per_image in (True, False):
        full = lovasz_weights(errors, fg, torch.ones_like(fg), per_image)
        torch.testing.assert_close(lovasz_weights(errors, fg, fg, per_image), full)


def test_hinge_by_hand_uses_raw_logits():
    # errors 1 - x s: voxel 0 (fg, x=2) -> -1, voxel 1 (bg, x=-0.5) -> 0.5; sorted [0.5, -1] with fg [0, 1]
    # gives the gradient [1/2, 1/2], so the loss is relu(0.5) / 2 = 0.25 (a sigmoid first would give ~0.69)
    logits = torch.tensor([2.0, -0.5]).view(1, 1, 2, 1)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    torch.testing.assert_close(LovaszHingeLoss()(logits, target), torch.tensor(0.25))


def test_softmax_at_hard_prediction_is_one_minus_iou():
    # with 0/1 probabilities the Lovasz extension equals the Jaccard loss of the set of wrong voxels
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 1, 0]).view(1, 1, 8, 1)
    predicted = torch.tensor([0, 1, 1, 1, 2, 0, 1, 0])
    probs = F.one_hot(predicted, 3).T.reshape(1, 3, 8, 1).float()
    iou = [2 / 4, 3 / 4, 1 / 2]  # class 0: pred {0,5,7} gt {0,1,7}; class 1: pred {1,2,3,6} gt {2,3,6}; 2: {4} vs {4,5}
    loss = LovaszSoftmaxLoss(to_onehot_y=True, softmax=False)(probs, labels)
    torch.testing.assert_close(loss, torch.tensor(1 - sum(iou) / 3))


# ------------------------------------------------------------------ differential tests against the reference

SPATIAL = {"2d": (5, 6), "3d": (3, 4, 5)}


@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("classes", ["present", "all"])
@pytest.mark.parametrize("to_onehot_y", [True, False])
@pytest.mark.parametrize("ignore", [None, "sentinel", "class"])
@pytest.mark.parametrize("include_background", [True, False])
def test_softmax_matches_reference(dims, per_image, classes, to_onehot_y, ignore, include_background):
    logits, target, ignore_index = make_batch(SPATIAL[dims], 4, 3, to_onehot_y, ignore, seed=len(dims) + per_image)
    kwargs = dict(
        include_background=include_background, per_image=per_image, classes=classes, ignore_index=ignore_index
    )
    loss = LovaszSoftmaxLoss(to_onehot_y=to_onehot_y, **kwargs)
    value, grad = value_and_grad(lambda x: loss(x, target), logits)
    expected, expected_grad = value_and_grad(lambda x: reference("softmax", x, target, to_onehot_y, **kwargs), logits)
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("to_onehot_y", [True, False])
@pytest.mark.parametrize("ignore", [None, "sentinel", "class"])
@pytest.mark.parametrize("include_background", [True, False])
def test_hinge_matches_reference(dims, per_image, to_onehot_y, ignore, include_background):
    logits, target, ignore_index = make_batch(SPATIAL[dims], 3, 3, to_onehot_y, ignore, seed=7)
    logits = logits * 2
    kwargs = dict(include_background=include_background, per_image=per_image, ignore_index=ignore_index)
    loss = LovaszHingeLoss(to_onehot_y=to_onehot_y, **kwargs)
    value, grad = value_and_grad(lambda x: loss(x, target), logits)
    expected, expected_grad = value_and_grad(lambda x: reference("hinge", x, target, to_onehot_y, **kwargs), logits)
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("kind", ["softmax", "hinge"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ties_match_the_stable_reference(kind, per_image, seed):
    """Integer logits: many equal errors. The value does not depend on their order; the gradient is the one of
    equal errors in voxel order (the reference's stable sort), including pooled problems and ignored voxels."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (2, 4, 6, 7, 5), generator=generator).float()
    target = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=generator)
    target[0, 0, :2] = SENTINEL
    target[1] = target[1].where(target[1] != 3, 0)  # class 3 absent from image 1
    kwargs = dict(per_image=per_image, ignore_index=SENTINEL)
    loss = (LovaszSoftmaxLoss if kind == "softmax" else LovaszHingeLoss)(to_onehot_y=True, **kwargs)
    value, grad = value_and_grad(lambda x: loss(x, target), logits)
    expected, expected_grad = value_and_grad(lambda x: reference(kind, x, target, True, **kwargs), logits)
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


def test_descending_bits_order_floats_like_a_stable_descending_sort():
    values = torch.tensor([0.5, -0.0, 0.0, -1.5, float("inf"), -float("inf"), 1e-40, -1e-40, 0.5, 3.0, -2.0, 0.0])
    keys = lovasz._descending_bits(values.clone())
    expected = values.sort(descending=True, stable=True).indices
    # int32 keys: sorting them ascending (stable) orders the floats decreasingly, -0.0 tied with +0.0
    torch.testing.assert_close(keys.sort(stable=True).indices, expected)


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("first", [0, 1])
def test_packed_key_sort_equals_two_stable_sorts(per_image, first):
    """The one int64 key sort (float32 errors) gives the order of the fallback's two stable sorts (float64: errors,
    then problems) on ties, signed zeros, infinities, negative errors and problems without candidates."""
    generator = torch.Generator().manual_seed(5)
    errors = torch.randint(-3, 4, (3, 4, 50), generator=generator).float() / 2
    errors[0, 1, :5] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), -0.0])
    fg = torch.rand(3, 4, 50, generator=generator) < 0.3
    candidates = torch.rand(3, 4, 50, generator=generator) < 0.7
    candidates[1, 2] = False  # a problem (per image) or a chunk (pooled) without candidates
    candidates[:, 3] = False  # a class without candidates anywhere
    candidates[:, :first] = False
    orders = []
    for dtype in (torch.float32, torch.float64):
        problems = lovasz.Problems(errors.to(dtype), fg, None, fg.sum(-1, dtype=torch.int32), None, first, per_image)
        ordered = lovasz.sort_problems(problems, errors.to(dtype), candidates)
        orders.append((ordered.positions, ordered.rows.long(), ordered.counts))
    for packed, fallback in zip(*orders):
        torch.testing.assert_close(packed, fallback, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_key_sort_in_parallel_parts_equals_one_sort(threads):
    """Keys that split into parts without interleaving (a problem per image and class) are sorted part by part in
    parallel: the result is numpy's sort of the whole."""
    generator = torch.Generator().manual_seed(2)
    sizes = [40_000, 0, 70_000, 25_000]
    keys = torch.cat([torch.randint(0, 2**40, (n,), generator=generator) + (i << 41) for i, n in enumerate(sizes)])
    splits = torch.tensor(sizes).cumsum(0).tolist()
    expected = keys.sort().values
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lovasz._sort_keys(keys, splits)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(keys, expected, rtol=0, atol=0)


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss])
def test_float32_and_float64_paths_give_the_same_loss_and_gradient(cls, per_image):
    """float32 takes the packed key sort, float64 the two stable sorts: the same loss."""
    logits, target, ignore_index = make_batch((6, 5, 4), 5, 3, True, "sentinel", seed=9)
    loss = cls(to_onehot_y=True, per_image=per_image, ignore_index=ignore_index)
    value, grad = value_and_grad(lambda x: loss(x, target), logits)
    value64, grad64 = value_and_grad(lambda x: loss(x, target), logits.double())
    torch.testing.assert_close(value.double(), value64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_image", [True, False])
def test_classes_absent_from_every_image_are_skipped_exactly(reduction, per_image):
    """classes="present" sorts only the classes present somewhere in the batch; the others give 0 as before."""
    logits, target, ignore_index = make_batch((4, 3, 5), 5, 2, True, "sentinel", seed=12)
    target = target.where((target != 2) & (target != 4), 0)  # classes 2 and 4 nowhere in the batch
    kwargs = dict(per_image=per_image, reduction=reduction, ignore_index=ignore_index, weight=[1.0, 2, 3, 4, 5])
    value, grad = value_and_grad(lambda x: LovaszSoftmaxLoss(to_onehot_y=True, **kwargs)(x, target), logits)
    expected, expected_grad = value_and_grad(lambda x: reference("softmax", x, target, True, **kwargs), logits)
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("kind", ["softmax", "hinge"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
def test_weight_and_reduction_match_reference(kind, reduction, per_image, include_background):
    logits, target, ignore_index = make_batch((4, 3, 5), 4, 2, True, "sentinel", seed=11)
    target[0] = target[0].where(target[0] != 2, 0)  # class 2 absent from image 0: "present" differs per image
    weight = [0.5, 2.0, 1.0, 3.0][1 - include_background :]
    kwargs = dict(
        include_background=include_background,
        per_image=per_image,
        weight=weight,
        reduction=reduction,
        ignore_index=ignore_index,
    )
    cls = LovaszSoftmaxLoss if kind == "softmax" else LovaszHingeLoss
    loss = cls(to_onehot_y=True, **kwargs)
    value, grad = value_and_grad(lambda x: loss(x, target), logits)
    expected, expected_grad = value_and_grad(lambda x: reference(kind, x, target, True, **kwargs), logits)
    assert value.shape == expected.shape
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


def test_none_reduction_broadcasts_against_input():
    logits, target, _ = make_batch((4, 3, 5), 4, 2)
    per_image = LovaszSoftmaxLoss(to_onehot_y=True, reduction="none", per_image=True)
    assert per_image(logits, target).shape == (2, 4, 1, 1, 1)
    assert LovaszSoftmaxLoss(to_onehot_y=True, reduction="none")(logits, target).shape == (1, 4, 1, 1, 1)
    assert LovaszHingeLoss(to_onehot_y=True, reduction="none", include_background=False)(
        logits[..., 0], target[..., 0]
    ).shape == (2, 3, 1, 1)


def test_softmax_soft_labels_and_other_act_match_reference():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 6, 7, generator=generator)
    soft = torch.softmax(3 * torch.randn(2, 3, 6, 7, generator=generator), 1)
    loss = LovaszSoftmaxLoss(softmax=False, other_act=lambda x: torch.softmax(x, 1), per_image=True)
    value, grad = value_and_grad(lambda x: loss(x, soft), logits)
    expected, expected_grad = value_and_grad(lambda x: reference("softmax", x, soft, False, per_image=True), logits)
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)


def test_single_channel_hinge_is_berman_binary_case():
    logits, target, _ = make_batch((8, 9), 1, 3, to_onehot_y=False, seed=2)
    target = (torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    for per_image in (True, False):
        value = LovaszHingeLoss(per_image=per_image)(logits, target)
        torch.testing.assert_close(value, reference("hinge", logits, target, False, per_image=per_image), **TOL)


class CountSorts(TorchDispatchMode):
    """Counts torch's sorts, and the calls of the loss' own key sort (numpy's in-place sort on a CPU)."""

    def __init__(self):
        super().__init__()
        self.sorts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.sorts += func.overloadpacket in (torch.ops.aten.sort, torch.ops.aten.argsort)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._sort_keys = lovasz._sort_keys

        def counted_sort(keys, *args):
            self.sorts += keys.device.type == "cpu"  # elsewhere it is a torch sort, counted above
            return self._sort_keys(keys, *args)

        lovasz._sort_keys = counted_sort
        return super().__enter__()

    def __exit__(self, *exc):
        lovasz._sort_keys = self._sort_keys
        return super().__exit__(*exc)


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss])
def test_one_sort_for_all_images_and_classes(cls, per_image):
    logits, target, ignore_index = make_batch((4, 5, 3), 4, 3, True, "sentinel")
    logits.requires_grad_(True)
    with CountSorts() as counter:
        cls(to_onehot_y=True, per_image=per_image, ignore_index=ignore_index)(logits, target).backward()
    assert counter.sorts == 1


def test_registry_names():
    assert LOSSES["lovasz_hinge"] is LovaszHingeLoss and LOSSES["lovasz_softmax"] is LovaszSoftmaxLoss
    loss = get_loss("lovasz_softmax", to_onehot_y=True, classes="all", per_image=True)
    assert isinstance(loss, LovaszSoftmaxLoss) and loss.classes == "all" and loss.per_image


# ------------------------------------------------------------------ gradcheck, edge cases, precision


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss])
def test_gradcheck_float64(cls, per_image):
    logits, target, ignore_index = make_batch((3, 4, 2), 3, 2, True, "sentinel", seed=4, dtype=torch.float64)
    loss = cls(to_onehot_y=True, per_image=per_image, ignore_index=ignore_index, weight=[1.0, 2.0, 0.5])
    assert torch.autograd.gradcheck(lambda x: loss(x, target), logits.requires_grad_(True))


@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss])
@pytest.mark.parametrize("per_image", [True, False])
def test_all_ignored_gives_zero_loss_and_gradient(cls, per_image):
    logits, target, _ = make_batch((4, 5), 3, 2)
    value, grad = value_and_grad(
        lambda x: cls(to_onehot_y=True, per_image=per_image, ignore_index=SENTINEL)(
            x, torch.full_like(target, SENTINEL)
        ),
        logits,
    )
    assert value == 0 and torch.all(grad == 0)


def test_all_background_without_background_class_is_zero():
    logits, target, _ = make_batch((4, 5), 3, 2)
    value, grad = value_and_grad(
        lambda x: LovaszSoftmaxLoss(to_onehot_y=True, include_background=False)(x, torch.zeros_like(target)), logits
    )
    assert value == 0 and torch.all(grad == 0)


@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss])
def test_non_finite_logits_give_non_finite_loss(cls):
    logits, target, _ = make_batch((4, 5), 3, 2)
    logits[1, 2, 0, 0] = float("nan")
    assert not torch.isfinite(cls(to_onehot_y=True)(logits, target))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss])
def test_half_precision_equals_float32(cls, dtype):
    logits, target, _ = make_batch((6, 5, 4), 4, 2, True, "sentinel")
    low = logits.to(dtype)
    loss = cls(to_onehot_y=True, ignore_index=SENTINEL)
    value = loss(low, target)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, loss(low.float(), target), rtol=1e-3, atol=0)


@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss])
def test_autocast_changes_nothing(cls):
    logits, target, _ = make_batch((6, 5, 4), 4, 2, True, "sentinel")
    low = logits.bfloat16()
    loss = cls(to_onehot_y=True, ignore_index=SENTINEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(low, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(low.float(), target), rtol=1e-6, atol=0)


# ------------------------------------------------------------------ properties


@st.composite
def batches(draw):
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=3)))
    return dict(
        spatial=spatial,
        num_classes=draw(st.integers(2, 4)),
        batch=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
        ignore=draw(st.sampled_from([None, "sentinel"])),
    )


@given(batches(), st.booleans(), st.sampled_from(["present", "all"]))
def test_property_non_negative(spec, per_image, classes):
    logits, target, ignore_index = make_batch(**spec)
    assert (
        LovaszSoftmaxLoss(to_onehot_y=True, per_image=per_image, classes=classes, ignore_index=ignore_index)(
            logits, target
        )
        >= 0
    )
    assert LovaszHingeLoss(to_onehot_y=True, per_image=per_image, ignore_index=ignore_index)(logits, target) >= 0


@given(batches(), st.booleans(), st.floats(1.0, 50.0))
def test_property_zero_at_perfect_prediction(spec, per_image, margin):
    _, target, ignore_index = make_batch(**spec)
    onehot = F.one_hot(target[:, 0].clamp_max(spec["num_classes"] - 1), spec["num_classes"]).movedim(-1, 1).float()
    # confident logits: every margin x s >= 1, so every hinge error is <= 0
    logits = (2 * onehot - 1) * margin
    assert LovaszHingeLoss(to_onehot_y=True, per_image=per_image, ignore_index=ignore_index)(logits, target) == 0
    assert (
        LovaszSoftmaxLoss(to_onehot_y=True, softmax=False, per_image=per_image, ignore_index=ignore_index)(
            onehot, target
        )
        == 0
    )


@given(batches(), st.booleans(), st.sampled_from([LovaszSoftmaxLoss, LovaszHingeLoss]))
def test_property_ignored_voxels_change_nothing(spec, per_image, cls):
    logits, target, _ = make_batch(**{**spec, "ignore": "sentinel"})
    ignored = target == SENTINEL
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    # anything at ignored voxels, up to huge logits (inf too for the hinge, which has no softmax to turn it NaN)
    extreme = 1e30 if cls is LovaszSoftmaxLoss else torch.inf
    noise = torch.randn(logits.shape, generator=generator)
    other_logits = torch.where(ignored, torch.where(noise.abs() > 1.5, noise.sign() * extreme, 10 * noise), logits)
    loss = cls(to_onehot_y=True, per_image=per_image, ignore_index=SENTINEL)
    value, grad = value_and_grad(lambda x: loss(x, target), logits)
    other_value, other_grad = value_and_grad(lambda x: loss(x, target), other_logits)
    torch.testing.assert_close(value, other_value, **TOL)
    torch.testing.assert_close(grad, other_grad, **TOL)
    assert torch.all(grad.masked_select(ignored.expand_as(grad)) == 0)


@given(batches(), st.sampled_from([LovaszSoftmaxLoss, LovaszHingeLoss]))
def test_property_per_image_mean_ignores_batch_order(spec, cls):
    logits, target, ignore_index = make_batch(**spec)
    order = torch.randperm(logits.shape[0], generator=torch.Generator().manual_seed(spec["seed"]))
    loss = cls(to_onehot_y=True, per_image=True, ignore_index=ignore_index)
    torch.testing.assert_close(loss(logits, target), loss(logits[order], target[order]), **TOL)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(reduction="avg"),
        dict(classes="some"),
        dict(weight=[1.0, -1.0, 1.0]),
        dict(ignore_index=1.5),
        dict(other_act=torch.sigmoid),
        dict(softmax=False, other_act="sigmoid"),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(LossInputError):
        LovaszSoftmaxLoss(**kwargs)


@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss])
def test_bad_tensors(cls):
    logits, target, _ = make_batch((4, 5), 3, 2)
    with pytest.raises(LossInputError, match="shape"):
        cls(to_onehot_y=True)(logits, target[..., :4])
    with pytest.raises(LossInputError, match="channels"):
        cls()(logits, target)  # indices without to_onehot_y
    with pytest.raises(LossInputError, match=r"\[0, 3\)"):
        cls(to_onehot_y=True)(logits, target + 3)
    with pytest.raises(LossInputError, match="weight"):
        cls(to_onehot_y=True, weight=[1.0, 1.0, 1.0], include_background=False)(logits, target)
    with pytest.raises(LossInputError):
        cls()(logits[0, 0], target[0, 0])


# ---------------------------------------------------------------------------------------------- hinge + cross-entropy


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("lambda_ce", [0.5, 1.0])
def test_hinge_with_cross_entropy_is_the_hinge_plus_torch_cross_entropy(channels, reduction, lambda_ce):
    torch.manual_seed(3)
    logits = torch.randn(2, channels, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, max(2, channels), (2, 1, 6, 5, 4))
    labels[0, 0, :2] = 255  # ignored voxels: out of both terms
    hinge = LovaszHingeLoss(to_onehot_y=channels > 1, reduction=reduction, ignore_index=255)
    both = LovaszHingeLoss(to_onehot_y=channels > 1, reduction=reduction, ignore_index=255, lambda_ce=lambda_ce)
    keep = labels[:, 0] != 255
    if channels == 1:
        target = torch.where(labels == 255, 0, labels).to(logits)
        per_voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")[:, 0][keep]
    else:
        per_voxel = F.cross_entropy(logits, torch.where(labels == 255, 0, labels)[:, 0], reduction="none")[keep]
    # torch's mean: over every counted voxel of the batch (MONAI's DiceCE term); the sum: over the same voxels
    cross_entropy = per_voxel.mean() if reduction == "mean" else per_voxel.sum()
    expected = hinge(logits, labels) + lambda_ce * cross_entropy
    value = both(logits, labels)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(value, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_hinge_with_cross_entropy_gradcheck_float64():
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 3))
    loss = LovaszHingeLoss(to_onehot_y=True, lambda_ce=1.0)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (logits,))
