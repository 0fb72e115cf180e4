"""Focal loss (Lin et al. 2017) per voxel and per class, equal to ``monai.losses.FocalLoss`` 1.6.1.

Index targets (``to_onehot_y=True``) are never one-hot encoded: the sigmoid loss is the ``t = 0`` term on every
channel plus a correction at each voxel's own class (gather / scatter_add); the softmax loss only lives at
each voxel's own class.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .core import (
    EncodedTarget,
    LossInputError,
    SegmentationLoss,
    check_flag,
    check_probability,
    check_range,
    check_weight_length,
    class_sums,
    compute_dtype,
    first_class,
    flatten_probs,
    per_voxel_mean,
    safe_pow,
)

Alpha = float | torch.Tensor | None


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` tensor as ``(1, C, 1)`` to broadcast against ``(B, C, N)``."""
    return values.to(like).view(1, -1, 1)


def _softmax_alpha(alpha: Alpha, num_channels: int, like: torch.Tensor) -> torch.Tensor | None:
    """Per-channel alpha of the softmax loss: a scalar means ``1 - alpha`` for channel 0, ``alpha`` for the rest."""
    if alpha is None or isinstance(alpha, torch.Tensor):
        return alpha
    return torch.tensor([1 - alpha] + [alpha] * (num_channels - 1), dtype=like.dtype, device=like.device)


def sigmoid_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: Alpha = None
) -> torch.Tensor:
    """Element-wise sigmoid focal loss ``-alpha_t (1 - p_t)^gamma log(p_t)`` (Lin et al. 2017, eq. 5).

    Args:
        logits: ``(B, C, N)`` logits.
        target: ``(B, C, N)`` target in [0, 1]. For a soft target the cross-entropy is ``softplus(x) - x t``
            and the modulating factor ``sigmoid(x (1 - 2t))^gamma``, MONAI's generalisation (exact at t in {0, 1}).
        gamma: focusing exponent, >= 0.
        alpha: None; a float (``alpha`` where t = 1, ``1 - alpha`` where t = 0, soft targets interpolate);
            or a ``(C,)`` tensor (``alpha_c`` where ``t == 1``, 1 elsewhere, as MONAI).
    """
    cross_entropy = F.softplus(logits) - logits * target
    # log-space modulating factor: (1 - p_t)^gamma without forming 1 - p (no cancellation for large logits)
    loss = torch.exp(gamma * F.logsigmoid(logits * (1 - 2 * target))) * cross_entropy
    if alpha is None:
        return loss
    if isinstance(alpha, torch.Tensor):
        per_class = _per_channel(alpha, loss)
        return loss * torch.where(target == 1, per_class, torch.ones_like(per_class))
    return loss * (target * alpha + (1 - target) * (1 - alpha))


def softmax_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: Alpha = None
) -> torch.Tensor:
    """Element-wise softmax focal loss ``-alpha_c (1 - p_c)^gamma t_c log(p_c)`` over the channels of ``logits``.

    ``alpha``: None; a float (``1 - alpha`` for channel 0, ``alpha`` for the others); or a ``(C,)`` tensor.
    """
    log_probs = logits.log_softmax(1)
    loss = -safe_pow(1 - log_probs.exp(), gamma) * log_probs * target
    per_class = _softmax_alpha(alpha, logits.shape[1], loss)
    return loss if per_class is None else loss * _per_channel(per_class, loss)


def _index_focal_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    labelled: torch.Tensor | None,
    gamma: float,
    alpha: Alpha,
    use_softmax: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The focal loss of an index target as ``base + one_hot(labels) * at_label`` without building the one-hot.

    Args:
        logits: ``(B, C, N)``; labels: ``(B, N)`` long in [0, C); labelled: ``(B, N)`` bool, False where the
            voxel has no positive channel (ignored, or background dropped) or None when all have one.

    Returns:
        ``base`` (``(B, C, N)``, the sigmoid ``t = 0`` term on every channel but each voxel's own, which holds 0;
        None for softmax) and ``at_label`` (``(B, N)``, the loss of the voxel's own channel: its ``t = 1`` term,
        or its ``t = 0`` term where it is not labelled). The own channel is left out of ``base`` rather than
        subtracted again: a confident voxel's ``t = 0`` term there is about its logit, and removing it from a
        sum of them would cancel most of float32's digits.
    """
    labels_c = labels.unsqueeze(1)
    if use_softmax:
        per_class = _softmax_alpha(alpha, logits.shape[1], logits)
        log_prob = logits.log_softmax(1).gather(1, labels_c).squeeze(1)
        at_label = -safe_pow(1 - log_prob.exp(), gamma) * log_prob
        if per_class is not None:
            at_label = at_label * per_class.to(at_label)[labels]
        base = None
    else:
        alpha_neg, alpha_pos = 1.0, None
        if isinstance(alpha, torch.Tensor):
            alpha_pos = alpha.to(logits)[labels]
        elif alpha is not None:
            alpha_neg, alpha_pos = 1 - alpha, alpha
        logit = logits.gather(1, labels_c).squeeze(1)
        # the logit times 0, not 0: a non-finite logit there still makes the loss non-finite
        base = F.softplus(logits) * torch.exp(gamma * F.logsigmoid(logits)) * alpha_neg
        base = base.scatter_(1, labels_c, (logit * 0).unsqueeze(1))
        positive = F.softplus(-logit) * torch.exp(gamma * F.logsigmoid(-logit))
        if alpha_pos is not None:
            positive = positive * alpha_pos
        if labelled is None:
            return base, positive
        negative = F.softplus(logit) * torch.exp(gamma * F.logsigmoid(logit)) * alpha_neg
        return base, torch.where(labelled, positive, negative)
    if labelled is not None:
        at_label = at_label * labelled
    return base, at_label


class FocalLoss(SegmentationLoss):
    """Focal loss per voxel and class (Lin et al. 2017), equal to ``monai.losses.FocalLoss`` 1.6.1, computed in
    float32 and without a one-hot copy of index targets.

    With ``p`` the sigmoid of each channel (``use_softmax=False``, each channel a binary problem) or the softmax
    over channels (``use_softmax=True``) and ``p_t = p`` where the target is 1, ``1 - p`` where it is 0:

        FL = -alpha_t (1 - p_t)^gamma log(p_t)

    ``gamma = 0`` and ``alpha = None`` give ``BCEWithLogitsLoss`` (sigmoid) or the cross-entropy (softmax).

    ``input`` is ``BNH[WD]`` logits (N classes); ``target`` ``BNH[WD]`` (one-hot or soft) or ``B1H[WD]``
    class indices with ``to_onehot_y=True``.

    References:
        Lin, T.-Y. et al. (2017) Focal Loss for Dense Object Detection. ICCV 2017. https://arxiv.org/abs/1708.02002

        Zhu, W. et al. (2019) AnatomyNet: Deep learning for fast and fully automated whole-volume segmentation
        of head and neck anatomy. Medical Physics 46(2).

    Args:
        include_background: if False, channel 0 is dropped from input and target *before* the softmax (as MONAI).
            Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices (ignored, with a warning, for one channel).
            Defaults to False.
        gamma: focusing exponent, >= 0. Defaults to 2.0.
        alpha: balance factor in [0, 1]: a number (sigmoid: ``alpha`` on positives, ``1 - alpha`` on negatives;
            softmax: ``1 - alpha`` for channel 0, ``alpha`` for the others, ignored with a warning when
            ``include_background=False``) or one value per channel used (sigmoid: applied where the target is
            exactly 1; softmax: per class). Defaults to None.
        weight: per-class weight multiplying each channel's loss: a number >= 0, or one value per channel used
            (not for a single channel, as MONAI). Defaults to None.
        reduction: ``"none"`` (``BN'H[WD]``), ``"mean"`` or ``"sum"``. ``"mean"`` divides by the number of
            elements, or with ``ignore_index`` by the number of voxels that count (not times the channels:
            MONAI 1.6.1's rule, kept so numbers match). ``"sum"`` sums the per-image, per-class spatial means
            (over the voxels that count). Defaults to ``"mean"``.
        use_softmax: softmax over channels instead of a sigmoid per channel. Defaults to False.
        ignore_index: voxels whose target equals it contribute nothing, gradient included (MONAI 1.6.1 semantics
            for one-hot targets: an in-range value masks that class' voxels, a sentinel masks all-zero voxels).
            Defaults to None.

    Raises:
        LossInputError: (a ``ValueError`` and ``AssertionError``) for gamma < 0, alpha outside [0, 1], a bad
            reduction or weight, mismatched shapes or labels outside ``[0, N)``.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        reduction: str = "mean",
        use_softmax: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(include_background, to_onehot_y, reduction, weight, ignore_index)
        self.gamma = check_range("gamma", gamma, 0.0)
        self.use_softmax = check_flag("use_softmax", use_softmax)
        self.alpha: Alpha
        if alpha is None or isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            self.alpha = None if alpha is None else check_probability("alpha", alpha)
        else:
            values = torch.as_tensor(alpha, dtype=torch.float32).detach().clone().reshape(-1)
            for value in values.tolist():
                check_probability("alpha", value)
            self.register_buffer("alpha", values)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``BNH[WD]`` logits, any floating dtype (computed in float32; float64 stays float64), or ``BN``
                classification logits, as MONAI's FocalLoss takes them.
            target: ``BNH[WD]`` one-hot or soft target, or ``B1H[WD]`` class indices with ``to_onehot_y``
                (``BN`` / ``B1`` for classification logits).

        Returns:
            a scalar, or for ``"none"`` the element-wise loss ``BN'H[WD]`` (N' = N - 1 without background;
            ``BN'`` for classification logits).
        """
        if isinstance(input, torch.Tensor) and input.ndim == 2:
            # a classification batch is a segmentation of one voxel per image
            as_image = target.unsqueeze(-1) if isinstance(target, torch.Tensor) and target.ndim == 2 else target
            loss = self.forward(input.unsqueeze(-1), as_image)
            return loss.squeeze(-1) if self.reduction == "none" else loss
        return super().forward(input, target)

    def compute(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        logits = flatten_probs(input.to(compute_dtype(input.dtype)))
        first = first_class(logits.shape[1], self.include_background)
        logits = logits[:, first:]
        alpha = self._alpha(logits.shape[1])
        weight = self._channel_weight(logits.shape[1], logits)
        mask = None if encoded.mask_weight is None else encoded.mask_weight.to(logits)
        if self.reduction == "none":
            return self._none(self._terms(logits, encoded, first, alpha, mask, True), mask, weight, input.shape)
        totals = self._terms(logits, encoded, first, alpha, mask, False)  # (B, C') over the voxels that count
        totals = totals if weight is None else totals * weight
        voxels = torch.full_like(totals[:, :1], logits.shape[-1]) if mask is None else mask.sum(-1, keepdim=True)
        # MONAI 1.6.1's mean: over voxels x classes without a mask, over the voxels that count (not x classes) with one
        per_voxel = per_voxel_mean(totals, voxels)
        return self.finish(per_voxel, input.ndim, weight=None, voxel_counts=None if mask is None else voxels)

    def _alpha(self, num_channels: int) -> Alpha:
        alpha = self.alpha
        if self.use_softmax and not self.include_background and isinstance(alpha, float):
            warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.", stacklevel=4)
            alpha = None
        if self.use_softmax and num_channels == 1:
            warnings.warn("softmax over a single channel is constant: the focal loss is 0.", stacklevel=4)
        if isinstance(alpha, torch.Tensor) and alpha.numel() != num_channels:
            raise LossInputError(
                f"alpha has {alpha.numel()} values but the loss has {num_channels} channels "
                "(without the background class 0 when include_background=False)."
            )
        return alpha

    def _terms(self, logits, encoded, first: int, alpha: Alpha, mask, elementwise: bool) -> torch.Tensor:
        """The element-wise loss ``(B, C', N)`` (unmasked), or its per-class sums ``(B, C')`` over the voxels that
        count."""
        if encoded.indices is not None:
            labels, labelled = encoded.indices, encoded.mask
            if first:
                labelled = labels > 0 if labelled is None else labelled & (labels > 0)
                labels = (labels - 1).clamp_min(0)
            base, at_label = _index_focal_terms(logits, labels, labelled, self.gamma, alpha, self.use_softmax)
            if elementwise:
                loss = torch.zeros_like(logits) if base is None else base
                return loss.scatter_add(1, labels.unsqueeze(1), at_label.unsqueeze(1))
            totals = class_sums(at_label if mask is None else at_label * mask, labels, logits.shape[1])
            if base is None:
                return totals
            return totals + (base.sum(-1) if mask is None else torch.einsum("bcn,bn->bc", base, mask))
        dense = encoded.dense[:, first:]
        if mask is not None:
            # MONAI masks logits and target before the loss (matters only for soft masks)
            logits, dense = logits * mask.unsqueeze(1), dense * mask.unsqueeze(1)
        loss = (softmax_focal_loss if self.use_softmax else sigmoid_focal_loss)(logits, dense, self.gamma, alpha)
        if elementwise:
            return loss
        return loss.sum(-1) if mask is None else torch.einsum("bcn,bn->bc", loss, mask)

    def _channel_weight(self, num_channels: int, like: torch.Tensor) -> torch.Tensor | None:
        """The class weight as ``(C',)`` or a scalar; MONAI refuses a per-class weight for a single channel."""
        hint = "one value per channel used, without the background class 0 when include_background=False, or a "
        hint += "number for a single channel"
        weight = check_weight_length(self.class_weight, num_channels, hint, single_class_ok=False)
        return None if weight is None else weight.to(like)

    @staticmethod
    def _none(loss: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor | None, shape) -> torch.Tensor:
        if mask is not None:
            loss = loss * mask.unsqueeze(1)
        if weight is not None:
            loss = loss * (weight if weight.ndim == 0 else weight.view(1, -1, 1))
        return loss.reshape(loss.shape[0], loss.shape[1], *shape[2:])
