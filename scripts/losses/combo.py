"""Combo loss (Taghanaki et al. 2019): a weighted cross-entropy, whose ``beta`` trades false negatives against
false positives, plus the Dice loss, mixed by ``alpha``. Log-probabilities come from log-sigmoid / log-softmax,
so the loss and its gradient are finite for any finite logits."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .core import (
    EncodedTarget,
    RegionLoss,
    activate,
    check_input,
    check_probability,
    class_sums,
    compute_dtype,
    flatten_probs,
    off_diagonal_sums,
    overlap_stats,
    per_voxel_mean,
    select_classes,
    takes_fused_index_path,
    voxel_chunks,
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
    # each voxel's own class is left out of the negatives rather than subtracted again: for a confident voxel
    # its log(1 - p) is large, and removing it from the sum would cancel most of float32's digits (times 0, not
    # 0: a non-finite value there, from a non-finite logit, still makes the loss non-finite)
    index = labels.unsqueeze(1)
    others = log_1mp.scatter(1, index, log_1mp.gather(1, index) * 0)
    negatives = others.sum(-1) if mask is None else torch.einsum("bcn,bn->bc", others, mask)
    at_label = beta * log_p.gather(1, index).squeeze(1)
    at_label = at_label if mask is None else at_label * mask
    return -((1 - beta) * negatives + class_sums(at_label, labels, log_p.shape[1]))


# below this sum of the non-dominant probabilities, log of it loses digits (or is log 0): those voxels take the
# exact logsumexp of the log-probabilities instead (logits more than ~60 apart, rare)
_TINY_REST = 1e-25


def _chunk_likelihoods(
    logits: torch.Tensor, softmax: bool, probs_out: torch.Tensor, rest_out: torch.Tensor | None, exact_tiny: bool
):
    """``(log p, log(1 - p))`` of a ``(B, C, n)`` chunk of logits; ``p`` is written into ``probs_out`` and, for the
    softmax, ``log(1 - p_d)`` of each voxel's dominant class (``p_d > 1/2``, at most one) into ``rest_out``.

    ``1 - p_c`` cancels once ``p_c`` rounds to 1, which only the dominant class can: its ``log(1 - p_d)`` is the log
    of the other classes' sum, ``log1p(-p_c)`` is accurate for every other class. Where that sum is below
    ``_TINY_REST`` its log comes from the log-probabilities instead, if ``exact_tiny`` (else it may be -inf).
    """
    if not softmax:
        torch.sigmoid(logits, out=probs_out)
        return F.logsigmoid(logits), F.logsigmoid(-logits)
    log_p = logits.log_softmax(1)
    probs = torch.exp(log_p, out=probs_out)
    dominant = probs > 0.5
    rest = torch.where(dominant, 0.0, probs).sum(1, keepdim=True)
    log_rest = rest.log()
    tiny = rest < _TINY_REST if exact_tiny else None
    if exact_tiny and tiny.any():
        exact = log_p.masked_fill(dominant, -math.inf).logsumexp(1, keepdim=True)
        log_rest = torch.where(tiny, exact, log_rest)
    rest_out.copy_(log_rest)
    return log_p, torch.where(dominant, log_rest, torch.log1p(-probs))


def _chunk_sums(logits, labels, mask, softmax: bool, beta: float, probs_out, rest_out, exact_tiny) -> torch.Tensor:
    """``(4, B, C)``: FP, TP, FN and weighted-CE sum of one voxel chunk of logits with index labels.

    TP, FP and FN come from the confusion sums as in ``core._index_overlap_sums``, each a sum of its own terms."""
    log_p, log_1mp = _chunk_likelihoods(logits, softmax, probs_out, rest_out, exact_tiny)
    probs = probs_out if mask is None else probs_out * mask.unsqueeze(1)
    confusion = class_sums(probs, labels, logits.shape[1])
    tp = confusion.diagonal(dim1=1, dim2=2)
    fp, fn = off_diagonal_sums(confusion)
    if not softmax:
        missed = torch.sigmoid(-logits.gather(1, labels.unsqueeze(1)).squeeze(1))
        fn = class_sums(missed if mask is None else missed * mask, labels, logits.shape[1])
    return torch.stack((fp, tp, fn, _index_cross_entropy_sums(log_p, log_1mp, labels, mask, beta)))


def _chunk_grad_(
    probs, log_rest, logits, labels, mask, softmax: bool, beta: float, grad_sums, any_tiny: bool = True
) -> torch.Tensor:
    """Turn a chunk's probabilities ``probs`` ``(B, C, n)``, in place, into the gradient of
    ``sum(grad_sums * (predicted volume, TP, weighted-CE sums))`` w.r.t. its logits, written out by hand: a few
    large ops and no logarithm or exponential for the softmax (``log(1 - p_d)`` was kept from the forward).

    With ``G_v, G_tp, G_ce`` the upstream gradients of the three sums (``(B, C)``), mask ``m``, the label ``y`` and
    ``A_c = (1 - beta) m G_ce_c`` for ``c != y`` (0 at ``y``):

        dL/dp_c = m G_v_c + [c = y] m G_tp_c,  dL/dlog p_y = -beta m G_ce_y,  dL/dlog(1 - p_c) = -A_c

    ``any_tiny`` False says (from one check over the whole volume) that no voxel needs the log-space term below.
    """
    index = labels.unsqueeze(1)
    mask = None if mask is None else mask.unsqueeze(1)
    grad_volume, grad_tp, grad_ce = grad_sums
    label_p = probs.gather(1, index)
    at_label = grad_tp.gather(1, labels).unsqueeze(1) * label_p - beta * grad_ce.gather(1, labels).unsqueeze(1)
    volume = grad_volume.unsqueeze(-1) if mask is None else grad_volume.unsqueeze(-1) * mask
    negative = ((1 - beta) * grad_ce).unsqueeze(-1)
    negative = (negative.expand_as(probs) if mask is None else negative * mask).scatter(1, index, 0.0)  # A
    if mask is not None:
        at_label *= mask
    if not softmax:
        # dp/dx = p (1 - p), dlog p/dx = 1 - p, dlog(1 - p)/dx = -p
        grad = probs.mul_(volume * (1 - probs) + negative)
        return grad.scatter_add_(1, index, at_label * (1 - label_p))
    # dL/dlog p_k, then through log-softmax: dL/dx_k = g_k - p_k sum_j g_j.
    # dlog(1 - p_c)/dlog p_c = -p_c / (1 - p_c) for a non-dominant c (bounded by 1); for the dominant d,
    # log(1 - p_d) = log sum_{k != d} p_k, so dlog(1 - p_d)/dlog p_k = p_k / (1 - p_d) (bounded by 1) for k != d:
    #   g_k = p_k (m G_v_k + A_k / (1 - p_k) - A_d / (1 - p_d))   for k != d,   g_d = p_d m G_v_d
    # (plus the label's terms), computed in place in A's buffer
    dominant = probs > 0.5
    dominant_weight = (negative * dominant).sum(1, keepdim=True)  # A_d, 0 without a dominant class
    per_p = negative.div_(1 - probs).sub_(torch.exp(-log_rest).mul_(dominant_weight)).masked_fill_(dominant, 0.0)
    grad_log_p = per_p.add_(volume).mul_(probs)
    tiny = log_rest < math.log(_TINY_REST) if any_tiny else None
    if any_tiny and tiny.any():  # p_k underflows there: A_d p_k / (1 - p_d) from the log-probabilities instead
        share = (logits.log_softmax(1) - log_rest).exp_().mul_(dominant_weight)
        exact = ((1 - beta) * grad_ce).unsqueeze(-1).expand_as(probs).scatter(1, index, 0.0)
        exact = exact.mul(1 if mask is None else mask).mul_(probs).div_(1 - probs).sub_(share)
        exact = exact.masked_fill_(dominant, 0.0).add_(probs * volume)
        grad_log_p = torch.where(tiny, exact, grad_log_p)
    grad_log_p.scatter_add_(1, index, at_label)
    return probs.mul_(grad_log_p.sum(1, keepdim=True).neg_()).add_(grad_log_p)


# voxels per chunk of the memory-light path: bounds its temporaries to a few MB whatever the volume
_CHUNK_ELEMENTS = 1 << 19


class _ChunkedIndexSums(torch.autograd.Function):
    """``_chunk_sums`` over the whole volume, one chunk at a time. The probabilities are kept in one full-size
    buffer (with ``log(1 - p)`` of each voxel's dominant class, ``1/C`` of that), which the backward turns in place
    into the logits' gradient chunk by chunk (``_chunk_grad_``): no log-probabilities or one-hot are kept, and the
    backward needs no exponential."""

    @staticmethod
    def forward(ctx, logits, labels, mask, softmax, beta):
        step = max(1024, _CHUNK_ELEMENTS // (logits.shape[0] * logits.shape[1]))
        ctx.save_for_backward(logits, labels, mask)
        ctx.softmax, ctx.beta, ctx.step = softmax, beta, step
        probs, log_rest, total = _ChunkedIndexSums._sums(logits, labels, mask, softmax, beta, step)
        ctx.probs, ctx.log_rest = (probs, log_rest) if ctx.needs_input_grad[0] else (None, None)
        return total

    @staticmethod
    def _sums(logits, labels, mask, softmax, beta, step, exact_tiny=False):
        """One pass over the chunks; rerun with the log-space fallback only if some voxel needs it (one check for
        the whole volume instead of two small ops per chunk, each a thread synchronisation)."""
        dtype = compute_dtype(logits.dtype)
        probs = torch.empty(logits.shape, dtype=dtype, device=logits.device)
        log_rest = probs.new_empty((logits.shape[0], 1, logits.shape[2])) if softmax else None
        chunk_sums = []
        for start, chunk, chunk_labels, chunk_mask in _chunks(logits, labels, mask, step):
            stop = start + chunk.shape[-1]
            rest_out = None if log_rest is None else log_rest[:, :, start:stop]
            chunk_sums.append(
                _chunk_sums(
                    chunk, chunk_labels, chunk_mask, softmax, beta, probs[:, :, start:stop], rest_out, exact_tiny
                )
            )
        total = torch.stack(chunk_sums).sum(0)  # pairwise over the chunks, not one after the other
        if not exact_tiny and log_rest is not None and bool((log_rest < math.log(_TINY_REST)).any()):
            return _ChunkedIndexSums._sums(logits, labels, mask, softmax, beta, step, exact_tiny=True)
        return probs, log_rest, total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums):
        logits, labels, mask = ctx.saved_tensors
        (grad, log_rest), ctx.probs, ctx.log_rest = (ctx.probs, ctx.log_rest), None, None
        if grad is None:  # a second backward through the same graph (retain_graph, gradcheck)
            grad, log_rest, _ = _ChunkedIndexSums._sums(logits, labels, mask, ctx.softmax, ctx.beta, ctx.step)
        with torch.autocast(logits.device.type, enabled=False):
            grad_fp, grad_tp, grad_fn, grad_ce = grad_sums.to(grad.dtype)
            # FP, TP and FN as the predicted volume (dFP/dp_c = 1) and a term at each voxel's own class
            grad_sums = (grad_fp, grad_tp - grad_fp - grad_fn, grad_ce)
            # one check for the whole volume, not two small ops per chunk (each a thread synchronisation)
            any_tiny = log_rest is not None and bool((log_rest < math.log(_TINY_REST)).any())
            for start, chunk, chunk_labels, chunk_mask in _chunks(logits, labels, mask, ctx.step):
                stop = start + chunk.shape[-1]
                rest = None if log_rest is None else log_rest[:, :, start:stop]
                _chunk_grad_(
                    grad[:, :, start:stop],
                    rest,
                    chunk,
                    chunk_labels,
                    chunk_mask,
                    ctx.softmax,
                    ctx.beta,
                    grad_sums,
                    any_tiny,
                )
        return grad.to(logits.dtype), None, None, None, None


def _chunks(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, step: int):
    """``(start, logits, labels, mask)`` of each run of ``step`` voxels, logits in the compute dtype (a view when
    already), mask as its float."""
    dtype = compute_dtype(logits.dtype)
    for start, stop in voxel_chunks(logits.shape[-1], step):
        yield (
            start,
            logits[:, :, start:stop].to(dtype),
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
    activation = "softmax" if softmax else "sigmoid" if sigmoid else None
    if takes_fused_index_path(encoded, activation):
        check_input(input)
        fp, tp, fn, cross_entropy = _ChunkedIndexSums.apply(flatten_probs(input), encoded.indices, mask, softmax, beta)
        return tp, fp, fn, cross_entropy
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

    def compute(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        """The per-class loss ``BN'`` (``N'`` with ``batch``) from TP, FP, FN and the cross-entropy sums, reduced
        (``"none"``: ``BN'1[11]``). Overrides ``RegionLoss.compute``: the cross-entropy needs sums besides TP/FP/FN."""
        tp, fp, fn, cross_entropy = combo_sums(input, encoded, self.sigmoid, self.softmax, self.other_act, self.beta)
        if encoded.mask_weight is None:
            voxels = torch.full_like(cross_entropy[:, :1], math.prod(input.shape[2:]))
        else:
            voxels = encoded.mask_weight.sum(-1, keepdim=True).to(cross_entropy)
        tp, fp, fn, cross_entropy, voxels = select_classes(
            (tp, fp, fn, cross_entropy, voxels), encoded.num_classes, self.include_background, self.batch
        )
        dice = dice_loss(tp, fp, fn, smooth_nr=self.smooth_nr, smooth_dr=self.smooth_dr)
        per_class = self.alpha * per_voxel_mean(cross_entropy, voxels) + (1 - self.alpha) * dice
        return self.finish(per_class, input.ndim)
