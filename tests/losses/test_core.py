"""The shared loss core: validators, activation, target encoding and ignore mask (against MONAI 1.6.1),
per-class statistics (against monai.losses.utils.compute_tp_fp_fn), the fused memory-light path, reductions."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses.utils import compute_tp_fp_fn
from monai.metrics.utils import create_ignore_mask

from ctlosses import LOSSES, core, get_loss
from ctlosses.core import (
    LossInputError,
    activate,
    activated_overlap_stats,
    check_activation,
    check_probability,
    check_range,
    check_reduction,
    class_weight,
    encode_target,
    overlap_stats,
    reduce_loss,
    safe_pow,
)

SENTINEL = 255


def labels_and_logits(shape=(2, 3, 5, 4), seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    batch, classes, *spatial = shape
    logits = torch.randn(shape, generator=generator, dtype=dtype)
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=generator)
    return logits, labels


def onehot(labels, classes, dtype=torch.float64):
    return F.one_hot(labels[:, 0].clamp(0, classes - 1), classes).movedim(-1, 1).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# validators


def test_loss_input_error_satisfies_valueerror_and_assertionerror_handlers():
    assert issubclass(LossInputError, ValueError) and issubclass(LossInputError, AssertionError)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_check_reduction_accepts_the_three_and_monai_enum(reduction):
    from monai.utils import LossReduction

    assert check_reduction(reduction) == reduction
    assert check_reduction(LossReduction(reduction)) == reduction


@pytest.mark.parametrize("bad", ["avg", "MEAN", None, 1])
def test_check_reduction_names_expected_and_got(bad):
    with pytest.raises(LossInputError, match=r"one of \('none', 'mean', 'sum'\), got"):
        check_reduction(bad)


def test_check_range_and_probability():
    assert check_probability("alpha", 0) == 0.0 and check_probability("alpha", 1) == 1.0
    assert check_range("gamma", 2, 0, math.inf, low_inclusive=False) == 2.0
    for bad in (-0.1, 1.1, float("nan"), "x", None):
        with pytest.raises(LossInputError, match="alpha must be"):
            check_probability("alpha", bad)
    with pytest.raises(LossInputError, match=r"gamma must be in \(0"):
        check_range("gamma", 0, 0, math.inf, low_inclusive=False)


def test_check_activation_follows_monai():
    check_activation(True, False, None)
    check_activation(False, False, torch.tanh)
    with pytest.raises(LossInputError, match="Incompatible values"):
        check_activation(True, True, None)
    with pytest.raises(TypeError, match="other_act must be None or callable"):
        check_activation(False, False, 3)


def test_class_weight():
    assert class_weight(None) is None
    torch.testing.assert_close(class_weight([1, 2]), torch.tensor([1.0, 2.0]))
    assert class_weight(2).ndim == 0
    for bad, message in [([1, -1], "no less than 0"), ([[1.0]], "1-D"), ([], "no less than 0"), ("a", "number")]:
        with pytest.raises(LossInputError, match=message):
            class_weight(bad)


# ---------------------------------------------------------------------------------------------------------
# activation


def test_activate_upcasts_half_precision_and_keeps_float64():
    logits = torch.randn(2, 3, 4)
    for dtype in (torch.float16, torch.bfloat16):
        probs = activate(logits.to(dtype), softmax=True)
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs, torch.softmax(logits.to(dtype).float(), 1))
    assert activate(logits.double(), sigmoid=True).dtype == torch.float64
    assert activate(logits) is logits  # no activation, no copy
    assert activate(logits.half(), other_act=lambda x: x.half()).dtype == torch.float32


def test_activate_softmax_on_one_channel_warns_and_is_skipped():
    logits = torch.randn(2, 1, 4)
    with pytest.warns(UserWarning, match="single channel"):
        assert torch.equal(activate(logits, softmax=True), logits)


# ---------------------------------------------------------------------------------------------------------
# target encoding and ignore mask


def test_index_target_is_kept_as_indices():
    logits, labels = labels_and_logits()
    encoded = encode_target(logits, labels.float(), to_onehot_y=True)
    assert encoded.dense is None and encoded.mask is None and encoded.num_classes == 3
    assert encoded.indices.dtype == torch.long and encoded.indices.shape == (2, 20)
    assert torch.equal(encoded.indices, labels.reshape(2, -1))


@pytest.mark.parametrize("ignore_index", [SENTINEL, -1, 1, 0])
def test_index_target_mask_matches_monai(ignore_index):
    logits, labels = labels_and_logits(seed=1)
    labels[:, :, :2] = ignore_index
    encoded = encode_target(logits, labels, to_onehot_y=True, ignore_index=ignore_index)
    expected = create_ignore_mask(labels, ignore_index).reshape(2, -1)
    assert encoded.mask.dtype == torch.bool
    torch.testing.assert_close(encoded.mask.double(), expected.double())
    torch.testing.assert_close(encoded.mask_weight.double(), expected.double())
    assert ((encoded.indices >= 0) & (encoded.indices < 3)).all()  # ignored voxels hold a valid dummy class


@pytest.mark.parametrize("ignore_index", [SENTINEL, -1, 1])
@pytest.mark.parametrize("soft", [False, True])
def test_dense_target_mask_matches_monai(ignore_index, soft):
    logits, labels = labels_and_logits(seed=2)
    target = torch.softmax(3 * logits.flip(0), 1) if soft else onehot(labels, 3)
    target[:, :, 0] = 0  # all-zero voxels: the sentinel's meaning for dense targets
    encoded = encode_target(logits, target, ignore_index=ignore_index)
    expected = create_ignore_mask(target, ignore_index).reshape(2, -1)
    torch.testing.assert_close(encoded.mask_weight, expected.to(encoded.mask_weight.dtype))
    assert torch.equal(encoded.mask, expected > 0)
    assert encoded.indices is None and encoded.dense.shape == (2, 3, 20)


def test_dense_target_is_cast_to_compute_dtype():
    logits, labels = labels_and_logits(dtype=torch.float16)
    encoded = encode_target(logits, onehot(labels, 3, torch.float16))
    assert encoded.dense.dtype == torch.float32


@pytest.mark.parametrize(
    "target_shape, to_onehot_y, message",
    [
        ((2, 3, 5), False, "does not match input shape"),
        ((2, 3, 5, 5), False, "does not match input shape"),
        ((1, 3, 5, 4), False, "does not match input shape"),
        ((2, 1, 5, 4), False, "set to_onehot_y=True"),
        ((2, 4, 5, 4), False, "target has 4 channels but input has 3"),
        ((2, 3, 5, 4), True, "class-index targets need 1 channel"),
    ],
)
def test_encode_target_shape_errors_name_expected_and_got(target_shape, to_onehot_y, message):
    logits, _ = labels_and_logits()
    with pytest.raises(LossInputError, match=message) as error:
        encode_target(logits, torch.zeros(target_shape), to_onehot_y)
    assert str(tuple(target_shape)) in str(error.value) or f"{target_shape[1]} channels" in str(error.value)


@pytest.mark.parametrize("bad_label", [3, -1, 7, 0.5])
def test_encode_target_rejects_labels_outside_the_classes(bad_label):
    logits, labels = labels_and_logits()
    labels = labels.double()
    labels[1, 0, 2, 2] = bad_label
    with pytest.raises(LossInputError, match=r"integers in \[0, 3\).*e\.g\."):
        encode_target(logits, labels, to_onehot_y=True, ignore_index=SENTINEL)


def test_encode_target_single_channel_ignores_to_onehot_y_with_warning():
    logits = torch.randn(2, 1, 4, 4)
    target = torch.randint(0, 2, (2, 1, 4, 4)).float()
    with pytest.warns(UserWarning, match="to_onehot_y=True` ignored"):
        encoded = encode_target(logits, target, to_onehot_y=True)
    assert encoded.indices is None and torch.equal(encoded.dense, target.reshape(2, 1, 16))


# ---------------------------------------------------------------------------------------------------------
# per-class statistics


@pytest.mark.parametrize("squared_pred, soft_label", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("values", ["probs", "raw"])
def test_overlap_stats_match_monai_for_index_and_dense_targets(squared_pred, soft_label, batch, values):
    """Index targets (gather/scatter) and dense targets give MONAI's numbers, also for values outside [0, 1]."""
    logits, labels = labels_and_logits(shape=(2, 4, 3, 5, 2), seed=3)
    probs = torch.softmax(logits, 1) if values == "probs" else logits
    reduce_axis = [0, 2, 3, 4] if batch else [2, 3, 4]
    expected = compute_tp_fp_fn(probs, onehot(labels, 4), reduce_axis, 2 if squared_pred else 1, soft_label)
    for target, to_onehot_y in [(labels, True), (onehot(labels, 4), False)]:
        encoded = encode_target(logits, target, to_onehot_y)
        stats = overlap_stats(probs, encoded, batch=batch, squared_pred=squared_pred, soft_label=soft_label)
        for got, want in zip(stats, expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_overlap_stats_include_background_drops_class_zero():
    logits, labels = labels_and_logits(seed=4)
    encoded = encode_target(logits, labels, True)
    probs = torch.softmax(logits, 1)
    full = overlap_stats(probs, encoded)
    without = overlap_stats(probs, encoded, include_background=False)
    for a, b in zip(full, without):
        assert torch.equal(a[:, 1:], b)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("squared_pred, soft_label", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("ignore_index", [None, SENTINEL, 2])
def test_fused_stats_equal_unfused_in_values_and_gradients(
    monkeypatch, activation, squared_pred, soft_label, ignore_index
):
    """The chunked autograd.Function equals activation + dense one-hot statistics, over several chunks."""
    monkeypatch.setattr(core, "_BACKWARD_CHUNKS", 3)  # chunks of at least 1024 voxels: 1200 voxels give two
    logits, labels = labels_and_logits(shape=(2, 3, 40, 30), seed=5)
    if ignore_index is not None:
        labels[:, :, ::3] = ignore_index
    switches = {"softmax": activation == "softmax", "sigmoid": activation == "sigmoid"}
    flags = {"squared_pred": squared_pred, "soft_label": soft_label, "batch": False}

    def stats(fused):
        x = logits.clone().requires_grad_(True)
        if fused:
            encoded = encode_target(x, labels, True, ignore_index)
            result = activated_overlap_stats(x, encoded, **switches, **flags)
        else:
            dense = onehot(labels, 3) * create_ignore_mask(labels, ignore_index) if ignore_index else onehot(labels, 3)
            encoded = encode_target(x, dense, False, None)
            mask = None if ignore_index is None else create_ignore_mask(labels, ignore_index)
            probs = activate(x, **switches)
            result = overlap_stats(probs if mask is None else probs * mask, encoded, **flags)
        tp, fp, fn = result
        class_mix = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)  # any scalar of all three statistics
        (grad,) = torch.autograd.grad((class_mix * (tp + 2 * fp - 3 * fn)).sum(), x)
        return [s.detach() for s in result], grad

    (fused_stats, fused_grad), (plain_stats, plain_grad) = stats(True), stats(False)
    for got, want in zip(fused_stats, plain_stats):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("to_onehot_y", [True, False])
def test_no_full_size_float_tensor_is_kept_for_index_targets(to_onehot_y):
    """Memory: with index targets autograd saves no B x C x N float tensor besides the logits themselves
    (no one-hot copy; the probabilities live in the buffer that becomes the gradient); a dense target
    necessarily saves some (control)."""
    from ctlosses import DiceLoss

    logits, labels = labels_and_logits(shape=(2, 5, 8, 7, 6), dtype=torch.float32)
    logits.requires_grad_(True)
    target = labels if to_onehot_y else onehot(labels, 5, torch.float32)
    saved = []

    def pack(tensor):
        if tensor.is_floating_point() and tensor.numel() >= logits.numel() and tensor.data_ptr() != logits.data_ptr():
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        DiceLoss(to_onehot_y=to_onehot_y, softmax=True, ignore_index=SENTINEL).forward(logits, target)
    assert (saved == []) == to_onehot_y, saved


# ---------------------------------------------------------------------------------------------------------
# reductions and the safe power


def test_reduce_loss_shapes_and_weight():
    per_class = torch.arange(6.0).reshape(2, 3)
    weight = torch.tensor([1.0, 0.0, 2.0])
    assert reduce_loss(per_class, "none").shape == (2, 3)
    assert reduce_loss(per_class, "none", spatial_dims=3).shape == (2, 3, 1, 1, 1)
    assert reduce_loss(per_class[0], "none", spatial_dims=2).shape == (3, 1, 1)
    torch.testing.assert_close(reduce_loss(per_class, "mean", weight), (per_class * weight).mean())
    torch.testing.assert_close(reduce_loss(per_class, "sum", torch.tensor(2.0)), 2 * per_class.sum())
    assert torch.equal(reduce_loss(per_class[:, :1], "sum", torch.tensor([5.0, 6.0])), per_class[:, 0].sum())
    with pytest.raises(LossInputError, match="weight has 3 values but the loss has 2 classes"):
        reduce_loss(per_class[:, 1:], "mean", weight)
    with pytest.raises(LossInputError, match="reduction"):
        reduce_loss(per_class, "max")


def test_safe_pow_is_zero_with_zero_gradient_at_zero_and_keeps_nan():
    base = torch.tensor([0.0, 0.25, 1.0, -1e-7, float("nan")], dtype=torch.float64, requires_grad=True)
    value = safe_pow(base, 0.75)
    expected = torch.tensor([0.0, 0.25**0.75, 1.0, 0.0, float("nan")], dtype=torch.float64)
    torch.testing.assert_close(value, expected, equal_nan=True)
    (grad,) = torch.autograd.grad(value[:4].sum(), base)
    torch.testing.assert_close(grad[:4], torch.tensor([0.0, 0.75 * 0.25**-0.25, 0.75, 0.0], dtype=torch.float64))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_fused_path_supports_a_second_backward_through_the_graph(activation):
    """The forward's probabilities become the gradient in place; a retained graph must recompute them."""
    logits, labels = labels_and_logits(shape=(2, 3, 6, 5), seed=6)
    logits.requires_grad_(True)
    encoded = encode_target(logits, labels, True, None)
    tp, fp, fn = activated_overlap_stats(logits, encoded, **{activation: True})
    total = (tp - 2 * fp + 0.5 * fn).sum()
    (first,) = torch.autograd.grad(total, logits, retain_graph=True)
    (second,) = torch.autograd.grad(total, logits)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# input as a user types it (issue 11): command-line strings, a swapped loss, empty batches, bad one-hot values


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        (0, False),
    ],
)
def test_switches_read_what_a_command_line_gives(typed, expected):
    from ctlosses import DiceLoss, FocalLoss, LovaszSoftmaxLoss

    assert DiceLoss(softmax=typed, to_onehot_y=typed, batch=typed).softmax is expected
    assert FocalLoss(use_softmax=typed).use_softmax is expected
    assert LovaszSoftmaxLoss(per_image=typed).per_image is expected


@pytest.mark.parametrize("typed", ["maybe", "", 2, 0.5, None])
def test_a_switch_that_is_not_a_boolean_is_named(typed):
    from ctlosses import DiceLoss

    with pytest.raises(LossInputError, match=r"softmax must be true or false, got"):
        DiceLoss(softmax=typed)


def test_ignore_index_typed_as_text():
    from ctlosses import DiceLoss

    assert DiceLoss(ignore_index="255").ignore_index == 255
    for typed in ("abc", "2.5", 2.5, True):
        with pytest.raises(LossInputError, match="ignore_index must be None or an integer"):
            DiceLoss(ignore_index=typed)


def test_an_argument_the_loss_does_not_take_lists_what_it_takes_and_its_preset():
    """The README's swap, --loss#_target_ ctlosses.FocalLoss, keeps train.json's softmax=true."""
    from monai.bundle import ConfigParser

    from ctlosses import DiceLoss, FocalLoss

    config = {"loss": {"_target_": "ctlosses.FocalLoss", "to_onehot_y": True, "softmax": True}}
    with pytest.raises(Exception) as raised:
        ConfigParser(config).get_parsed_content("loss")
    error = raised.value.__cause__ or raised.value
    assert isinstance(error, TypeError) and isinstance(error, LossInputError)
    message = str(error)
    assert message.startswith("FocalLoss does not take softmax; it takes include_background, to_onehot_y, gamma")
    assert "use_softmax" in message and message.endswith("A working configuration: configs/losses/focal.json.")
    with pytest.raises(LossInputError, match="DiceLoss does not take gamma, use_softmax; it takes"):
        DiceLoss(gamma=2, use_softmax=True)
    assert isinstance(FocalLoss(gamma=1.0), FocalLoss)


def test_an_empty_batch_is_named():
    from ctlosses import DiceLoss, FocalLoss

    for loss in (DiceLoss(to_onehot_y=True, softmax=True), FocalLoss(to_onehot_y=True)):
        with pytest.raises(LossInputError, match=r"empty batch \(shape \(0, 3, 4, 4\)\)"):
            loss(torch.zeros(0, 3, 4, 4), torch.zeros(0, 1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("bad", [2.0, -0.5, float("nan")])
def test_a_one_hot_target_outside_0_1_is_refused(bad):
    from ctlosses import DiceLoss

    logits, labels = labels_and_logits(dtype=torch.float32)
    target = onehot(labels, 3, torch.float32)
    target[0, 1, 0, 0] = bad
    with pytest.raises(LossInputError, match=r"values in \[0, 1\], got values from .* \(class-index targets need"):
        DiceLoss(softmax=True)(logits, target)


def test_a_single_channel_target_may_hold_its_ignore_sentinel():
    from ctlosses import DiceLoss

    target = torch.tensor([[[[0.0, 1.0, 255.0, 1.0]]]])
    loss = DiceLoss(sigmoid=True, ignore_index=255)(torch.zeros(1, 1, 1, 4), target)
    assert torch.isfinite(loss)
    with pytest.raises(LossInputError, match="values in"):
        DiceLoss(sigmoid=True)(torch.zeros(1, 1, 1, 4), target)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_metatensor_batch_gives_the_plain_tensors_loss(name):
    """A bundle's trainer passes MONAI MetaTensors whose images carry different metadata (slicing such a batch can
    raise): every loss computes on plain tensors, with the same value and gradient."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 4, generator=generator)
    labels = torch.randint(0, 4, (2, 1, 6, 5, 4), generator=generator)
    meta_logits = MetaTensor(logits.clone(), meta={"filename_or_obj": ["a.nii.gz", "b.nii.gz"]})
    meta_labels = MetaTensor(labels.clone(), meta={"filename_or_obj": ["a.nii.gz", "b.nii.gz"]})
    meta_logits.is_batch = meta_labels.is_batch = True
    parameters = inspect.signature(LOSSES[name].__init__).parameters
    kwargs = {key: True for key in ("to_onehot_y", "softmax", "use_softmax") if key in parameters}
    loss = get_loss(name, **kwargs)
    meta_logits.requires_grad_(True)
    value = loss(meta_logits, meta_labels)
    value.backward()
    plain = logits.clone().requires_grad_(True)
    expected = loss(plain, labels)
    expected.backward()
    assert type(value) is torch.Tensor
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.as_tensor(meta_logits.grad), plain.grad, rtol=0, atol=0)
