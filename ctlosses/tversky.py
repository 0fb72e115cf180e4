"""Tversky loss (``monai.losses.TverskyLoss``) and Focal Tversky loss (Abraham & Khan 2019)."""

from __future__ import annotations

import math

import torch

from .core import RegionLoss, check_probability, check_range, safe_pow


def tversky_loss(
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Per-class ``1 - TI`` as ``(alpha FP + beta FN + s_dr - s_nr) / (TP + alpha FP + beta FN + s_dr)``: the same
    number, with ``TI = (TP + s_nr) / (TP + alpha FP + beta FN + s_dr)``
    (alpha weighs FP, beta FN), without the cancellation of ``1 - TI`` when TI is close to 1 (see ``dice_loss``)."""
    errors = alpha * fp + beta * fn
    return (errors + (smooth_dr - smooth_nr)) / (tp + errors + smooth_dr)


class TverskyLoss(RegionLoss):
    """Tversky loss ``1 - TI_c`` per image and class, ``monai.losses.TverskyLoss`` on the shared core (index
    targets are never one-hot encoded; float32 compute), plus a per-class ``weight``:

        TI_c = (TP_c + smooth_nr) / (TP_c + alpha FP_c + beta FN_c + smooth_dr)

    ``alpha = beta = 0.5`` is the Dice loss; ``beta > alpha`` penalises false negatives more (recall).

    Reference: Salehi, S. S. M. et al. (2017) Tversky loss function for image segmentation using 3D fully
    convolutional deep networks. MLMI 2017. https://arxiv.org/abs/1706.05721

    ``input`` is ``BNH[WD]``, ``target`` ``BNH[WD]`` or ``B1H[WD]`` class indices with ``to_onehot_y=True``.

    Args:
        include_background: if False, channel 0 (background) is excluded. Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices. Defaults to False.
        sigmoid: apply a sigmoid to ``input``. Defaults to False.
        softmax: apply a softmax over channels. Defaults to False.
        other_act: any other callable activation. Defaults to None (at most one of the three).
        alpha: weight of false positives, in [0, 1]. Defaults to 0.5.
        beta: weight of false negatives, in [0, 1]. Defaults to 0.5.
        reduction: ``"none"`` (``(B, N)``, ``(N,)`` with ``batch``, as MONAI's Tversky), ``"mean"`` or
            ``"sum"``. Defaults to ``"mean"``.
        smooth_nr: added to the numerator. Defaults to 1e-5.
        smooth_dr: added to the denominator. Defaults to 1e-5.
        batch: sum the statistics over the batch before dividing. Defaults to False.
        soft_label: soft-label formulation of TP/FP/FN (Wang et al. 2023). Defaults to False.
        ignore_index: target label whose voxels contribute nothing (MONAI 1.6.1 semantics). Defaults to None.
        weight: per-class weight multiplying each class' loss (not in MONAI's Tversky; None there).
            Defaults to None.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act=None,
        alpha: float = 0.5,
        beta: float = 0.5,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        ignore_index: int | None = None,
        weight=None,
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
        self.alpha = check_probability("alpha", alpha)
        self.beta = check_probability("beta", beta)

    def per_class_loss(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        return tversky_loss(tp, fp, fn, self.alpha, self.beta, self.smooth_nr, self.smooth_dr)


class FocalTverskyLoss(TverskyLoss):
    """Focal Tversky loss: per image and class ``(1 - TI_c) ** (1 / gamma)``, then the reduction (the mean
    over classes and images by default), with ``TI_c`` as in ``TverskyLoss``.

    Abraham, N. and Khan, N. M. (2019) A Novel Focal Tversky Loss Function with Improved Attention U-Net for
    Lesion Segmentation. ISBI 2019. https://arxiv.org/abs/1810.07842 (Eq. 4: FTL_c = (1 - TI_c)^(1/gamma)).

    The paper weighs false negatives by 0.7 and false positives by 0.3 and finds gamma = 4/3 best (range
    [1, 3]); with MONAI's convention (``alpha`` weighs FP, ``beta`` FN) that is ``alpha=0.3, beta=0.7``.
    With gamma > 1 the exponent 1/gamma < 1 raises the loss and the gradient of nearly-right classes (TI near 1)
    relative to Tversky, so small structures keep being refined late in training. Unlike the seed post and
    segmentation_models_pytorch, the power applies to each class' ``1 - TI`` (not to the mean) and the exponent
    is ``1 / gamma`` (not ``gamma``).

    Args:
        gamma: focusing parameter, > 0; the exponent is ``1 / gamma``. Defaults to 4/3.
        alpha: weight of false positives, in [0, 1]. Defaults to 0.3.
        beta: weight of false negatives, in [0, 1]. Defaults to 0.7.
        The other arguments are those of ``TverskyLoss`` with the same defaults.

    At a perfect prediction the loss is 0 with a zero (not infinite) gradient.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act=None,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 4 / 3,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        ignore_index: int | None = None,
        weight=None,
    ) -> None:
        super().__init__(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            alpha=alpha,
            beta=beta,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            soft_label=soft_label,
            ignore_index=ignore_index,
            weight=weight,
        )
        self.gamma = check_range("gamma", gamma, 0.0, math.inf, low_inclusive=False, high_inclusive=False)

    def per_class_loss(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        return safe_pow(super().per_class_loss(tp, fp, fn), 1 / self.gamma)
