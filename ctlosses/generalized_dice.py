"""Generalised Dice loss (Sudre et al. 2017), equal to ``monai.losses.GeneralizedDiceLoss``."""

from __future__ import annotations

import torch

from .core import EncodedTarget, LossInputError, RegionLoss, apply_class_weight, takes_fused_index_path
from .dice_combos import (
    check_lambda_ce,
    cross_entropy_beside,
    index_cross_entropy_from_log_likelihood,
    region_loss_and_log_likelihood,
)

W_TYPES = ("square", "simple", "uniform")


def generalized_dice_loss(
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    w_type: str = "square",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``1 - (2 sum_c w_c TP_c + s_nr) / (sum_c w_c (2 TP_c + FP_c + FN_c) + s_dr)`` of each row of ``(B, C)``
    statistics (one row for batch-pooled ``(C,)``), as ``(B, 1)`` (or ``(1,)``).

    ``w_c = 1 / G_c^2`` (``"square"``), ``1 / G_c`` (``"simple"``) or 1 (``"uniform"``) with ``G_c = TP_c + FN_c``
    the class' target volume; a class absent from the target (infinite weight) takes the row's largest finite
    weight, as MONAI. ``class_weight`` multiplies ``w_c``. Computed without ``1 - ratio`` (see ``dice_loss``).
    """
    target_volume = (tp + fn).detach()  # the target's volume: no gradient (and none through 1 / 0 for absent classes)
    if w_type == "simple":
        weights = target_volume.reciprocal()
    elif w_type == "square":
        weights = (target_volume * target_volume).reciprocal()
    else:
        weights = torch.ones_like(target_volume)
    absent = torch.isinf(weights)
    weights = weights.masked_fill(absent, 0.0)
    weights = weights + absent * weights.amax(-1, keepdim=True)
    weights = apply_class_weight(weights, class_weight)
    errors = (weights * (fp + fn)).sum(-1, keepdim=True)
    overlap = (weights * tp).sum(-1, keepdim=True)
    return (errors + (smooth_dr - smooth_nr)) / (2 * overlap + errors + smooth_dr)


class GeneralizedDiceLoss(RegionLoss):
    """Generalised Dice loss, ``monai.losses.GeneralizedDiceLoss`` on the shared core (index targets are never
    one-hot encoded; float32 compute), plus ``ignore_index`` and a per-class ``weight``:

        GDL = 1 - (2 sum_c w_c TP_c + smooth_nr) / (sum_c w_c (2 TP_c + FP_c + FN_c) + smooth_dr)

    per image (over the whole batch with ``batch=True``), with ``w_c = 1 / G_c^2`` for the target volume ``G_c``
    of class ``c``: each class counts about equally whatever its size, so a 5 mm adrenal gland weighs as much as
    the liver. Unlike ``DiceLoss`` the classes are pooled inside one ratio, not averaged.

    Reference: Sudre, C. H. et al. (2017) Generalised Dice overlap as a deep learning loss function for highly
    unbalanced segmentations. DLMIA 2017. https://arxiv.org/abs/1707.03237

    ``input`` is ``BNH[WD]``, ``target`` ``BNH[WD]`` or ``B1H[WD]`` class indices with ``to_onehot_y=True``.

    Args:
        include_background: if False, channel 0 (background) is excluded. Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices. Defaults to False.
        sigmoid: apply a sigmoid to ``input``. Defaults to False.
        softmax: apply a softmax over channels. Defaults to False.
        other_act: any other callable activation. Defaults to None (at most one of the three).
        w_type: ``"square"`` (``1 / G^2``), ``"simple"`` (``1 / G``) or ``"uniform"`` (1). Defaults to ``"square"``.
        reduction: ``"none"`` (``B11[11]``, ``11[11]`` with ``batch``), ``"mean"`` or ``"sum"`` over the images.
            Defaults to ``"mean"``.
        smooth_nr: added to the numerator. Defaults to 1e-5.
        smooth_dr: added to the denominator. Defaults to 1e-5.
        batch: pool the statistics (and the weights) over the batch. Defaults to False.
        soft_label: soft-label formulation of TP/FP/FN (Wang et al. 2023). Defaults to False.
        ignore_index: target label whose voxels contribute nothing (MONAI 1.6.1 semantics). Defaults to None.
        weight: per-class factor on ``w_c`` (one value >= 0 per class used, or a number); not in MONAI.
            Defaults to None.
        lambda_ce: weight of a cross-entropy on the same (raw) logits added to the loss, as ``DiceCELoss``'s CE
            term (softmax CE over all channels, unweighted; BCE for one channel); not in MONAI. Sudre et al. train
            with the ratio alone (the default, 0); on the 14-class phantom from scratch it stays under 0.5 mean
            Dice in 400 iterations, and the CE beside it, as nnU-Net pairs Dice with CE, is the preset
            (``docs/losses.md``). Not with ``reduction="none"``. Defaults to 0.0.
    """

    none_keeps_spatial_axes = True

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act=None,
        w_type: str = "square",
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        ignore_index: int | None = None,
        weight=None,
        lambda_ce: float = 0.0,
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
        )
        w_type = getattr(w_type, "value", w_type)  # MONAI's Weight enum
        if w_type not in W_TYPES:
            raise LossInputError(f"w_type must be one of {W_TYPES}, got {w_type!r}.")
        self.w_type = w_type
        self.lambda_ce = check_lambda_ce(lambda_ce, self.reduction, "image (or batch)")

    def per_class_loss(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        """The loss of each image (one column: the classes are pooled in the ratio, weighted there)."""
        return generalized_dice_loss(tp, fp, fn, self.w_type, self.smooth_nr, self.smooth_dr, self.class_weight)

    def finish(self, per_class: torch.Tensor, input_ndim: int, **options) -> torch.Tensor:
        # the class weight is already inside the ratio
        return super().finish(per_class, input_ndim, weight=None, **options)

    def compute(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        if self.lambda_ce == 0:
            return super().compute(input, encoded)
        if self.softmax and not self.soft_label and input.shape[1] > 1 and takes_fused_index_path(encoded, "softmax"):
            # both terms from one log-softmax, as DiceCELoss: no second full-size pass (and saved tensor) per volume
            ratio_loss, log_at_target = region_loss_and_log_likelihood(self, input, encoded)
            cross_entropy = index_cross_entropy_from_log_likelihood(log_at_target, encoded, None, self.reduction)
            return ratio_loss + self.lambda_ce * cross_entropy
        return super().compute(input, encoded) + self.lambda_ce * cross_entropy_beside(input, encoded, self.reduction)
