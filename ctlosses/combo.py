"""Combo loss (Taghanaki et al. 2019): a weighted cross-entropy, whose ``beta`` trades false negatives against
false positives, plus the Dice loss, mixed by ``alpha``. Log-probabilities come from log-sigmoid / log-softmax,
so the loss and its gradient are finite for any finite logits."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

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


class _ComboIndexSums(torch.autograd.Function):
    """``(FP, TP, FN, weighted-CE sum)`` per image and class, ``(4, B, C)``, from logits and index labels (mask m in
    {0, 1}), over the whole volume in a few operations, with the gradient written by hand.

    The forward keeps the (masked) probabilities, from which the backward builds the logits' gradient: with the
    upstream gradients ``G_fp, G_tp, G_fn, G_ce`` of the four sums, ``v = G_fp`` (every voxel's ``p_c`` is in the
    predicted volume), ``t = G_tp - G_fp - G_fn`` (the voxel's own class) and ``a = (1 - beta) G_ce`` (the
    negatives), the gradient w.r.t. ``log p_k`` of a voxel of class ``y`` is

        g_k = m p_k (v_k + a_k / (1 - p_k))                  for k != y
        g_y = m (p_y (v_y + t_y) - beta G_ce_y)

    (a sigmoid's ``g`` is taken w.r.t. the logit: ``p (1 - p) v + p a``, and ``(1 - p_y)(p_y (v_y + t_y) - beta
    G_ce_y)``); a softmax's logits then get ``g - p sum(g)``. ``log(1 - p_k)`` is ``log1p(-p_k)``, exact unless
    ``p_k`` is close to 1 (above 15/16), which only the most probable class ``d`` of a voxel can be, and which only
    counts where ``d`` is not the voxel's class (its own class is left out of the negatives): on those voxels alone,
    ``log(1 - p_d)`` is the log of the other classes' sum (from the logits in log space where they underflow: finite
    for any finite logits), and its gradient ``-a_d p_k / (1 - p_d)`` moves to the other classes.
    """

    @staticmethod
    def forward(ctx, logits, labels, mask, softmax, beta):
        index, dtype = labels.unsqueeze(1), compute_dtype(logits.dtype)
        weight = None if mask is None else mask.unsqueeze(1).to(dtype)
        if softmax:
            probs = torch.log_softmax(logits, 1, dtype=dtype)
            log_own = probs.gather(1, index)
            probs.exp_()
            probs = probs if weight is None else probs.mul_(weight)  # masked p: 0, so log(1 - p) is 0 there too
            log_others = torch.neg(probs).log1p_()
            own = log_own.exp() if weight is None else log_own.exp().mul_(weight)
            wrong = _confidently_wrong(probs, own, logits, log_others)
            confusion = class_sums(probs, labels, probs.shape[1])
            missed = None
        else:
            wide = logits.to(dtype)
            probs, log_others = torch.sigmoid(wide), F.logsigmoid(-wide)
            log_own = F.logsigmoid(wide.gather(1, index))
            missed = torch.sigmoid(-wide.gather(1, index))
            if weight is not None:  # masked_fill, not a product: an ignored voxel's logit may be infinite
                probs.mul_(weight)
                log_others.masked_fill_(weight == 0, 0.0)
                missed.mul_(weight)
            confusion, wrong, own = class_sums(probs, labels, probs.shape[1]), None, probs.gather(1, index)
        if weight is not None:
            log_own = log_own.masked_fill(weight == 0, 0.0)
        # each statistic a sum of its own terms (the own class apart): exact in float32 for a confident prediction
        fp, fn = off_diagonal_sums(confusion)
        if missed is not None:
            fn = class_sums(missed.squeeze(1), labels, probs.shape[1])
        # the own class left out of the negatives (not subtracted: its log(1 - p) may be -inf); times 0 for a
        # sigmoid, where an infinite logit of the own class shows only there (a softmax turns it into NaN anyway)
        log_others.scatter_(1, index, log_others.gather(1, index) * 0 if not softmax else 0.0)
        negatives = log_others.sum(-1)  # masked voxels hold 0
        positives = class_sums(log_own.squeeze(1), labels, probs.shape[1])
        cross_entropy = -(beta * positives + (1 - beta) * negatives)
        ctx.save_for_backward(logits, labels, mask)
        # kept for the backward: the probabilities, and log(1 - p)'s memory for the gradient (no new full-size tensor)
        ctx.probs, ctx.own, ctx.work = (probs, own, log_others) if ctx.needs_input_grad[0] else (None, None, None)
        ctx.softmax, ctx.beta, ctx.wrong = softmax, beta, wrong
        return torch.stack((fp, confusion.diagonal(dim1=1, dim2=2), fn, cross_entropy))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums):
        logits, labels, mask = ctx.saved_tensors
        probs, own = ctx.probs, ctx.own
        work = ctx.work if ctx.work is not None else torch.empty_like(probs)
        ctx.work = None  # the forward's spare buffer serves once; a second backward (gradcheck) takes a new one
        with torch.autocast(logits.device.type, enabled=False):
            grad_fp, grad_tp, grad_fn, grad_ce = grad_sums.to(probs.dtype).unsqueeze(-1)
            volume, negative = grad_fp, (1 - ctx.beta) * grad_ce
            index = labels.unsqueeze(1)
            # the own class' coefficients of p_y and of the constant, per voxel
            own_slope = (grad_tp - grad_fn).expand_as(probs).gather(1, index)  # dL/dp_y = v_y + t_y
            own_constant = (ctx.beta * grad_ce).expand_as(probs).gather(1, index)
            if ctx.softmax:
                grad = torch.sub(probs.new_ones(()), probs, out=work)  # 1 - p, in one pass
                torch.div(probs, grad, out=grad).mul_(negative).addcmul_(probs, volume)
                grad.scatter_(1, index, own * own_slope - own_constant)
                if ctx.wrong is not None:
                    _move_dominant_term(grad, probs, negative, volume, ctx.wrong)
            else:
                grad = torch.sub(probs.new_ones(()), probs, out=work).mul_(probs).mul_(volume).addcmul_(probs, negative)
                own_missed = torch.sigmoid(-logits.gather(1, index).to(probs.dtype))
                grad.scatter_(1, index, own_missed * (own * own_slope - own_constant))
            if mask is not None:
                grad.mul_(mask.unsqueeze(1).to(grad.dtype))
            if ctx.softmax:
                grad.addcmul_(probs, grad.sum(1, keepdim=True), value=-1)
        return grad.to(logits.dtype), None, None, None, None


class _Wrong(NamedTuple):
    """Voxels whose most probable class ``d`` (p > 15/16) is not their own: ``(b, n)`` and ``d`` of each, and the
    share ``p_k / (1 - p_d)`` of every other class ``(S, C)`` (0 at ``d``)."""

    images: torch.Tensor
    voxels: torch.Tensor
    dominant: torch.Tensor
    shares: torch.Tensor


# above this probability 1 - p loses more than 8 float32 roundings of p (p/(1 - p) of them, halved), so log1p(-p)
# and p/(1 - p) are taken from the other classes' sum instead; only a voxel's most probable class can be above it
_NEAR_ONE = 15 / 16

# below this sum of the other classes' probabilities some of them may have underflowed: those voxels take it from
# the logits in log space instead (logits more than ~60 apart, rare)
_TINY_REST = 1e-30


def _confidently_wrong(probs, own, logits, log_others) -> _Wrong | None:
    """Find the voxels whose most probable class has p > 15/16 and is not theirs, and write that class' exact
    ``log(1 - p_d)`` into ``log_others`` there: the log of the other classes' sum (a sum of positive terms, no
    cancellation). Few operations on few voxels (each operation costs a thread synchronisation on a busy machine).
    Masked voxels (p = 0) are never among them."""
    top = probs.amax(1, keepdim=True)
    images, _, voxels = ((top > _NEAR_ONE) & (own < top)).nonzero(as_tuple=True)
    if images.numel() == 0:
        return None
    others = probs.permute(0, 2, 1)[images, voxels]  # (S, C)
    dominant = others.argmax(1, keepdim=True)
    rest = others.scatter_(1, dominant, 0.0).sum(1, keepdim=True)
    shares, log_rest = others.div_(rest), rest.log()
    tiny = rest < _TINY_REST
    if bool(tiny.any()):
        columns = logits.permute(0, 2, 1)[images, voxels].to(probs.dtype)
        exact_shares, exact_log_rest = _rest_in_log_space(columns, dominant)
        shares, log_rest = torch.where(tiny, exact_shares, shares), torch.where(tiny, exact_log_rest, log_rest)
    log_others[images, dominant.squeeze(1), voxels] = log_rest.squeeze(1)
    return _Wrong(images, voxels, dominant.squeeze(1), shares)


def _rest_in_log_space(columns: torch.Tensor, dominant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p_k / (1 - p_d)`` and ``log(1 - p_d)`` from voxels' logits ``(S, C)``: ``logsumexp_{k != d} x_k`` less
    ``logsumexp x``, finite for any finite logits."""
    others = columns.scatter(1, dominant, -torch.inf)
    log_rest = others.logsumexp(1, keepdim=True)
    return (others - log_rest).exp_(), log_rest - columns.logsumexp(1, keepdim=True)


def _move_dominant_term(grad, probs, negative, volume, wrong: _Wrong) -> None:
    """On the confidently wrong voxels, replace the dominant class' ``a_d p_d / (1 - p_d)`` (which ``1 - p_d``
    rounds away from) by the exact gradient of ``a_d log(1 - p_d)``: ``-a_d p_k / (1 - p_d)`` on every other class."""
    images, voxels, dominant = wrong.images, wrong.voxels, wrong.dominant
    moved = wrong.shares * negative.squeeze(-1)[images, dominant].unsqueeze(1)
    grad.permute(0, 2, 1).index_put_((images, voxels), moved.neg_(), accumulate=True)
    grad[images, dominant, voxels] = probs[images, dominant, voxels] * volume.squeeze(-1)[images, dominant]


def combo_sums(
    input: torch.Tensor, encoded: EncodedTarget, sigmoid: bool, softmax: bool, other_act: Callable | None, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(TP, FP, FN, wCE sum)`` per image and class ``(B, C)`` over the voxels that count.

    Index targets with a sigmoid / softmax take the fused path (eager mode; a compiled graph gets the plain
    formulas, which the compiler fuses itself); everything else the plain path.
    """
    mask = encoded.mask_weight
    softmax = softmax and input.shape[1] > 1
    activation = "softmax" if softmax else "sigmoid" if sigmoid else None
    if takes_fused_index_path(encoded, activation):
        check_input(input)
        fp, tp, fn, cross_entropy = _ComboIndexSums.apply(flatten_probs(input), encoded.indices, mask, softmax, beta)
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
