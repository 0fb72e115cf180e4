"""Shared core of the segmentation losses: input checks, activation, target encoding, ignore mask,
per-class overlap statistics and reductions.

Every loss module in this package holds only its own formula and calls the functions below, so the
conventions (shapes, ``ignore_index``, ``weight``, dtype) are defined once:

- ``input`` is ``BNH[WD]`` (N classes); ``target`` is ``BNH[WD]`` (one-hot or soft) or, with
  ``to_onehot_y=True``, ``B1H[WD]`` class indices, exactly as in MONAI.
- Index targets are never expanded into a float one-hot tensor: per-class sums are gathered / scattered
  (``overlap_stats``), which keeps 3D multi-organ batches in memory.
- Everything is computed in float32 at least (float16/bfloat16 inputs are upcast), so half-precision
  logits give the float32 loss instead of MONAI's overflowing sums.
- ``ignore_index`` follows MONAI 1.6.1 (``monai.metrics.utils.create_ignore_mask``): voxels whose target
  equals it contribute nothing to any class, gradient included.
"""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

REDUCTIONS = ("none", "mean", "sum")


class LossInputError(ValueError, AssertionError):
    """A loss got an argument or tensor it cannot use.

    Derives from both ``ValueError`` and ``AssertionError`` because MONAI raises either for the same
    mistakes (``AssertionError`` for shape mismatches), so ``except`` clauses written for MONAI still work.
    """


class LossTypeError(LossInputError, TypeError):
    """An argument has the wrong type (MONAI raises ``TypeError`` for a non-callable ``other_act``)."""


# ---------------------------------------------------------------------------------------------------------
# hyperparameter validation (called from ``__init__`` so a bad config fails before training starts)


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` as one of ``"none" | "mean" | "sum"`` (accepts MONAI's ``LossReduction``)."""
    value = getattr(reduction, "value", reduction)
    if value not in REDUCTIONS:
        raise LossInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    return value


def check_range(
    name: str,
    value: float,
    low: float = -math.inf,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``float(value)`` if it lies in the given interval, else raise ``LossInputError``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LossInputError(f"{name} must be a real number, got {value!r}.") from None
    above = number >= low if low_inclusive else number > low
    below = number <= high if high_inclusive else number < high
    if not (above and below and not math.isnan(number)):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise LossInputError(f"{name} must be in {interval}, got {value!r}.")
    return number


def check_probability(name: str, value: float) -> float:
    """Return ``float(value)`` if it is in ``[0, 1]``."""
    return check_range(name, value, 0.0, 1.0)


def check_activation(sigmoid: bool, softmax: bool, other_act: Callable | None) -> None:
    """MONAI's rule: at most one of ``sigmoid``, ``softmax``, ``other_act``; ``other_act`` callable."""
    if other_act is not None and not callable(other_act):
        raise LossTypeError(f"other_act must be None or callable, got {type(other_act).__name__}.")
    if int(bool(sigmoid)) + int(bool(softmax)) + int(other_act is not None) > 1:
        raise LossInputError(
            "Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None], "
            f"got sigmoid={sigmoid}, softmax={softmax}, other_act={other_act!r}."
        )


def check_ignore_index(ignore_index: int | None) -> int | None:
    """``ignore_index`` is ``None`` or an integer (class index or sentinel such as 255 or -100); a string of digits,
    as a command line gives it, counts."""
    if ignore_index is None:
        return None
    try:
        number = int(ignore_index)  # int("2.5") fails; int(2.5) truncates, caught below
    except (TypeError, ValueError):
        number = None
    typed_as_text = isinstance(ignore_index, str)
    if number is None or isinstance(ignore_index, bool) or (not typed_as_text and number != ignore_index):
        raise LossInputError(f"ignore_index must be None or an integer, got {ignore_index!r}.")
    return number


_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


def check_flag(name: str, value) -> bool:
    """A boolean switch given as a bool, 0 / 1, or as a command line gives it (``"true"``, ``"false"``, ``"yes"``,
    ``"no"``, ``"1"``, ``"0"``, any case). Anything else is an error naming the switch: ``bool("false")`` is True,
    so ``--loss#softmax false`` would otherwise turn the softmax on."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise LossInputError(f"{name} must be true or false, got {value!r}.")


def class_weight(weight: Sequence[float] | float | torch.Tensor | None) -> torch.Tensor | None:
    """Validate a per-class ``weight`` (scalar or 1-D, all >= 0) and return it as a float32 tensor.

    Its length is checked against the number of classes at forward time by ``reduce_loss``.
    """
    if weight is None:
        return None
    try:
        tensor = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
    except (TypeError, ValueError, RuntimeError):
        raise LossInputError(f"weight must be None, a number or a sequence of numbers, got {weight!r}.") from None
    if tensor.ndim > 1:
        raise LossInputError(f"weight must be a scalar or 1-D (one value per class), got shape {tuple(tensor.shape)}.")
    if tensor.numel() == 0 or not torch.isfinite(tensor).all() or (tensor < 0).any():
        raise LossInputError(f"weight values must be finite and no less than 0, got {weight!r}.")
    return tensor


# ---------------------------------------------------------------------------------------------------------
# forward-time helpers


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_input(input: torch.Tensor) -> None:
    """``input`` must be a floating point ``BNH[WD]`` tensor."""
    if not isinstance(input, torch.Tensor):
        raise LossInputError(f"input must be a torch.Tensor of shape BNH[WD], got {type(input).__name__}.")
    if input.ndim < 3:
        raise LossInputError(f"input must have shape BNH[WD] (at least 3 dims), got shape {tuple(input.shape)}.")
    if not input.is_floating_point():
        raise LossInputError(f"input must be floating point logits or probabilities, got dtype {input.dtype}.")
    if input.shape[0] == 0:
        raise LossInputError(f"input has an empty batch (shape {tuple(input.shape)}): there is no image to score.")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (gradcheck): half precision sums over a 3D volume overflow."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(
    input: torch.Tensor, sigmoid: bool = False, softmax: bool = False, other_act: Callable | None = None
) -> torch.Tensor:
    """Apply the activation in float32 (float64 stays float64), in MONAI's order: sigmoid, softmax, other_act.

    ``softmax`` on a single channel warns and is skipped, as in MONAI.
    """
    check_input(input)
    probs = input.to(compute_dtype(input.dtype))
    if sigmoid:
        probs = torch.sigmoid(probs)
    if softmax:
        if probs.shape[1] == 1:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
        else:
            probs = torch.softmax(probs, 1)
    if other_act is not None:
        probs = other_act(probs)
        probs = probs.to(compute_dtype(probs.dtype))
    return probs


class EncodedTarget(NamedTuple):
    """A target ready for per-class statistics, flattened over space (``N`` voxels per image).

    Exactly one of ``indices`` / ``dense`` is set:

    - ``indices``: ``(B, N)`` long class indices in ``[0, C)``; ignored voxels hold a valid dummy class.
    - ``dense``: ``(B, C, N)`` one-hot or soft target in the compute dtype.

    ``mask``: ``(B, N)`` bool, True where the voxel counts, or None when nothing is ignored.
    ``mask_weight``: ``(B, N)`` float multiplier equal to ``mask`` except for soft dense targets with an
    ``ignore_index`` naming a class, where MONAI multiplies by ``1 - target[:, ignore_index]``; None when
    ``mask`` is None.
    """

    indices: torch.Tensor | None
    dense: torch.Tensor | None
    mask: torch.Tensor | None
    mask_weight: torch.Tensor | None
    num_classes: int


def encode_target(
    input: torch.Tensor, target: torch.Tensor, to_onehot_y: bool = False, ignore_index: int | None = None
) -> EncodedTarget:
    """Validate ``target`` against ``input`` (``BNH[WD]``) and encode it without a float one-hot copy.

    Args:
        input: ``BNH[WD]`` logits or probabilities (only its shape is used).
        target: ``BNH[WD]`` one-hot/soft target, or ``B1H[WD]`` class indices when ``to_onehot_y=True``.
            With a single-channel input ``to_onehot_y`` is ignored with a warning (as MONAI does).
        to_onehot_y: whether ``target`` holds class indices.
        ignore_index: label of voxels that contribute nothing. For index targets (or single-channel
            targets) the voxels equal to it; for dense multi-channel targets, MONAI's rule: voxels of class
            ``ignore_index`` if it is in ``[0, C)``, else voxels whose channels are all zero.

    Raises:
        LossInputError: shape mismatch, a channel count that fits neither one-hot nor indices, index
            labels that are not integers in ``[0, C)`` or ``ignore_index`` (value checks are skipped while
            ``torch.compiler.is_compiling()`` because they need a device sync).
    """
    check_input(input)
    if not isinstance(target, torch.Tensor):
        raise LossInputError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    num_classes = input.shape[1]
    batch_spatial = (input.shape[0], *input.shape[2:])
    if target.ndim != input.ndim or (target.shape[0], *target.shape[2:]) != batch_spatial:
        raise LossInputError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: expected "
            f"{(input.shape[0], num_classes, *input.shape[2:])} (one-hot) or {(input.shape[0], 1, *input.shape[2:])} "
            "(class indices with to_onehot_y=True)."
        )
    use_indices = to_onehot_y and num_classes > 1
    if to_onehot_y and num_classes == 1:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
    expected_channels = 1 if use_indices else num_classes
    if target.shape[1] != expected_channels:
        hint = (
            "set to_onehot_y=True for class-index targets"
            if target.shape[1] == 1
            else f"class-index targets need 1 channel, one-hot targets {num_classes}"
        )
        raise LossInputError(
            f"target has {target.shape[1]} channels but input has {num_classes} "
            f"(to_onehot_y={to_onehot_y}); expected {expected_channels}: {hint}."
        )
    batch = input.shape[0]
    if use_indices:
        return _encode_indices(target.reshape(batch, -1), num_classes, ignore_index)
    dense = target.reshape(batch, num_classes, -1).to(compute_dtype(input.dtype))
    mask, mask_weight = _dense_ignore_mask(dense, ignore_index)
    if not _is_compiling():
        _check_dense_values(dense, mask if num_classes == 1 else None)
    return EncodedTarget(None, dense, mask, mask_weight, num_classes)


def _check_dense_values(dense: torch.Tensor, mask: torch.Tensor | None) -> None:
    """A one-hot or soft target holds values in [0, 1] (a single channel's ignored voxels may hold the sentinel)."""
    values = dense if mask is None else dense[:, 0][mask]
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values)
    if not bool((low >= 0) & (high <= 1)):  # NaN fails both
        raise LossInputError(
            f"one-hot / soft target must hold values in [0, 1], got values from {low.item():g} to {high.item():g} "
            "(class-index targets need to_onehot_y=True)."
        )


def _encode_indices(labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> EncodedTarget:
    truncated = labels.long()
    mask = None if ignore_index is None else truncated != ignore_index
    # ignored voxels get class 0 so gather/scatter stay in range; the mask zeroes their contribution
    indices = truncated if mask is None else torch.where(mask, truncated, 0)
    if not _is_compiling():
        # one pass and one device sync for the common case; the details only on failure
        low, high = torch.aminmax(indices)
        valid = (low >= 0) & (high < num_classes)
        if labels.is_floating_point():
            valid &= (labels == truncated).all()
        if not bool(valid):
            bad_voxels = (truncated < 0) | (truncated >= num_classes) | (labels != truncated)
            bad = labels[bad_voxels if mask is None else bad_voxels & mask]
            raise LossInputError(
                f"class-index target must hold integers in [0, {num_classes})"
                + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
                + f", got {bad.numel()} voxels outside, e.g. {bad.unique()[:5].tolist()}."
            )
    mask_weight = None if mask is None else mask.to(torch.float32)
    return EncodedTarget(indices, None, mask, mask_weight, num_classes)


def _dense_ignore_mask(
    dense: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """MONAI 1.6.1 ``create_ignore_mask`` on a ``(B, C, N)`` target, returned as ``(B, N)``."""
    if ignore_index is None:
        return None, None
    num_classes = dense.shape[1]
    if num_classes == 1:
        mask = dense[:, 0] != ignore_index
        return mask, mask.to(dense.dtype)
    if 0 <= ignore_index < num_classes:
        weight = 1.0 - dense[:, ignore_index]
        return weight > 0, weight
    mask = dense.sum(1) > 0
    return mask, mask.to(dense.dtype)


def flatten_probs(probs: torch.Tensor) -> torch.Tensor:
    """``BNH[WD]`` -> ``(B, N, voxels)`` (a view when contiguous)."""
    return probs.reshape(probs.shape[0], probs.shape[1], -1)


# Voxels per block of ``class_sums``: a sequential float32 sum of k values is off by about k * 6e-8 of the
# total, so a scatter_add of a 128^3 patch into 2 class bins lost 1e-3 of TP and 82 % of a confident Dice loss.
# Blocks of 2048 keep each partial sum short; torch.sum adds the blocks pairwise. Faster than the single scatter
# too (fewer collisions on one bin), and on CUDA far fewer atomics on the same address.
_SUM_BLOCK = 2048


def class_sums(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Sums of ``values`` ``(B, N)`` or ``(B, R, N)`` over the voxels of each class of ``indices`` ``(B, N)``, as
    ``(B, C)`` or ``(B, R, C)``, with an error that does not grow with ``N``: per block of ``_SUM_BLOCK`` voxels,
    then over the blocks."""
    rows = values.shape[1:-1]
    batch, voxels = indices.shape
    values = values.expand(batch, *rows, voxels).reshape(batch, math.prod(rows), voxels)  # not -1: voxels may be 0
    index = indices.unsqueeze(1).expand_as(values)
    blocks = voxels // _SUM_BLOCK
    whole = blocks * _SUM_BLOCK
    sums = values.new_zeros((*values.shape[:2], num_classes))
    if blocks:
        per_block = values.new_zeros((*values.shape[:2], blocks, num_classes)).scatter_add_(
            3,
            index[..., :whole].reshape(*values.shape[:2], blocks, _SUM_BLOCK),
            values[..., :whole].reshape(*values.shape[:2], blocks, _SUM_BLOCK),
        )
        sums = per_block.sum(2)
    if whole < voxels:
        sums.scatter_add_(2, index[..., whole:], values[..., whole:])
    return sums.reshape(batch, *rows, num_classes)


# The backward of a softmax needs one temporary the size of the slice it works on; walking the volume in
# this many chunks bounds it to an eighth of the logits while keeping the number of ops small (on a busy
# CPU each op is a thread synchronisation).
_BACKWARD_CHUNKS = 8


def voxel_chunks(num_voxels: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive runs of ``size`` voxels (the last may be shorter): the one chunking of the
    package, for the fused backward here."""
    return [(start, min(start + size, num_voxels)) for start in range(0, num_voxels, size)]


def _backward_chunks(num_voxels: int) -> list[tuple[int, int]]:
    return voxel_chunks(num_voxels, max(1024, -(-num_voxels // _BACKWARD_CHUNKS)))


def _activate_into(logits: torch.Tensor, activation: str, out: torch.Tensor, mask_weight: torch.Tensor | None):
    """Write the (masked) activation of ``(B, C, N)`` logits into ``out`` without other full-size tensors."""
    if activation == "softmax":
        torch.softmax(logits, 1, dtype=out.dtype, out=out)
    elif activation == "sigmoid":
        torch.sigmoid(logits.to(out.dtype), out=out)
    else:
        out.copy_(logits)
    if mask_weight is not None:
        out.mul_(mask_weight.unsqueeze(1).to(out.dtype))
    return out


def _softmax_via_log_softmax_into(logits, indices, out: torch.Tensor, mask_weight: torch.Tensor | None):
    """Masked softmax of ``(B, C, N)`` logits written into ``out`` as exp(log-softmax), and the unmasked
    ``log p[target]`` ``(B, N)`` taken on the way: one full-size buffer holds both, one after the other."""
    torch.log_softmax(logits, 1, dtype=out.dtype, out=out)
    log_at_target = out.gather(1, indices.unsqueeze(1)).squeeze(1)
    probs = out.exp_()
    if mask_weight is not None:
        probs.mul_(mask_weight.unsqueeze(1).to(out.dtype))
    return probs, log_at_target


class _FusedIndexOverlap(torch.autograd.Function):
    """``(TP, FP, FN)`` per image and class from logits and index targets (mask m in {0, 1}), as in
    ``_index_overlap_sums``.

    With ``with_log_likelihood`` (softmax only) also ``log p[target]`` per voxel, ``(B, N)``, unmasked: the
    log-softmax is then computed once for both (a cross-entropy built on it needs no second softmax), and
    its gradient ``g_n`` (``[c = target] - p_c`` times it) is folded into the same backward.

    Memory: the forward writes the masked probabilities into one buffer, which the backward turns, in place,
    into the logits' gradient; so beyond that gradient (which any loss allocates) only per-voxel vectors and
    one eighth-size temporary exist. MONAI keeps probabilities, a one-hot target and several products of
    the same size alive. Masked voxels hold p = 0, which zeroes their gradient for every activation.
    """

    @staticmethod
    def forward(ctx, logits, indices, mask_weight, activation, power, with_log_likelihood=False):
        dtype = compute_dtype(logits.dtype)
        buffer = torch.empty(logits.shape, dtype=dtype, device=logits.device)
        if with_log_likelihood:
            probs, log_at_target = _softmax_via_log_softmax_into(logits, indices, buffer, mask_weight)
        else:
            probs = _activate_into(logits, activation, buffer, mask_weight)
        tp, fp, fn = _index_overlap_sums(probs, logits, indices, mask_weight, activation, power)
        ctx.save_for_backward(logits, indices, mask_weight)
        ctx.probs = probs if ctx.needs_input_grad[0] else None
        ctx.activation, ctx.power, ctx.with_log_likelihood = activation, power, with_log_likelihood
        return (tp, fp, fn, log_at_target) if with_log_likelihood else (tp, fp, fn)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_tp, grad_fp, grad_fn, grad_log_at_target=None):
        # .backward() may be called inside an autocast region; the gradient is computed in float32 regardless
        with torch.autocast(grad_tp.device.type, enabled=False):
            # dFP/dp_c = 1 (p^2 - [c = t]: 2p - [c = t] for power 2) off or at the target, dTP/dp_c = dFN/-dp_c
            # = [c = t]: the sum of p (or p^2) over all voxels, plus a term at each voxel's own class
            grad_pred_volume, grad_at_target = grad_fp, grad_tp - grad_fp - grad_fn
            return _FusedIndexOverlap._backward(ctx, grad_pred_volume, grad_at_target, grad_log_at_target)

    @staticmethod
    def _backward(ctx, grad_pred_volume, grad_at_target, grad_log_at_target):
        logits, indices, mask_weight = ctx.saved_tensors
        index = indices.unsqueeze(1)
        # the probabilities are turned into the gradient below
        grad, ctx.probs = ctx.probs, None
        if grad is None:  # a second backward through the same graph (retain_graph, gradcheck)
            grad = torch.empty_like(logits, dtype=grad_at_target.dtype)
            if ctx.with_log_likelihood:  # the same rounding as the first backward
                _softmax_via_log_softmax_into(logits, indices, grad, mask_weight)
            else:
                _activate_into(logits, ctx.activation, grad, mask_weight)
        at_target = grad.gather(1, index)  # (B, 1, N): p of each voxel's own class
        # d loss / d p[c, n] = volume_term[c, n] + (c == target[n]) * target_term[n], on voxels that count
        volume_coef = grad_pred_volume.unsqueeze(-1)  # (B, C, 1)
        target_term = grad_at_target.gather(1, indices).unsqueeze(1)  # (B, 1, N)
        if mask_weight is not None:
            target_term *= mask_weight.unsqueeze(1)
        if ctx.activation == "softmax":
            # p_c (dp_c - sum_k p_k dp_k); the log-likelihood adds g_n ([c = target] - p_c), which is the same
            # as adding g_n to the target's term before it enters the dot product
            target_term = at_target.mul_(target_term)
            if grad_log_at_target is not None:
                target_term += grad_log_at_target.unsqueeze(1)
            if ctx.power == 1:
                dot = torch.bmm(grad_pred_volume.unsqueeze(1), grad).add_(target_term)
            for start, stop in _backward_chunks(grad.shape[-1]):
                probs = grad[:, :, start:stop]
                if ctx.power == 1:
                    probs.mul_(volume_coef - dot[:, :, start:stop])
                else:
                    volume_term = probs * (2 * volume_coef)
                    chunk_dot = (probs * volume_term).sum(1, keepdim=True) + target_term[:, :, start:stop]
                    probs.mul_(volume_term.sub_(chunk_dot))
        elif ctx.activation == "sigmoid":
            # p (1 - p) dp
            target_term = at_target.addcmul_(at_target, at_target, value=-1).mul_(target_term)
            if ctx.power == 1:
                grad.addcmul_(grad, grad, value=-1).mul_(volume_coef)
            for start, stop in _backward_chunks(grad.shape[-1]) if ctx.power == 2 else []:
                probs = grad[:, :, start:stop]
                volume_term = probs * (2 * volume_coef)
                probs.addcmul_(probs, probs, value=-1).mul_(volume_term)
        elif ctx.power == 1:
            grad.copy_(volume_coef.expand_as(grad))
            if mask_weight is not None:
                grad *= mask_weight.unsqueeze(1)
        else:
            grad *= 2 * volume_coef  # grad holds the masked logits: d (m x)^2 / dx = 2 m x
        grad.scatter_add_(1, index, target_term)
        return grad.to(logits.dtype), None, None, None, None, None


def softmax_overlap_stats_and_log_likelihood(
    input: torch.Tensor,
    encoded: EncodedTarget,
    include_background: bool = True,
    batch: bool = False,
    squared_pred: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``activated_overlap_stats(softmax=True)`` for an index target with multi-channel logits, plus
    ``log p[target]`` ``(B, voxels)`` from the same log-softmax (unmasked), for a cross-entropy term: Dice + CE
    then cost one log-softmax and one fused backward."""
    *stats, log_at_target = _fused_index_stats(
        input, encoded, "softmax", include_background, batch, squared_pred, with_log_likelihood=True
    )
    return *stats, log_at_target


def _fused_index_stats(input, encoded, activation, include_background, batch, squared_pred, with_log_likelihood=False):
    """``(tp, fp, fn)`` of an index target through ``_FusedIndexOverlap``, plus ``log p[target]`` if asked."""
    check_input(input)
    outputs = _FusedIndexOverlap.apply(
        flatten_probs(input),
        encoded.indices,
        encoded.mask_weight,
        activation,
        2 if squared_pred else 1,
        with_log_likelihood,
    )
    stats = select_classes(outputs[:3], encoded.num_classes, include_background, batch)
    return (*stats, *outputs[3:])


def takes_fused_index_path(encoded: EncodedTarget, activation: str | None) -> bool:
    """Whether a loss takes its fused path: an index target, an activation whose gradient the path writes by hand
    (``"softmax"``, ``"sigmoid"``, or ``"none"`` for probabilities; None for ``other_act``), in eager mode (a compiled
    graph gets the plain formulas, which the compiler fuses itself)."""
    return encoded.indices is not None and activation is not None and not _is_compiling()


def activated_overlap_stats(
    input: torch.Tensor,
    encoded: EncodedTarget,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    include_background: bool = True,
    batch: bool = False,
    squared_pred: bool = False,
    soft_label: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``activate`` then ``overlap_stats``, fused for index targets so that no full-size probability
    tensor is kept (the memory-light path of the region losses); same arguments and results.
    """
    if softmax and input.shape[1] == 1:
        warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
        softmax = False
    activation = "softmax" if softmax else "sigmoid" if sigmoid else None if other_act is not None else "none"
    # with probabilities in [0, 1] and hard labels the soft-label formulation equals the product one;
    # for squared_pred it does for any value, since (p - 1)^2 - p^2 = 1 - 2p
    if takes_fused_index_path(encoded, activation) and (squared_pred or not soft_label or activation != "none"):
        return _fused_index_stats(input, encoded, activation, include_background, batch, squared_pred)
    probs = activate(input, sigmoid, softmax, other_act)
    return overlap_stats(probs, encoded, include_background, batch, squared_pred, soft_label)


def _index_overlap_sums(probs, logits, indices, mask_weight, activation: str, power: int):
    """``(TP, FP, FN)`` per image and class of masked probabilities ``(B, C, N)`` and index targets.

    For ``power=1`` each statistic is a sum of its own terms, never the difference of two large sums, from the
    confusion sums ``M[c, k]`` (``p_c`` summed over the voxels of class ``k``): ``TP_c = M[c, c]``,
    ``FP_c = sum_{k != c} M[c, k]`` and, for the softmax, ``FN_k = sum_{c != k} M[c, k]`` (``1 - p_k`` as the other
    classes' sum); ``sigmoid(-x_t)`` for the sigmoid. A confident prediction (``FP, FN << TP``) keeps float32's
    relative precision in ``FP`` and ``FN``, which decide the loss. ``power=2`` keeps MONAI's
    ``FP = sum p^2 - TP``, ``FN = |t| - TP``. One blockwise scatter of the probabilities makes ``M``.
    """
    num_classes, index = probs.shape[1], indices.unsqueeze(1)
    confusion = class_sums(probs, indices, num_classes)  # (B, C, C)
    tp = confusion.diagonal(dim1=1, dim2=2).contiguous()
    if power == 2:
        # the norm is a reduction without a squared copy (MONAI computes squared_pred the same way)
        pred_volume = torch.linalg.vector_norm(probs, 2, -1).square()
        counts = probs.new_ones((1, 1)) if mask_weight is None else mask_weight.to(probs.dtype)
        return tp, pred_volume - tp, class_sums(counts, indices, num_classes) - tp
    fp, missed_sums = off_diagonal_sums(confusion)
    if activation == "softmax":
        return tp, fp, missed_sums
    if activation == "sigmoid":
        missed = torch.sigmoid(-logits.gather(1, index).squeeze(1).to(probs.dtype))
        missed = missed if mask_weight is None else missed * mask_weight
    else:
        missed = (1 if mask_weight is None else mask_weight) - probs.gather(1, index).squeeze(1)
    return tp, fp, class_sums(missed, indices, num_classes)


def off_diagonal_sums(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of ``(B, C, C)`` confusion sums without the diagonal (summed apart, not subtracted)."""
    errors = confusion.clone()
    errors.diagonal(dim1=1, dim2=2).zero_()
    return errors.sum(2), errors.sum(1)


def overlap_stats(
    probs: torch.Tensor,
    encoded: EncodedTarget,
    include_background: bool = True,
    batch: bool = False,
    squared_pred: bool = False,
    soft_label: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class true positives, false positives and false negatives, as MONAI's ``compute_tp_fp_fn``.

    Args:
        probs: ``BNH[WD]`` activated prediction (from ``activate``).
        encoded: the target from ``encode_target``.
        include_background: if False, class 0 is dropped (with a warning for a single channel, as MONAI).
        batch: sum over the batch too, giving ``(C',)`` instead of ``(B, C')``.
        squared_pred: use squared predictions and targets (MONAI's ``ord=2``).
        soft_label: use the soft-label formulation (Wang et al. 2023, "Dice Semimetric Losses"):
            ``tp = (|p| + |t| - |p - t|) / 2``, equal to ``sum p t`` for hard labels and ``p`` in [0, 1].

    For index targets nothing of size ``B x C x N`` is built apart from what autograd needs: ``tp`` is a
    scatter_add of the probability gathered at each voxel's class, the target volume a per-class count.
    """
    probs = flatten_probs(probs)
    if encoded.indices is not None:
        tp, fp, fn = _index_stats(probs, encoded, squared_pred, soft_label)
    else:
        tp, fp, fn = _dense_stats(probs, encoded, squared_pred, soft_label)
    return select_classes((tp, fp, fn), encoded.num_classes, include_background, batch)


def _masked_sum(values: torch.Tensor, mask_weight: torch.Tensor | None) -> torch.Tensor:
    """``sum_n values[b, c, n] * mask[b, n]`` as a batched mat-vec (no ``B x C x N`` product is kept)."""
    if mask_weight is None:
        return values.sum(-1)
    return torch.bmm(values, mask_weight.to(values.dtype).unsqueeze(-1)).squeeze(-1)


def _index_stats(
    probs: torch.Tensor, encoded: EncodedTarget, squared_pred: bool, soft_label: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    indices, mask_weight = encoded.indices, encoded.mask_weight
    num_classes = encoded.num_classes
    at_target = probs.gather(1, indices.unsqueeze(1)).squeeze(1)  # (B, N): p of each voxel's own class
    counts = torch.ones_like(at_target) if mask_weight is None else mask_weight.to(probs.dtype)
    if not squared_pred and not soft_label:
        # each statistic a sum of its own terms, as on the fused path (``_index_overlap_sums``)
        masked = probs if mask_weight is None else probs * mask_weight.unsqueeze(1).to(probs.dtype)
        confusion = class_sums(masked, indices, num_classes)
        fp, _ = off_diagonal_sums(confusion)
        fn = class_sums((1 - at_target) * counts, indices, num_classes)
        return confusion.diagonal(dim1=1, dim2=2), fp, fn
    # norm formulation: |p - t|^k differs from |p|^k only at target voxels, so correct there
    target_volume = class_sums(counts, indices, num_classes)
    power = 2 if squared_pred else 1
    pred_volume = _masked_sum(probs.abs().pow(power) if power == 2 else probs.abs(), mask_weight)
    correction = ((at_target - 1).abs().pow(power) - at_target.abs().pow(power)) * counts
    tp = (target_volume - class_sums(correction, indices, num_classes)) / 2
    return tp, pred_volume - tp, target_volume - tp


def _dense_stats(
    probs: torch.Tensor, encoded: EncodedTarget, squared_pred: bool, soft_label: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    target = encoded.dense
    if encoded.mask_weight is not None:
        # MONAI multiplies both tensors by the (B, 1, N) mask
        weight = encoded.mask_weight.unsqueeze(1)
        probs, target = probs * weight, target * weight
    if not squared_pred and not soft_label:
        tp = (probs * target).sum(-1)
        return tp, probs.sum(-1) - tp, target.sum(-1) - tp
    power = 2 if squared_pred else 1
    pred_volume = probs.abs().pow(power).sum(-1)
    target_volume = target.abs().pow(power).sum(-1)
    tp = (pred_volume + target_volume - (probs - target).abs().pow(power).sum(-1)) / 2
    return tp, pred_volume - tp, target_volume - tp


WITHOUT_BACKGROUND_HINT = "with include_background=False the weight must not include the background class 0"


def check_weight_length(
    weight: torch.Tensor | None, num_classes: int, hint: str = WITHOUT_BACKGROUND_HINT, single_class_ok: bool = True
) -> torch.Tensor | None:
    """``weight`` if it is a number or holds one value per class, else a ``LossInputError`` that says so (with
    ``hint``). ``single_class_ok=False``: MONAI's FocalLoss also refuses a per-class weight for one channel."""
    if weight is None or weight.ndim == 0:
        return weight
    if weight.numel() != num_classes or (num_classes == 1 and not single_class_ok):
        classes = f"{num_classes} class" if num_classes == 1 else f"{num_classes} classes"
        raise LossInputError(f"weight has {weight.numel()} values but the loss has {classes} ({hint}).")
    return weight


def apply_class_weight(per_class: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Multiply the last (class) axis by ``weight``, as MONAI's DiceLoss: skipped for a single class."""
    num_classes = per_class.shape[-1]
    if weight is None or num_classes == 1:
        return per_class
    return per_class * check_weight_length(weight, num_classes).to(per_class)


def reduce_loss(
    per_class: torch.Tensor,
    reduction: str,
    weight: torch.Tensor | None = None,
    spatial_dims: int | None = None,
    counted: torch.Tensor | None = None,
    voxel_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one finishing step of every loss: weight, keep what counts, reduce a ``(B, C')`` per-class loss (or
    ``(C',)`` with ``batch=True``; ``(1, C')`` for a batch-pooled Lovasz problem).

    Args:
        per_class: the loss of each image and class (for a voxel-wise loss: its mean over the voxels that count).
        reduction: ``"mean"`` (over images and classes), ``"sum"`` or ``"none"``.
        weight: from ``class_weight``; multiplies each class' loss (no renormalisation, as MONAI).
        spatial_dims: for ``"none"``, append this many singleton axes (MONAI's DiceLoss returns
            ``BN1[11]`` so the result broadcasts against the input); None keeps ``(B, C')`` (MONAI's Tversky).
        counted: ``(B, C')`` 0/1, the entries that count (Lovasz-softmax's classes present): the others give 0, and
            ``"mean"`` averages the counted classes of each image (0 for an image with none), then the images.
        voxel_counts: ``(B, 1)`` voxels that count per image. ``"mean"`` is then the total over every voxel and class
            divided by these voxels, not by voxels x classes: MONAI's FocalLoss mean with a mask, and torch's
            (weighted) cross-entropy mean with ``per_class`` ``(B, 1)`` and the weights in the counts.
    """
    loss = apply_class_weight(per_class, weight)
    if counted is not None:
        loss = loss * counted  # a product, not a mask: NaN stays visible
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        if voxel_counts is not None:
            return (loss * voxel_counts).sum() / voxel_counts.sum().clamp_min(torch.finfo(torch.float32).eps)
        if counted is not None:
            return (loss.sum(-1) / counted.sum(-1).clamp_min(1)).mean()
        return loss.mean()
    if reduction == "none":
        return loss if spatial_dims is None else loss.reshape(*loss.shape, *([1] * spatial_dims))
    raise LossInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def per_voxel_mean(total: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    """``total / voxels``, 0 (not NaN) where no voxel counts, so an all-ignored image has a zero gradient."""
    return total / voxels.clamp_min(torch.finfo(torch.float32).eps)


def first_class(num_classes: int, include_background: bool) -> int:
    """The first class a loss keeps: 1 without the background, except for one channel (MONAI warns and keeps it)."""
    if include_background:
        return 0
    if num_classes == 1:
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=4)
        return 0
    return 1


def select_classes(sums, num_classes: int, include_background: bool = True, batch: bool = False) -> tuple:
    """Drop the background from ``(B, C)`` per-class sums (``(B, 1)`` ones pass as they are) and, with ``batch``,
    pool them over the images: the same selection for the statistics of every loss."""
    first = first_class(num_classes, include_background)
    if first:
        sums = [total if total.shape[-1] == 1 else total[:, first:] for total in sums]
    if batch:
        sums = [total.sum(0) for total in sums]
    return tuple(sums)


def safe_pow(base: torch.Tensor, exponent: float) -> torch.Tensor:
    """``max(base, 0) ** exponent`` with a zero (not infinite) gradient at 0 and NaN kept as NaN.

    For ``exponent < 1`` the derivative of ``x ** exponent`` is infinite at 0, which a perfect prediction
    reaches exactly; the ``where`` routes those entries through a constant instead.
    """
    base = base.clamp_min(0)
    positive = base > 0
    powered = torch.where(positive, base, torch.ones_like(base)).pow(exponent)
    return torch.where(positive, powered, base * 0)  # base * 0 keeps NaN (non-finite logits stay visible)


def plain_tensor(value):
    """A tensor subclass (MONAI's ``MetaTensor``, what a bundle's trainer passes) as a plain ``torch.Tensor`` view,
    still in the autograd graph; anything else as it is. A ``MetaTensor`` derives metadata on every operation and
    refuses some indexing of a batch whose images' metadata differ, which the losses need none of."""
    if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor:
        return value.as_subclass(torch.Tensor)
    return value


def _preset_path(loss_class: type) -> str:
    """``configs/losses/<registry name>.json`` of a loss class (the package's registry, read when needed)."""
    registry = importlib.import_module(__package__).LOSSES
    names = [name for name, registered in registry.items() if registered is loss_class]
    return f"configs/losses/{names[0]}.json" if names else "the presets in configs/losses/"


class SegmentationLoss(torch.nn.Module):
    """Base of every loss in this package: MONAI's common switches, the class-weight buffer, the forward that
    encodes the target and computes in float32 with autocast off, and the one finishing step (``reduce_loss``).

    A subclass implements ``compute(input, encoded)``, ending in ``self.finish(...)``.

    Args:
        include_background: if False, channel 0 (background) is excluded. Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices. Defaults to False.
        reduction: ``"none" | "mean" | "sum"``. Defaults to ``"mean"``.
        weight: per-class weight (scalar or one value per used class). Defaults to None.
        ignore_index: target label whose voxels contribute nothing. Defaults to None.
    """

    #: with ``reduction="none"``: MONAI's DiceLoss appends singleton spatial axes, its TverskyLoss does not
    none_keeps_spatial_axes = False

    def __new__(cls, *args, **kwargs):
        # before __init__, so that a swapped config (--loss#_target_ ... with the old loss' arguments) gets one
        # message naming what this loss takes, not Python's "unexpected keyword argument"
        accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise LossTypeError(
                f"{cls.__name__} does not take {', '.join(unknown)}; it takes {', '.join(accepted)}. "
                f"A working configuration: {_preset_path(cls)}."
            )
        return super().__new__(cls)

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        reduction: str = "mean",
        weight: Sequence[float] | float | torch.Tensor | None = None,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.include_background = check_flag("include_background", include_background)
        self.to_onehot_y = check_flag("to_onehot_y", to_onehot_y)
        self.reduction = check_reduction(reduction)
        self.ignore_index = check_ignore_index(ignore_index)
        self.class_weight: torch.Tensor | None
        self.register_buffer("class_weight", class_weight(weight))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``BNH[WD]`` logits or probabilities (N classes), any floating dtype.
            target: ``BNH[WD]`` one-hot or soft target, or ``B1H[WD]`` class indices with ``to_onehot_y``.

        Returns:
            a scalar for ``"mean"``/``"sum"``, or the unreduced loss for ``"none"`` (shapes in each class'
            docstring). Always float32 (float64 for float64 input), a plain ``torch.Tensor``.
        """
        input, target = plain_tensor(input), plain_tensor(target)
        encoded = encode_target(input, target, self.to_onehot_y, self.ignore_index)
        # autocast would run the sums (bmm, einsum) in half precision: every loss is float32 by design
        with torch.autocast(input.device.type, enabled=False):
            return self.compute(input, encoded)

    def compute(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, per_class: torch.Tensor, input_ndim: int, **options) -> torch.Tensor:
        """``reduce_loss`` with this loss' reduction and class weight; ``"none"`` keeps singleton spatial axes
        where MONAI does (``none_keeps_spatial_axes``). ``options``: ``reduce_loss``'s ``counted`` and
        ``voxel_counts``, or ``weight`` to replace the class weight (None where a loss applied it itself)."""
        spatial_dims = input_ndim - 2 if self.none_keeps_spatial_axes else None
        weight = options.pop("weight", self.class_weight)
        return reduce_loss(per_class, self.reduction, weight, spatial_dims, **options)


class RegionLoss(SegmentationLoss):
    """Base of the overlap losses (Dice, Jaccard, Tversky, Focal Tversky, Generalised Dice, Combo): holds MONAI's
    switches and turns ``(input, target)`` into per-class ``(tp, fp, fn)``; a subclass only defines
    ``per_class_loss`` (Combo, whose cross-entropy needs more sums, overrides ``compute`` instead).

    Args:
        include_background: if False, channel 0 (background) is excluded. Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices. Defaults to False.
        sigmoid / softmax / other_act: activation applied to ``input`` (at most one). Defaults to none.
        reduction: ``"none" | "mean" | "sum"``. Defaults to ``"mean"``.
        smooth_nr / smooth_dr: added to numerator / denominator. Defaults to 1e-5.
        batch: sum the statistics over the batch before dividing. Defaults to False.
        weight: per-class weight (scalar or one value per used class). Defaults to None.
        soft_label: soft-label formulation of the statistics. Defaults to False.
        ignore_index: target label whose voxels contribute nothing. Defaults to None.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        soft_label: bool = False,
        ignore_index: int | None = None,
        squared_pred: bool = False,
    ) -> None:
        super().__init__(include_background, to_onehot_y, reduction, weight, ignore_index)
        self.sigmoid = check_flag("sigmoid", sigmoid)
        self.softmax = check_flag("softmax", softmax)
        check_activation(self.sigmoid, self.softmax, other_act)
        self.other_act = other_act
        self.smooth_nr = check_range("smooth_nr", smooth_nr, 0.0)
        self.smooth_dr = check_range("smooth_dr", smooth_dr, 0.0)
        self.batch = check_flag("batch", batch)
        self.soft_label = check_flag("soft_label", soft_label)
        self.squared_pred = check_flag("squared_pred", squared_pred)

    def per_class_loss(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        """The per-class loss ``(B, N')`` (``(N',)`` with ``batch=True``) of the statistics, reduced."""
        tp, fp, fn = activated_overlap_stats(
            input,
            encoded,
            self.sigmoid,
            self.softmax,
            self.other_act,
            self.include_background,
            self.batch,
            self.squared_pred,
            self.soft_label,
        )
        return self.finish(self.per_class_loss(tp, fp, fn), input.ndim)
