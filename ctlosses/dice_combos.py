"""Dice + cross-entropy (``DiceCELoss``, alias ``DiceBCELoss``) and Dice + focal (``DiceFocalLoss``), equal to
``monai.losses.DiceCELoss`` / ``monai.losses.DiceFocalLoss`` 1.6.1, with our own ``DiceLoss`` and ``FocalLoss``
underneath (float32, no one-hot copy of index targets) and ``ignore_index`` on both terms."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .core import (
    EncodedTarget,
    LossInputError,
    SegmentationLoss,
    check_probability,
    check_range,
    check_weight_length,
    compute_dtype,
    encode_target,
    flatten_probs,
    per_voxel_mean,
    reduce_loss,
    softmax_overlap_stats_and_log_likelihood,
    takes_fused_index_path,
)
from .dice import DiceLoss
from .focal import FocalLoss


def cross_entropy_term(
    logits: torch.Tensor, encoded: EncodedTarget, weight: torch.Tensor | None, label_smoothing: float, reduction: str
) -> torch.Tensor:
    """Softmax cross-entropy of ``(B, C, N)`` logits as ``torch.nn.CrossEntropyLoss`` (what MONAI's DiceCE uses),
    with voxels that do not count removed from the sum and from the mean's denominator.

    Index targets give ``F.cross_entropy`` their ``(B, N)`` labels (the weighted mean ``sum w_y l / sum w_y``
    is torch's); one-hot / soft targets use probability targets, whose mean is over voxels. Returns a scalar, or
    ``(B, 1, N)`` for ``"none"``.
    """
    if encoded.indices is not None:
        per_voxel = F.cross_entropy(logits, encoded.indices, weight, reduction="none", label_smoothing=label_smoothing)
        counts = torch.ones_like(per_voxel) if weight is None else weight[encoded.indices]
        mask = encoded.mask
    else:
        per_voxel = F.cross_entropy(logits, encoded.dense, weight, reduction="none", label_smoothing=label_smoothing)
        counts, mask = torch.ones_like(per_voxel), encoded.mask_weight
    if mask is not None:
        per_voxel, counts = per_voxel * mask, counts * mask
    return finish_cross_entropy(per_voxel, counts, reduction)


def index_cross_entropy_from_log_likelihood(
    log_at_target: torch.Tensor, encoded: EncodedTarget, weight: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """``cross_entropy_term`` for an index target (no label smoothing) from ``log p[target]`` ``(B, N)``, which
    the Dice term's log-softmax already gave: ``-w_y log p_y`` per voxel, the same numbers as ``F.cross_entropy``."""
    counts = None if weight is None else weight[encoded.indices]
    if encoded.mask is not None:
        counts = encoded.mask_weight.to(log_at_target) if counts is None else counts * encoded.mask
    per_voxel = -log_at_target if counts is None else -(log_at_target * counts)
    return finish_cross_entropy(per_voxel, torch.ones_like(per_voxel) if counts is None else counts, reduction)


def finish_cross_entropy(per_voxel: torch.Tensor, counts: torch.Tensor, reduction: str) -> torch.Tensor:
    """``(B, 1, N)`` for ``"none"``; else the core's ``reduce_loss`` of each image's total: torch's ``"sum"`` of
    every voxel's loss, or its mean ``sum l / sum counts`` (``counts`` the class weight of each voxel that counts)."""
    if reduction == "none":
        return per_voxel.unsqueeze(1)
    totals = per_voxel.reshape(per_voxel.shape[0], -1).sum(-1, keepdim=True)  # (B, 1)
    if reduction == "sum":
        return reduce_loss(totals, reduction)
    voxels = counts.reshape(counts.shape[0], -1).sum(-1, keepdim=True)
    return reduce_loss(per_voxel_mean(totals, voxels), reduction, voxel_counts=voxels)


def binary_cross_entropy_term(
    logits: torch.Tensor, encoded: EncodedTarget, pos_weight: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """``torch.nn.BCEWithLogitsLoss(pos_weight=weight)`` on a single channel (what MONAI's DiceCE uses), voxels
    that do not count removed. Returns a scalar, or ``(B, 1, N)`` for ``"none"``."""
    per_voxel = F.binary_cross_entropy_with_logits(logits, encoded.dense, reduction="none", pos_weight=pos_weight)
    counts = torch.ones_like(per_voxel) if encoded.mask_weight is None else encoded.mask_weight.unsqueeze(1)
    per_voxel = per_voxel if encoded.mask_weight is None else per_voxel * counts
    return per_voxel if reduction == "none" else finish_cross_entropy(per_voxel[:, 0], counts[:, 0], reduction)


def cross_entropy_beside(input: torch.Tensor, encoded: EncodedTarget, reduction: str) -> torch.Tensor:
    """The cross-entropy a loss adds beside its own term with ``lambda_ce`` (``LovaszHingeLoss``,
    ``GeneralizedDiceLoss``): on the raw logits, softmax CE over all channels (``torch.nn.CrossEntropyLoss``,
    background included, unweighted) for N > 1, BCE with logits for one, voxels that do not count left out, as
    ``DiceCELoss``'s CE term. Returns a scalar (``"mean"`` or ``"sum"``)."""
    logits = flatten_probs(input.to(compute_dtype(input.dtype)))
    if logits.shape[1] == 1:
        return binary_cross_entropy_term(logits, encoded, None, reduction)
    return cross_entropy_term(logits, encoded, None, 0.0, reduction)


def region_loss_and_log_likelihood(region, input: torch.Tensor, encoded: EncodedTarget):
    """A softmax region loss (``DiceLoss``, ``GeneralizedDiceLoss``) finished from its statistics, and ``log p[target]``
    ``(B, voxels)`` from the same log-softmax, for a cross-entropy beside it: one pass over the volume, not two."""
    tp, fp, fn, log_at_target = softmax_overlap_stats_and_log_likelihood(
        input, encoded, region.include_background, region.batch, region.squared_pred
    )
    return region.finish(region.per_class_loss(tp, fp, fn), input.ndim), log_at_target


def check_lambda_ce(lambda_ce: float, reduction: str, own_term: str) -> float:
    """``lambda_ce`` >= 0; a cross-entropy beside a term computed per ``own_term`` cannot keep ``"none"``."""
    lambda_ce = check_range("lambda_ce", lambda_ce, 0.0)
    if lambda_ce > 0 and reduction == "none":
        raise LossInputError(
            f'lambda_ce > 0 needs reduction "mean" or "sum": the loss is one value per {own_term}, '
            'the cross-entropy one per voxel; got reduction="none".'
        )
    return lambda_ce


def _dice_weight(weight: torch.Tensor | None, include_background: bool) -> torch.Tensor | None:
    """MONAI's DiceCE gives the Dice term ``weight[1:]`` without background (the CE always sees every class)."""
    if weight is None or include_background or weight.ndim == 0:
        return weight
    # a single value cannot lose its background entry: only a one-channel input (whose Dice ignores weight) fits
    return weight[1:] if weight.numel() > 1 else None


class DiceCELoss(SegmentationLoss):
    """Weighted sum of the Dice loss and the cross-entropy, equal to ``monai.losses.DiceCELoss`` 1.6.1:

        L = lambda_dice * Dice + lambda_ce * CE

    The Dice term is our ``DiceLoss`` (with the activation switches); the CE term always takes the raw logits:
    softmax cross-entropy (``torch.nn.CrossEntropyLoss``) over all N channels when N > 1, binary cross-entropy
    with logits (``torch.nn.BCEWithLogitsLoss``) when N = 1, as MONAI (so ``sigmoid=True`` with N > 1 still
    uses the softmax CE). Both are computed in float32 without a one-hot copy of index targets.

    ``input`` is ``BNH[WD]`` logits; ``target`` ``BNH[WD]`` (one-hot or soft; the CE then uses probability
    targets) or ``B1H[WD]`` class indices with ``to_onehot_y=True``.

    References:
        Milletari, F. et al. (2016) V-Net. 3DV 2016. https://arxiv.org/abs/1606.04797

        Isensee, F. et al. (2021) nnU-Net. Nature Methods 18 (Dice + CE as the default segmentation loss).

    Args:
        include_background: if False, the Dice term drops channel 0 (the CE always uses every channel).
            Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices. Defaults to False.
        sigmoid, softmax, other_act: activation of the Dice term only (at most one). Defaults to none.
        squared_pred: squared terms in the Dice denominator. Defaults to False.
        jaccard: Jaccard (soft IoU) instead of Dice. Defaults to False.
        reduction: ``"mean"`` or ``"sum"`` (MONAI's); ``"none"`` (ours) returns the per-class Dice ``BN'1[11]``
            broadcast against the per-voxel CE ``B1H[WD]``, i.e. ``BN'H[WD]``, whose mean is the ``"mean"`` loss
            when nothing is weighted or ignored. Defaults to ``"mean"``.
        smooth_nr, smooth_dr: Dice smoothing terms. Defaults to 1e-5.
        batch: sum the Dice statistics over the batch. Defaults to False.
        weight: one value >= 0 per channel, *including* the background: the CE class weight (``pos_weight``
            of the BCE for one channel) and the Dice weight (``weight[1:]`` without background), as MONAI.
            A number weighs every class alike. Defaults to None.
        lambda_dice: weight of the Dice term, >= 0. Defaults to 1.0.
        lambda_ce: weight of the cross-entropy term, >= 0. Defaults to 1.0.
        label_smoothing: in [0, 1], for the softmax CE (MONAI's BCE ignores it; a warning says so). Defaults to 0.0.
        ignore_index: voxels whose target equals it contribute to neither term, gradient included (the CE
            mean is over the voxels that count, as ``CrossEntropyLoss(ignore_index=...)``). Defaults to None.

    Raises:
        LossInputError: (a ``ValueError``) for negative lambdas, label_smoothing outside [0, 1], a bad reduction
            or weight, mismatched shapes or labels outside ``[0, N)``.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(include_background, to_onehot_y, reduction, weight, ignore_index)
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            squared_pred=squared_pred,
            jaccard=jaccard,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            weight=_dice_weight(self.class_weight, include_background),
            ignore_index=ignore_index,
        )
        self.lambda_dice = check_range("lambda_dice", lambda_dice, 0.0)
        self.lambda_ce = check_range("lambda_ce", lambda_ce, 0.0)
        self.label_smoothing = check_probability("label_smoothing", label_smoothing)

    def compute(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        # for reduction="none" the per-class Dice BN'1[11] broadcasts against the per-voxel CE B1H[WD]
        if self._shares_log_softmax(encoded):
            return self._dice_ce_from_one_log_softmax(input, encoded)
        return self.lambda_dice * self.dice.compute(input, encoded) + self.lambda_ce * self._cross_entropy(
            input, encoded
        )

    def _shares_log_softmax(self, encoded: EncodedTarget) -> bool:
        """A softmax Dice on the fused index path: both terms can use one log-softmax (p = exp(log p)). Label
        smoothing needs every class' log p (not fused)."""
        return self.dice.softmax and self.label_smoothing == 0 and takes_fused_index_path(encoded, "softmax")

    def _dice_ce_from_one_log_softmax(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        """The same loss as the two terms computed apart, with one log-softmax and one fused backward."""
        dice_term, log_at_target = region_loss_and_log_likelihood(self.dice, input, encoded)
        cross_entropy = index_cross_entropy_from_log_likelihood(
            log_at_target, encoded, self._ce_weight(input.shape[1], log_at_target), self.reduction
        )
        if self.reduction == "none":
            cross_entropy = cross_entropy.reshape(cross_entropy.shape[0], 1, *input.shape[2:])
        return self.lambda_dice * dice_term + self.lambda_ce * cross_entropy

    def _ce_weight(self, num_classes: int, like: torch.Tensor) -> torch.Tensor | None:
        """The CE class weight as ``num_classes`` values in ``like``'s dtype, or None."""
        hint = "DiceCELoss takes one value per channel including the background; the Dice term drops it itself"
        weight = check_weight_length(self.class_weight, num_classes, hint)
        return None if weight is None else weight.to(like).expand(num_classes)

    def cross_entropy(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The CE term alone (softmax CE for N > 1 channels, BCE for one), reduced as ``reduction``."""
        encoded = encode_target(input, target, self.to_onehot_y, self.ignore_index)
        with torch.autocast(input.device.type, enabled=False):
            return self._cross_entropy(input, encoded)

    def _cross_entropy(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        logits = flatten_probs(input.to(compute_dtype(input.dtype)))
        num_classes = logits.shape[1]
        weight = self._ce_weight(num_classes, logits)
        if num_classes == 1:
            if self.label_smoothing > 0:
                warnings.warn("label_smoothing is not applied to the single-channel BCE term (as MONAI).", stacklevel=3)
            loss = binary_cross_entropy_term(logits, encoded, weight, self.reduction)
        else:
            loss = cross_entropy_term(logits, encoded, weight, self.label_smoothing, self.reduction)
        return loss.reshape(loss.shape[0], 1, *input.shape[2:]) if self.reduction == "none" else loss


DiceBCELoss = DiceCELoss


class DiceFocalLoss(SegmentationLoss):
    """Weighted sum of the Dice loss and the focal loss, equal to ``monai.losses.DiceFocalLoss`` 1.6.1:

        L = lambda_dice * Dice + lambda_focal * Focal

    The Dice term is our ``DiceLoss`` (with the activation switches), the focal term our ``FocalLoss`` on the raw
    logits (sigmoid per channel as MONAI; ``use_softmax=True`` is our addition). Both see ``include_background``,
    ``weight``, ``reduction`` and ``ignore_index``. With ``reduction="none"`` the per-class Dice ``BN'1[11]``
    broadcasts against the focal ``BN'H[WD]``, as MONAI.

    ``input`` is ``BNH[WD]`` logits; ``target`` ``BNH[WD]`` or ``B1H[WD]`` class indices with ``to_onehot_y=True``.

    References:
        Zhu, W. et al. (2019) AnatomyNet. Medical Physics 46(2). https://arxiv.org/abs/1808.05238

        Lin, T.-Y. et al. (2017) Focal Loss for Dense Object Detection. ICCV 2017.

    Args:
        include_background: if False, channel 0 is dropped from both terms. Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices. Defaults to False.
        sigmoid, softmax, other_act: activation of the Dice term only (at most one). Defaults to none.
        squared_pred: squared terms in the Dice denominator. Defaults to False.
        jaccard: Jaccard (soft IoU) instead of Dice. Defaults to False.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``, applied to each term. Defaults to ``"mean"``.
        smooth_nr, smooth_dr: Dice smoothing terms. Defaults to 1e-5.
        batch: sum the Dice statistics over the batch. Defaults to False.
        gamma: focal exponent, >= 0. Defaults to 2.0.
        weight: per-class weight of both terms: a number or one value per channel used. Defaults to None.
        lambda_dice: weight of the Dice term, >= 0. Defaults to 1.0.
        lambda_focal: weight of the focal term, >= 0. Defaults to 1.0.
        alpha: focal balance factor in [0, 1] (number or one per channel used). Defaults to None.
        use_softmax: softmax focal loss instead of sigmoid (not in MONAI's DiceFocal). Defaults to False.
        ignore_index: voxels whose target equals it contribute to neither term (each term's MONAI 1.6.1
            semantics). Defaults to None.

    Raises:
        LossInputError: (a ``ValueError``) for negative lambdas or gamma, alpha outside [0, 1], a bad reduction or
            weight, mismatched shapes or labels outside ``[0, N)``.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        gamma: float = 2.0,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        alpha: float | Sequence[float] | None = None,
        use_softmax: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(include_background, to_onehot_y, reduction, weight, ignore_index)
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            squared_pred=squared_pred,
            jaccard=jaccard,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            weight=weight,
            ignore_index=ignore_index,
        )
        self.focal = FocalLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            gamma=gamma,
            alpha=alpha,
            weight=weight,
            reduction=reduction,
            use_softmax=use_softmax,
            ignore_index=ignore_index,
        )
        self.lambda_dice = check_range("lambda_dice", lambda_dice, 0.0)
        self.lambda_focal = check_range("lambda_focal", lambda_focal, 0.0)

    def compute(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        # both terms end in the core's reduce_loss with the same reduction; "none" broadcasts BN'1[11] over BN'H[WD]
        return self.lambda_dice * self.dice.compute(input, encoded) + self.lambda_focal * self.focal.compute(
            input, encoded
        )
