"""Combo loss (Taghanaki et al. 2019): a weighted cross-entropy, whose ``beta`` trades false negatives against
false positives, plus the Dice loss, mixed by ``alpha``. Log-probabilities come from log-sigmoid / log-softmax,
so the loss and its gradient are finite for any finite logits."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .core import (
    EncodedTarget,
    RegionLoss,
    activate,
    check_input,
    check_probability,
    compute_dtype,
    encode_target,
    flatten_probs,
    overlap_stats,
    reduce_loss,
)
from .dice import dice_loss


def log1m_softmax(log_probs: torch.Tensor) -> torch.Tensor:
    """``log(1 - p_c)`` from ``log p_c = log_softmax(x)_c`` over dim 1, finite for finite logits.

    ``1 - p_c`` cancels to 0 in float32 once ``p_c`` rounds to 1. Only a class with ``p_c > 1/2`` can come close,
    and a voxel has at most one: there ``log(1 - p_c) = logsumexp_{j != c} log p_j`` instead.
    """
    half = -math.log(2.0)
    dominant = log_probs > half
    others = log_probs.masked_fill(dominant, -math.inf).logsumexp(1, keepdim=True)
    # the clamp only touches the dominant class, whose value is replaced; it keeps that entry's gradient finite
    rest = torch.log1p(-log_probs.clamp_max(half).exp())
    return torch.where(dominant, others, rest)


def log_likelihoods(
    input: torch.Tensor, sigmoid: bool, softmax: bool, other_act: Callable | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, log p, log(1 - p))`` of ``BNH[WD]`` input as ``(B, N, voxels)`` in float32 (float64 kept).

    Logits (``sigmoid`` / ``softmax``) give exact log-probabilities; probabilities (no activation or
    ``other_act``) are clamped to the smallest normal float before the log, so 0 and 1 stay finite.
    """
    if sigmoid or (softmax and input.shape[1] > 1):
        logits = flatten_probs(activate(input))  # activate() without a switch: checks and upcasts only
        if sigmoid:
            return torch.sigmoid(logits), F.logsigmoid(logits), F.logsigmoid(-logits)
        log_p = logits.log_softmax(1)
        return log_p.exp(), log_p, log1m_softmax(log_p)
    probs = flatten_probs(activate(input, softmax=softmax, other_act=other_act))
    tiny = torch.finfo(probs.dtype).tiny
    return probs, probs.clamp_min(tiny).log(), (1 - probs).clamp_min(tiny).log()


def weighted_cross_entropy_sums(
    log_p: torch.Tensor, log_1mp: torch.Tensor, encoded: EncodedTarget, beta: float
) -> torch.Tensor:
    """Per image and class ``-sum_i [beta t_i log p_i + (1 - beta)(1 - t_i) log(1 - p_i)]`` over the voxels that
    count (Taghanaki et al. 2019, eq. 3 before the 1/N), ``(B, C)``; each class is a one-vs-rest problem.

    For index targets the ``t = 0`` term is summed over every voxel and corrected at each voxel's own class
    by gather / scatter_add, so no one-hot copy is built.
    """
    mask = None if encoded.mask_weight is None else encoded.mask_weight.to(log_p)
    if encoded.indices is None:
        target = encoded.dense
        per_voxel = beta * target * log_p + (1 - beta) * (1 - target) * log_1mp
        return -(per_voxel.sum(-1) if mask is None else torch.einsum("bcn,bn->bc", per_voxel, mask))
    return _index_cross_entropy_sums(log_p, log_1mp, encoded.indices, mask, beta)


def _index_cross_entropy_sums(log_p, log_1mp, labels, mask, beta: float) -> torch.Tensor:
    negatives = log_1mp.sum(-1) if mask is None else torch.einsum("bcn,bn->bc", log_1mp, mask)
    at_label = (beta * log_p.gather(1, labels.unsqueeze(1)) - (1 - beta) * log_1mp.gather(1, labels.unsqueeze(1)))
    at_label = at_label.squeeze(1) if mask is None else at_label.squeeze(1) * mask
    return -((1 - beta) * negatives + torch.zeros_like(negatives).scatter_add(1, labels, at_label))


def _chunk_sums(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, softmax: bool, beta: float):
    """``(3, B, C)``: predicted volume, TP and weighted-CE sum of one voxel chunk of logits with index labels."""
    log_p, log_1mp, probs = _chunk_likelihoods(logits, softmax)
    pred_volume = probs.sum(-1) if mask is None else torch.bmm(probs, mask.unsqueeze(-1)).squeeze(-1)
    at_label = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    tp = torch.zeros_like(pred_volume).scatter_add(1, labels, at_label if mask is None else at_label * mask)
    return torch.stack((pred_volume, tp, _index_cross_entropy_sums(log_p, log_1mp, labels, mask, beta)))


def _chunk_likelihoods(logits: torch.Tensor, softmax: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p, log(1 - p), p)`` of a ``(B, C, n)`` chunk of logits."""
    if softmax:
        log_p = logits.log_softmax(1)
        return log_p, log1m_softmax(log_p), log_p.exp()
    return F.logsigmoid(logits), F.logsigmoid(-logits), torch.sigmoid(logits)


def _chunk_grad(logits, labels, mask, softmax: bool, beta: float, grad_sums: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum(grad_sums * _chunk_sums(...))`` w.r.t. a ``(B, C, n)`` chunk, written out by hand:
    a few large ops instead of autograd's graph of many small ones.

    With ``G_v, G_tp, G_ce`` the upstream gradients of the three sums (``(B, C)``), mask ``m`` and the one-vs-rest
    CE weight ``h_c = -(1 - beta) m G_ce_c`` on the classes other than the label ``y`` (0 at ``y``):

        dL/dp_c      = m G_v_c + [c = y] m G_tp_c
        dL/dlog p_y  = -beta m G_ce_y
        dL/dlog(1 - p_c) = h_c
    """
    log_p, log_1mp, probs = _chunk_likelihoods(logits, softmax)
    index = labels.unsqueeze(1)
    grad_volume, grad_tp, grad_ce = (g.unsqueeze(-1) for g in grad_sums)  # (B, C, 1) each
    negative = (grad_ce * (beta - 1)).expand_as(logits) if mask is None else (grad_ce * (beta - 1)) * mask.unsqueeze(1)
    negative = negative.scatter(1, index, 0.0)  # h: the label's own class has no negative term
    label_grad_tp, label_grad_ce = (g.squeeze(-1).gather(1, labels).unsqueeze(1) for g in (grad_tp, grad_ce))
    at_label = label_grad_tp * probs.gather(1, index) - beta * label_grad_ce  # (B, 1, n)
    if mask is not None:
        at_label = at_label * mask.unsqueeze(1)
    if not softmax:
        # d p / dx = p (1 - p), d log p / dx = 1 - p, d log(1 - p) / dx = -p
        grad = probs * (1 - probs) * (grad_volume if mask is None else grad_volume * mask.unsqueeze(1))
        grad -= negative * probs
        # at_label holds the label's dL/dp * p and dL/dlog p: both times (1 - p_y) through the sigmoid
        return grad.scatter_add_(1, index, at_label * (1 - probs.gather(1, index)))
    # gradient w.r.t. log p first, then through log-softmax: dL/dx_j = g_j - p_j sum_k g_k.
    # log(1 - p_c) = log1p(-exp(log p_c)) has d/dlog p_c = -p_c / (1 - p_c) <= 1 where p_c <= 1/2; for the (at most
    # one) dominant class d it is logsumexp_{k != d} log p_k, with d/dlog p_k = p_k / (1 - p_d) <= 1: both bounded,
    # so saturated logits give finite gradients (as log1m_softmax's own autograd does).
    dominant = log_p > -math.log(2.0)
    dominant_weight = (negative * dominant).sum(1, keepdim=True)  # h_d, 0 without a dominant class
    dominant_log_1mp = (log_1mp * dominant).sum(1, keepdim=True)  # log(1 - p_d)
    grad_log_p = probs * (grad_volume if mask is None else grad_volume * mask.unsqueeze(1))
    log_1mp.sub_(log_p).neg_().exp_()  # p_c / (1 - p_c)
    others = (log_p - dominant_log_1mp).exp_().mul_(dominant_weight)  # h_d p_k / (1 - p_d)
    grad_log_p += torch.where(dominant, 0.0, others.sub_(log_1mp.mul_(negative)))
    grad_log_p.scatter_add_(1, index, at_label)
    return grad_log_p.sub_(probs.mul_(grad_log_p.sum(1, keepdim=True)))


# voxels per chunk of the memory-light path: bounds its temporaries to a few MB whatever the volume
_CHUNK_ELEMENTS = 1 << 19


class _ChunkedIndexSums(torch.autograd.Function):
    """``_chunk_sums`` over the whole volume, one chunk at a time, and recomputed chunk by chunk in backward with
    the hand-written gradient of ``_chunk_grad``: the only full-size tensor kept or built is the logits' gradient
    (no probabilities, logs or one-hot)."""

    @staticmethod
    def forward(ctx, logits, labels, mask, softmax, beta):
        step = max(1024, _CHUNK_ELEMENTS // (logits.shape[0] * logits.shape[1]))
        ctx.save_for_backward(logits, labels, mask)
        ctx.softmax, ctx.beta, ctx.step = softmax, beta, step
        total = None
        for chunk, chunk_labels, chunk_mask in _chunks(logits, labels, mask, step):
            sums = _chunk_sums(chunk, chunk_labels, chunk_mask, softmax, beta)
            total = sums if total is None else total + sums
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums):
        logits, labels, mask = ctx.saved_tensors
        grad = torch.empty_like(logits)
        with torch.autocast(logits.device.type, enabled=False):
            grad_sums = grad_sums.to(compute_dtype(logits.dtype))
            for start, (chunk, chunk_labels, chunk_mask) in zip(
                range(0, logits.shape[-1], ctx.step), _chunks(logits, labels, mask, ctx.step)
            ):
                chunk_grad = _chunk_grad(chunk, chunk_labels, chunk_mask, ctx.softmax, ctx.beta, grad_sums)
                grad[:, :, start : start + ctx.step] = chunk_grad
        return grad, None, None, None, None


def _chunks(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, step: int):
    """``(logits, labels, mask)`` of each run of ``step`` voxels, logits in the compute dtype, mask as its float."""
    dtype = compute_dtype(logits.dtype)
    for start in range(0, logits.shape[-1], step):
        stop = start + step
        yield (
            logits[:, :, start:stop].to(dtype).contiguous(),
            labels[:, start:stop],
            None if mask is None else mask[:, start:stop].to(dtype),
        )


def combo_sums(
    input: torch.Tensor, encoded: EncodedTarget, sigmoid: bool, softmax: bool, other_act: Callable | None, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(TP, FP, FN, wCE sum)`` per image and class ``(B, C)`` over the voxels that count.

    Index targets with a sigmoid / softmax take the chunked path (eager mode; a compiled graph gets the plain
    formulas, which the compiler fuses itself); everything else the plain path.
    """
    mask = encoded.mask_weight
    softmax = softmax and input.shape[1] > 1
    if encoded.indices is not None and (sigmoid or softmax) and not torch.compiler.is_compiling():
        check_input(input)
        pred_volume, tp, cross_entropy = _ChunkedIndexSums.apply(
            flatten_probs(input), encoded.indices, mask, softmax, beta
        )
        counts = torch.ones_like(encoded.indices, dtype=tp.dtype) if mask is None else mask.to(tp)
        target_volume = torch.zeros_like(tp).scatter_add(1, encoded.indices, counts)
        return tp, pred_volume - tp, target_volume - tp, cross_entropy
    probs, log_p, log_1mp = log_likelihoods(input, sigmoid, softmax, other_act)
    tp, fp, fn = overlap_stats(probs, encoded)
    return tp, fp, fn, weighted_cross_entropy_sums(log_p, log_1mp, encoded, beta)


class ComboLoss(RegionLoss):
    """Combo loss of Taghanaki et al. (2019): per image and class (over the batch too with ``batch=True``)

        L_c = alpha * wCE_c + (1 - alpha) * (1 - Dice_c)

        wCE_c  = -(1/M) sum_i [beta t_ic log p_ic + (1 - beta)(1 - t_ic) log(1 - p_ic)]
        Dice_c = (2 TP_c + smooth_nr) / (2 TP_c + FP_c + FN_c + smooth_dr)

    over the M voxels that count, then weighted by ``weight`` and reduced over images and classes. ``beta > 0.5``
    weighs the positive term, so it penalises false negatives more (recall); ``beta < 0.5`` false positives.

    Sign convention: the paper (eq. 3) writes ``alpha * wCE - (1 - alpha) * sum_c Dice_c``; we use the Dice loss
    ``1 - Dice_c`` and average over classes, so for one class ``L = L_paper + (1 - alpha)``: the same gradient,
    and the loss is >= 0 and comparable with ``DiceLoss``. The paper's add-one smoothing is ``smooth_nr =
    smooth_dr = 1``; the defaults here are MONAI's 1e-5. Each channel is a one-vs-rest binary problem, with ``p``
    from a sigmoid per channel or a softmax over channels; ``log p`` and ``log(1 - p)`` come from log-sigmoid /
    log-softmax, so the loss is finite for any finite logits (the seed post's ``clamp(p, 1e-9, 1 - 1e-9)`` is not:
    ``1 - 1e-9`` rounds to 1 in float32, so a saturated sigmoid gives ``log(0)``).

    ``input`` is ``BNH[WD]``; ``target`` ``BNH[WD]`` (one-hot or soft) or ``B1H[WD]`` class indices with
    ``to_onehot_y=True`` (never one-hot encoded here: gather / scatter_add).

    Reference:
        Taghanaki, S. A. et al. (2019) Combo loss: Handling input and output imbalance in multi-organ
        segmentation. Computerized Medical Imaging and Graphics 75, 24-33. https://arxiv.org/abs/1805.02798

    Args:
        include_background: if False, channel 0 is excluded (after the softmax, as in ``DiceLoss``). Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices. Defaults to False.
        sigmoid: ``input`` is logits, one sigmoid per channel. Defaults to False.
        softmax: ``input`` is logits, softmax over channels. Defaults to False.
        other_act: another callable giving probabilities (its logs are clamped at the smallest normal float).
            Defaults to None. At most one of the three; with none, ``input`` must be probabilities.
        alpha: weight of the cross-entropy term, in [0, 1]; ``1 - alpha`` weighs the Dice loss. Defaults to 0.5.
        beta: weight of the positive (false-negative) term of the cross-entropy, in [0, 1]; ``1 - beta`` weighs
            the negative (false-positive) term. Defaults to 0.5 (plain BCE, halved).
        reduction: ``"none"`` (``BN'1[11]``, or ``N'1[11]`` with ``batch``), ``"mean"`` or ``"sum"``.
            Defaults to ``"mean"``.
        smooth_nr: added to the Dice numerator. Defaults to 1e-5.
        smooth_dr: added to the Dice denominator. Defaults to 1e-5.
        batch: pool Dice statistics and cross-entropy over the batch. Defaults to False.
        weight: per-class weight (a number or one value >= 0 per class used). Defaults to None.
        ignore_index: voxels whose target equals it count in neither term, gradient included. Defaults to None.

    Raises:
        LossInputError: (a ``ValueError``) for alpha or beta outside [0, 1], a bad reduction, weight or
            activation combination, mismatched shapes or labels outside ``[0, N)``.
    """

    none_keeps_spatial_axes = True

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            weight=weight,
            ignore_index=ignore_index,
        )
        self.alpha = check_probability("alpha", alpha)
        self.beta = check_probability("beta", beta)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``BNH[WD]`` logits (with ``sigmoid`` / ``softmax``) or probabilities, any floating dtype.
            target: ``BNH[WD]`` one-hot or soft target, or ``B1H[WD]`` class indices with ``to_onehot_y``.

        Returns:
            a scalar, or the per-class loss ``BN'1[11]`` (``N'1[11]`` with ``batch``) for ``"none"``.
        """
        # autocast would run the masked sums (einsum) in half precision: the loss is float32 by design
        with torch.autocast(input.device.type, enabled=False):
            return self._forward(input, target)

    def _forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        encoded = encode_target(input, target, self.to_onehot_y, self.ignore_index)
        tp, fp, fn, cross_entropy = combo_sums(input, encoded, self.sigmoid, self.softmax, self.other_act, self.beta)
        if not self.include_background:
            if encoded.num_classes == 1:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=2)
            else:
                tp, fp, fn, cross_entropy = tp[:, 1:], fp[:, 1:], fn[:, 1:], cross_entropy[:, 1:]
        if encoded.mask_weight is None:
            counted = torch.full_like(cross_entropy[:, :1], math.prod(input.shape[2:]))
        else:
            counted = encoded.mask_weight.sum(-1, keepdim=True).to(cross_entropy)
        if self.batch:
            tp, fp, fn = tp.sum(0), fp.sum(0), fn.sum(0)
            cross_entropy, counted = cross_entropy.sum(0), counted.sum(0)
        # an image (or batch) with every voxel ignored has a zero sum: 0 / eps = 0, not NaN
        cross_entropy = cross_entropy / counted.clamp_min(torch.finfo(torch.float32).eps)
        dice = dice_loss(tp, fp, fn, smooth_nr=self.smooth_nr, smooth_dr=self.smooth_dr)
        per_class = self.alpha * cross_entropy + (1 - self.alpha) * dice
        return reduce_loss(per_class, self.reduction, self.class_weight, input.ndim - 2)
