"""Dice and Jaccard (IoU) losses, equal to ``monai.losses.DiceLoss`` (``jaccard=False`` / ``True``)."""

from __future__ import annotations

import torch

from .core import RegionLoss, check_flag


def dice_loss(
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    jaccard: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Per-class ``1 - (2 TP + s_nr) / (2 TP + FP + FN + s_dr)``, or for Jaccard
    ``1 - (2 TP + s_nr) / (2 (TP + FP + FN) + s_dr)`` (MONAI scales the IoU by 2 so the smoothing terms
    act as in Dice).

    Computed as ``(FP + FN + s_dr - s_nr) / (2 TP + FP + FN + s_dr)`` (Jaccard: ``2 (FP + FN)`` above), the same
    number without ``1 - ratio``: near a perfect prediction the ratio rounds to float32's spacing below 1,
    which is 4e-5 of a 1e-3 loss (MONAI's float32 error at the end of training); this keeps FP + FN's precision."""
    errors = fp + fn
    union = 2 * (tp + errors) if jaccard else 2 * tp + errors
    return ((2 * errors if jaccard else errors) + (smooth_dr - smooth_nr)) / (union + smooth_dr)


class DiceLoss(RegionLoss):
    """Soft Dice loss for multi-class and multi-label segmentation, ``monai.losses.DiceLoss`` on a shared core
    that never builds a float one-hot copy of an index target and computes in float32.

    ``input`` is ``BNH[WD]`` (N classes), ``target`` ``BNH[WD]`` (one-hot or soft) or ``B1H[WD]`` class
    indices with ``to_onehot_y=True``. Per image and class (over the batch too with ``batch=True``):

        loss_c = 1 - (2 TP_c + smooth_nr) / (2 TP_c + FP_c + FN_c + smooth_dr)

    with ``TP = sum p t``, ``FP = sum p (1 - t)``, ``FN = sum (1 - p) t`` over the voxels that count.

    The original papers:

        Milletari, F. et al. (2016) V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image
        Segmentation. 3DV 2016.

        Wang, Z. et al. (2023) Jaccard Metric Losses: Optimizing the Jaccard Index with Soft Labels. NeurIPS 2023.

        Wang, Z. et al. (2023) Dice Semimetric Losses: Optimizing the Dice Score with Soft Labels. MICCAI 2023.

    Args:
        include_background: if False, channel 0 (background) is excluded from the calculation. Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices (ignored, with a warning, for one channel).
            Defaults to False.
        sigmoid: apply a sigmoid to ``input``. Defaults to False.
        softmax: apply a softmax over the channels of ``input`` (ignored, with a warning, for one channel).
            Defaults to False.
        other_act: any other callable activation, e.g. ``torch.tanh``. Defaults to None. At most one of
            ``sigmoid``, ``softmax``, ``other_act``.
        squared_pred: use squared predictions and targets in the denominator. Defaults to False.
        jaccard: compute the Jaccard index (soft IoU) instead of Dice. Defaults to False.
        reduction: ``"none"`` (``BN1[11]``, or ``N1[11]`` with ``batch``), ``"mean"`` or ``"sum"`` over
            batch and classes. Defaults to ``"mean"``.
        smooth_nr: small constant added to the numerator. Defaults to 1e-5.
        smooth_dr: small constant added to the denominator. Defaults to 1e-5.
        batch: sum intersection and union over the batch before dividing. Defaults to False.
        weight: per-class weight multiplying each class' loss: a number, or one value >= 0 per class used
            (without the background with ``include_background=False``). Ignored for a single class, as in
            MONAI. Defaults to None.
        soft_label: soft-label formulation (``TP = (|p| + |t| - |p - t|) / 2``), equal to the usual one
            for hard labels. Defaults to False.
        ignore_index: voxels whose target equals it contribute nothing (MONAI 1.6.1 semantics; for one-hot
            targets, an in-range value masks that class' voxels and a sentinel masks all-zero voxels).
            Defaults to None.

    Raises:
        LossInputError: (a ``ValueError`` and ``AssertionError``) for a bad reduction, weight, activation
            combination, shapes or labels.
    """

    none_keeps_spatial_axes = True

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act=None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight=None,
        soft_label: bool = False,
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
            soft_label=soft_label,
            ignore_index=ignore_index,
            squared_pred=squared_pred,
        )
        self.jaccard = check_flag("jaccard", jaccard)

    def per_class_loss(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        return dice_loss(tp, fp, fn, self.jaccard, self.smooth_nr, self.smooth_dr)


class JaccardLoss(DiceLoss):
    """Soft Jaccard (IoU) loss, ``monai.losses.DiceLoss(jaccard=True)``:

        loss_c = 1 - (2 TP_c + smooth_nr) / (2 (TP_c + FP_c + FN_c) + smooth_dr)

    Takes every argument of ``DiceLoss`` except ``jaccard`` (always True). See ``DiceLoss`` for them.

    Reference: Rahman, M. A. and Wang, Y. (2016) Optimizing Intersection-Over-Union in Deep Neural Networks
    for Image Segmentation. ISVC 2016; Wang, Z. et al. (2023) Jaccard Metric Losses. NeurIPS 2023.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act=None,
        squared_pred: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight=None,
        soft_label: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            squared_pred=squared_pred,
            jaccard=True,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            weight=weight,
            soft_label=soft_label,
            ignore_index=ignore_index,
        )


IoULoss = JaccardLoss
