"""Lovasz hinge and Lovasz-softmax losses, vectorised over images and classes.

Berman, Rannen Triki and Blaschko, "The Lovasz-Softmax loss: A tractable surrogate for the optimization of
the intersection-over-union measure in neural networks", CVPR 2018, https://arxiv.org/abs/1705.08790

The Lovasz extension of the Jaccard loss at an error vector ``m`` is ``sum_i m_(i) g_i``: the errors sorted
in decreasing order times the gradient ``g`` of Algorithm 1. Every problem (an image and class with
``per_image=True``, else a class over the whole batch) is one row of a single sort that runs without
gradient; its result is scattered back as per-voxel weights, so autograd only sees ``sum(errors * weights)``.
Only the voxels that can get a non-zero weight are sorted (past a problem's last foreground voxel the gradient
is 0, and a hinge error <= 0 adds nothing), never an ignored one; rows of different lengths are padded with
``-inf`` so the padding sorts last and each row's count stands in for its length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .core import (
    EncodedTarget,
    LossInputError,
    SegmentationLoss,
    activate,
    check_activation,
    check_flag,
    first_class,
    flatten_probs,
)

__all__ = ["LovaszHingeLoss", "LovaszSoftmaxLoss", "lovasz_grad", "lovasz_hinge", "lovasz_softmax", "lovasz_weights"]

CLASS_SELECTIONS = ("present", "all")


def lovasz_grad(
    fg_sorted: torch.Tensor,
    valid_count: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    fg_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss (Algorithm 1 of Berman et al. 2018), batched.

    Args:
        fg_sorted: ``(..., N)`` ground truth (bool, 0/1 or soft) of each voxel, ordered by decreasing error.
            Must be 0 on padding voxels.
        valid_count: ``(..., 1)`` (broadcastable) number of voxels that count at the start of each row; the
            rest of the row is padding and gets gradient 0. Defaults to None (all ``N`` count).
        dtype: floating dtype of the result. Defaults to None (``fg_sorted``'s, which must then be floating).
        fg_total: ``(..., 1)`` foreground of each whole problem when the rows hold only its first voxels in
            the order. Defaults to None (the sum of each row).

    Returns:
        ``(..., N)`` tensor.
    """
    dtype = dtype or fg_sorted.dtype
    positions = torch.arange(1, fg_sorted.shape[-1] + 1, dtype=dtype, device=fg_sorted.device)
    # padding adds no voxel to the set
    seen = positions if valid_count is None else torch.minimum(positions, valid_count)
    fg_seen = fg_sorted.cumsum(-1, dtype=dtype)
    fg_total = fg_seen[..., -1:].clone() if fg_total is None else fg_total.to(dtype)
    # The Jaccard loss of the set S_i of the i largest errors is J_i = s_i / u_i with s_i = |S_i| and
    # u_i = |fg u S_i| (= 1 - |fg \ S_i| / |fg u S_i| of Algorithm 1); u_i >= 1 except in a row with no valid
    # voxel, where the clamp gives a zero gradient. In place: these rows are as large as the logits.
    union = fg_seen.neg_().add_(fg_total).add_(seen).clamp_min_(1)
    # g_i = J_i - J_{i-1} as one fraction of non-negative terms, (ds_i |fg \ S_{i-1}| + s_{i-1} fg_i) / (u_i u_{i-1})
    # with ds_i = s_i - s_{i-1} in {0, 1}: the difference of two ratios close to each other (g_i ~ 1/u_i) would
    # lose float32's digits, about 3 % of each weight at 2 x 96^3 voxels.
    grad = torch.empty_like(union)
    grad[..., :1] = seen[..., :1] / union[..., :1]
    body, previous_seen, previous_union = grad[..., 1:], seen[..., :-1], union[..., :-1]
    torch.sub(previous_union, previous_seen, out=body)  # |fg \ S_{i-1}|
    if valid_count is not None:
        body.mul_(positions[1:] <= valid_count)
    body.add_(fg_sorted[..., 1:] * previous_seen)
    body.div_(union[..., 1:]).div_(previous_union)
    return grad


def _pool_batch(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, C, N)`` -> ``(1, C, B N)``: one row per class over every voxel of the batch."""
    return tensor.transpose(0, 1).reshape(1, tensor.shape[1], -1)


def _compact(candidates: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Columns holding the True entries of each row of ``(R, N)`` ``candidates``, as ``(R, M)`` columns, the
    count of each row ``(R, 1)`` and an ``(R, M)`` mask of the entries that are not candidates.

    Rows are left-aligned into ``M`` = the largest count when that at least halves the rows; otherwise the
    full rows are kept and the columns are None (index lists as long as the rows would cost more than they save).
    """
    count = candidates.sum(-1, keepdim=True)
    width = int(count.max()) if count.numel() else 0
    if 2 * width > candidates.shape[-1]:
        return None, count, ~candidates
    rows, columns = candidates.nonzero(as_tuple=True)  # row-major: each row's columns in order
    slots = torch.arange(rows.numel(), device=rows.device) - (count.cumsum(0) - count)[rows, 0]
    compact = columns.new_zeros(candidates.shape[0], width)
    compact[rows, slots] = columns
    return compact, count, torch.arange(width, device=compact.device) >= count


def lovasz_weights(
    errors: torch.Tensor, fg: torch.Tensor, candidates: torch.Tensor, per_image: bool = True
) -> torch.Tensor:
    """Per-voxel weights ``w`` such that ``errors * w`` summed over a problem is its Lovasz extension.

    The extension is linear in the errors once their order is fixed (eq. 9), so autograd only has to keep
    ``w``: no sort, gather, permutation or batch-pooling copy enters the graph, and the single sort of all
    problems runs without gradient. Only ``candidates`` are sorted: every voxel left out must have an error
    no larger than every candidate's and contribute nothing there (past the last foreground voxel of a
    problem the Jaccard loss of the prefix stays 1, so the gradient is 0; a hinge error <= 0 adds 0). The
    candidates then form a prefix of the full order, whose gradient is the same.

    Args:
        errors: ``(B, C, N)`` errors of each image and class.
        fg: ``(B, C, N)`` ground truth (bool, or float for soft targets), 0 at voxels that do not count.
        candidates: ``(B, C, N)`` bool, the voxels that may get a non-zero weight; never an ignored voxel.
        per_image: one problem per image and class; False pools each class over the batch. Defaults to True.

    Returns:
        ``(B, C, N)`` weights, 0 outside ``candidates`` (a view when ``per_image=False``).
    """
    batch, classes, voxels = errors.shape
    with torch.no_grad():
        errors = errors.detach()
        if not per_image:
            errors, fg, candidates = _pool_batch(errors), _pool_batch(fg), _pool_batch(candidates)
        rows_shape = errors.shape
        errors, fg = errors.reshape(-1, rows_shape[-1]), fg.reshape(-1, rows_shape[-1])
        columns, count, excluded = _compact(candidates.reshape(-1, rows_shape[-1]))
        # what is not a candidate sorts after every candidate
        if columns is None:
            key = errors.masked_fill(excluded, -torch.inf)
        else:
            key = errors.gather(-1, columns).masked_fill_(excluded, -torch.inf)
        order = key.sort(dim=-1, descending=True).indices
        del key, excluded
        columns = order if columns is None else columns.gather(-1, order)
        padding = torch.arange(columns.shape[-1], device=columns.device) >= count  # the tail of each sorted row
        fg_sorted = fg.gather(-1, columns).masked_fill_(padding, 0)
        fg_total = fg.sum(-1, keepdim=True, dtype=errors.dtype)  # candidates may leave foreground out
        grad = lovasz_grad(fg_sorted, count.to(errors.dtype), errors.dtype, fg_total)
        weights = torch.zeros_like(errors).scatter_add_(-1, columns, grad).view(rows_shape)
        if per_image:
            return weights
        return weights.view(classes, batch, voxels).transpose(0, 1)


def _drop_ignored(errors: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero the errors of ignored voxels: their weight is 0 already, but an infinite logit there would
    still turn ``0 * inf`` into NaN."""
    return errors if valid is None else errors.masked_fill(~valid, 0.0)


def _problem_sum(values: torch.Tensor, per_image: bool) -> torch.Tensor:
    """Sum ``(B, C, N)`` over each problem: ``(B, C)``, or ``(1, C)`` when the batch is pooled."""
    return values.sum(-1) if per_image else values.sum((0, -1)).unsqueeze(0)


def lovasz_hinge(
    logits: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor | None = None, per_image: bool = True
) -> torch.Tensor:
    """Lovasz hinge (eq. 10, 11): margin errors ``1 - x s`` with signs ``s = 2 fg - 1`` on raw logits.

    Args:
        logits: ``(B, C, N)`` raw scores (no sigmoid: the hinge margin is defined on logits).
        fg: ``(B, C, N)`` binary ground truth (bool, or float), 0 at voxels that do not count.
        valid: ``(B, 1, N)`` bool, True where a voxel counts. Defaults to None.
        per_image: one problem per image and channel, else per channel over the batch. Defaults to True.

    Returns:
        ``(B, C)`` (``(1, C)`` with ``per_image=False``) loss of each problem.
    """
    if fg.dtype == torch.bool:  # index targets: no float one-hot copy
        errors = torch.where(fg, 1 - logits, 1 + logits)
    else:
        errors = 1 - logits * (2 * fg - 1)
    errors = _drop_ignored(errors, valid)  # ignored voxels: error 0, so never a candidate
    weights = lovasz_weights(errors, fg, errors > 0, per_image)  # errors <= 0 add nothing to the hinge
    return _problem_sum(torch.relu(errors) * weights, per_image)


def lovasz_softmax(
    probs: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor | None = None, per_image: bool = True
) -> torch.Tensor:
    """Lovasz-softmax terms (eq. 8, 12): errors ``|fg_c - p_c|`` of each class' probabilities.

    Args:
        probs: ``(B, C, N)`` class probabilities.
        fg: ``(B, C, N)`` ground truth (bool, or float one-hot or soft), 0 at voxels that do not count.
        valid: ``(B, 1, N)`` bool, True where a voxel counts. Defaults to None.
        per_image: one problem per image and class, else per class over the batch. Defaults to True.

    Returns:
        ``(B, C)`` (``(1, C)`` with ``per_image=False``) loss of each problem.
    """
    errors = torch.where(fg, 1 - probs, probs) if fg.dtype == torch.bool else (fg - probs).abs()
    errors = _drop_ignored(errors, valid)
    candidates = _softmax_candidates(errors, fg if fg.dtype == torch.bool else fg > 0, valid, per_image)
    return _problem_sum(errors * lovasz_weights(errors, fg, candidates, per_image), per_image)


def _softmax_candidates(
    errors: torch.Tensor, is_fg: torch.Tensor, valid: torch.Tensor | None, per_image: bool
) -> torch.Tensor:
    """The voxels of each problem that can get a Lovasz weight: its foreground and every voxel whose error is at
    least the smallest foreground error; in a problem without foreground, the voxels at its largest error
    (the extension is then that error). ``is_fg`` is False at ignored voxels."""
    dims = -1 if per_image else (0, -1)
    smallest_fg_error = errors.masked_fill(~is_fg, torch.inf).amin(dims, keepdim=True)
    # ignored voxels hold error 0 (``_drop_ignored``), no more than any valid error, and leave with ``& valid``
    largest_error = errors.amax(dims, keepdim=True)
    has_fg = is_fg.any(-1, keepdim=True) if per_image else is_fg.any(-1, keepdim=True).any(0, keepdim=True)
    candidates = is_fg | (errors >= torch.where(has_fg, smallest_fg_error, largest_error))
    return candidates if valid is None else candidates & valid


def _problems(
    scores: torch.Tensor, encoded: EncodedTarget, include_background: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(scores, foreground, valid)`` as ``(B, C', N)``, ``(B, C', N)`` and ``(B, 1, N)`` (or None).

    The foreground of an index target stays bool (a quarter of a float one-hot).
    """
    scores = flatten_probs(scores)
    first = first_class(scores.shape[1], include_background)
    valid = None if encoded.mask is None else encoded.mask.unsqueeze(1)
    if encoded.indices is not None:
        classes = torch.arange(first, encoded.num_classes, device=scores.device).view(1, -1, 1)
        fg = encoded.indices.unsqueeze(1) == classes
        fg = fg if valid is None else fg & valid
    else:
        fg = encoded.dense[:, first:].to(scores.dtype)
        fg = fg if valid is None else fg * valid
    return scores[:, first:], fg, valid


class _LovaszLoss(SegmentationLoss):
    """MONAI switches shared by both Lovasz losses; a subclass defines ``_table``. With ``reduction="none"`` the
    weighted loss of each image and class, ``BN1[11]`` (``1N1[11]`` with ``per_image=False``), 0 where a class is
    not counted; ``"mean"`` averages the counted classes of each image (or pooled problem), then the images."""

    none_keeps_spatial_axes = True

    def __init__(
        self,
        include_background: bool,
        to_onehot_y: bool,
        per_image: bool,
        reduction: str,
        weight: Sequence[float] | float | torch.Tensor | None,
        ignore_index: int | None,
    ) -> None:
        super().__init__(include_background, to_onehot_y, reduction, weight, ignore_index)
        self.per_image = check_flag("per_image", per_image)

    def _table(self, input: torch.Tensor, encoded: EncodedTarget) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def compute(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        table, counted = self._table(input, encoded)
        return self.finish(table, input.ndim, counted=counted.to(table.dtype))


class LovaszHingeLoss(_LovaszLoss):
    """Lovasz hinge loss (Berman et al. 2018, eq. 10-11): a convex surrogate of the Jaccard loss on raw logits,
    each channel a binary (foreground vs rest) problem.

    The input is used as logits, never passed through a sigmoid (the seed post's version applies one, which
    squeezes the margins into (0, 1) and flattens the hinge). For each image (``per_image=True``) or the whole
    batch and each channel, the margin errors ``1 - x s`` (``s = +1`` on foreground, ``-1`` elsewhere) are
    sorted in decreasing order and their positive parts are weighted by the gradient of the Lovasz extension.
    An image whose voxels are all ignored contributes 0 and still counts in the mean, as in Berman's code.

    Args:
        include_background: if False, channel 0 is excluded. Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices (channel ``c``'s foreground is label ``c``).
            Defaults to False (``target`` is ``BNH[WD]`` binary).
        per_image: one problem per image and channel; False pools the batch per channel. Defaults to True.
        reduction: ``"none" | "mean" | "sum"``; ``"mean"`` averages channels and then images. Defaults to ``"mean"``.
        weight: per-channel weight (scalar, or one value per channel used), multiplies each channel's loss
            (no renormalisation, as MONAI's DiceLoss). Defaults to None.
        ignore_index: target label whose voxels contribute nothing, gradient included (MONAI 1.6.1's rule for
            one-hot targets: a class index masks that class' voxels, any other value masks all-zero voxels).
            Defaults to None.

    Example::

        loss = LovaszHingeLoss(to_onehot_y=True, include_background=False)
        value = loss(logits, labels)  # logits (B, C, H, W, D), labels (B, 1, H, W, D)
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        per_image: bool = True,
        reduction: str = "mean",
        weight: Sequence[float] | float | torch.Tensor | None = None,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(include_background, to_onehot_y, per_image, reduction, weight, ignore_index)

    def _table(self, input: torch.Tensor, encoded: EncodedTarget) -> tuple[torch.Tensor, torch.Tensor]:
        logits = activate(input)  # float32 (float64 kept), no activation
        table = lovasz_hinge(*_problems(logits, encoded, self.include_background), self.per_image)
        return table, torch.ones_like(table, dtype=torch.bool)


class LovaszSoftmaxLoss(_LovaszLoss):
    """Lovasz-softmax loss (Berman et al. 2018, eq. 8 and 12): the Lovasz extension of the per-class Jaccard
    loss at the probability errors ``|fg_c - p_c|``, averaged over classes; 2D and 3D.

    Args:
        include_background: if False, class 0 is excluded from the average (the softmax still uses it).
            Defaults to True.
        to_onehot_y: ``target`` holds ``B1H[WD]`` class indices. Defaults to False (``BNH[WD]`` one-hot or soft).
        softmax: apply a softmax over channels to ``input`` (the loss expects probabilities). Defaults to True,
            unlike MONAI's region losses, because the loss is defined on softmax outputs; set False together
            with ``other_act``, or when ``input`` already holds probabilities.
        other_act: another activation, e.g. ``torch.sigmoid`` for one-channel input; requires
            ``softmax=False``. Defaults to None.
        classes: ``"present"`` averages only the classes present in the target (of each image with
            ``per_image=True``, else of the batch), ignored voxels excluded; ``"all"`` averages every class.
            Defaults to ``"present"``.
        per_image: one problem per image and class, averaged per image then over images; False pools the batch
            (Berman's default). Defaults to False.
        reduction: ``"none" | "mean" | "sum"``. Defaults to ``"mean"``.
        weight: per-class weight (scalar, or one value per class used), multiplies each class' loss (no
            renormalisation, as MONAI's DiceLoss). Defaults to None.
        ignore_index: target label whose voxels contribute nothing, gradient included. Defaults to None.

    Example::

        loss = LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=255)
        value = loss(logits, labels)  # logits (B, C, H, W[, D]), labels (B, 1, H, W[, D])
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        softmax: bool = True,
        other_act: Callable | None = None,
        classes: str = "present",
        per_image: bool = False,
        reduction: str = "mean",
        weight: Sequence[float] | float | torch.Tensor | None = None,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(include_background, to_onehot_y, per_image, reduction, weight, ignore_index)
        self.softmax = check_flag("softmax", softmax)
        check_activation(False, self.softmax, other_act)
        if classes not in CLASS_SELECTIONS:
            raise LossInputError(f"classes must be one of {CLASS_SELECTIONS}, got {classes!r}.")
        self.other_act = other_act
        self.classes = classes

    def _table(self, input: torch.Tensor, encoded: EncodedTarget) -> tuple[torch.Tensor, torch.Tensor]:
        probs = activate(input, softmax=self.softmax, other_act=self.other_act)
        probs, fg, valid = _problems(probs, encoded, self.include_background)
        if self.classes == "all":
            table = lovasz_softmax(probs, fg, valid, self.per_image)
            return table, torch.ones_like(table, dtype=torch.bool)
        counted = _problem_sum(fg, self.per_image) > 0
        present = counted.any(0)
        if bool(present.all()):
            return lovasz_softmax(probs, fg, valid, self.per_image), counted
        # a class absent from every problem counts nowhere: no sort for it (most organs are absent from a patch);
        # the empty sum keeps the zeros in the graph, so a batch with nothing present has a zero gradient
        zeros = _problem_sum(probs[..., :0], self.per_image)
        kept = present.nonzero().squeeze(1)
        if kept.numel() == 0:
            return zeros, counted
        table = lovasz_softmax(probs.index_select(1, kept), fg.index_select(1, kept), valid, self.per_image)
        return zeros.index_copy(1, kept, table), counted
