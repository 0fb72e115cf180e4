"""Lovasz hinge and Lovasz-softmax losses, vectorised over images and classes.

Berman, Rannen Triki and Blaschko, "The Lovasz-Softmax loss: A tractable surrogate for the optimization of
the intersection-over-union measure in neural networks", CVPR 2018, https://arxiv.org/abs/1705.08790

The Lovasz extension of the Jaccard loss at an error vector ``m`` is ``sum_i m_(i) g_i``: the errors sorted
in decreasing order times the gradient ``g`` of Algorithm 1. Every problem (an image and class with
``per_image=True``, else a class over the whole batch) is a run of one sort of int64 keys (problem, error bits,
voxel), which runs without gradient. Only the voxels that can get a non-zero weight are sorted (past a problem's
last foreground voxel the gradient is 0, and a hinge error <= 0 adds nothing), never an ignored one. The extension
is linear in the errors once their order is fixed, so its gradient is ``g`` times each error's slope (+-1), written
straight into the sorted voxels' positions: autograd keeps no sort, gather or per-voxel weight tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
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
from .dice_combos import check_lambda_ce, cross_entropy_beside

__all__ = ["LovaszHingeLoss", "LovaszSoftmaxLoss", "lovasz_grad", "lovasz_hinge", "lovasz_softmax", "lovasz_weights"]

CLASS_SELECTIONS = ("present", "all")


def jaccard_steps(union, seen_before, fg, step: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 1's gradient ``g_i = J_i - J_{i-1}`` at each sorted position, elementwise, from ``u_i = |fg u S_i|``
    (``S_i``: the ``i`` largest errors), ``s_{i-1} = |S_{i-1}|`` and the voxel's own foreground ``fg_i``, all three
    overwritten (they are as large as the sorted voxels; the result is in ``fg``'s memory).

    With ``J_i = s_i / u_i``, ``g_i`` is one fraction of non-negative terms, ``(ds_i (u_{i-1} - s_{i-1}) + s_{i-1}
    fg_i) / (u_i u_{i-1})``, where ``ds_i = s_i - s_{i-1}`` (``step``: 0 on padding, None for 1) and ``u_{i-1} = u_i
    - ds_i + fg_i``: the difference of two close ratios (``g_i ~ 1/u_i``) would lose float32's digits, about 3 % of
    each weight at 2 x 96^3 voxels. The clamps only act before the first voxel of a problem without foreground
    (``g_1 = 1``) and on padding.
    """
    union_before = (union - (1 if step is None else step)).add_(fg).clamp_min_(1)
    if step is None:  # the numerator as u_{i-1} - s_{i-1} (1 - fg_i)
        numerator = fg.neg_().add_(1).mul_(seen_before).neg_().add_(union_before)
    else:
        numerator = fg.mul_(seen_before).addcmul_(union_before.sub(seen_before), step)
    return numerator.div_(union.clamp_min_(1)).div_(union_before)


def lovasz_grad(
    fg_sorted: torch.Tensor,
    valid_count: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    fg_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss (Algorithm 1 of Berman et al. 2018), batched over rows.

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
    fg = fg_sorted.to(dtype, copy=True)
    fg_seen = fg.cumsum(-1)
    fg_total = fg_seen[..., -1:].clone() if fg_total is None else fg_total.to(dtype)
    if valid_count is None:
        return jaccard_steps(fg_seen.neg_().add_(fg_total).add_(positions), positions - 1, fg)
    # padding adds no voxel to the set
    step = (positions <= valid_count).to(dtype)
    seen = torch.minimum(positions, valid_count)
    return jaccard_steps(fg_seen.neg_().add_(fg_total).add_(seen), seen - step, fg, step)


# ---------------------------------------------------------------------------------------------------------
# the one sort: each problem's candidates by decreasing error, equal errors in voxel order (what a stable sort of
# the problem's voxels gives, as in the reference)


def _descending_bits(errors: torch.Tensor) -> torch.Tensor:
    """int32, smaller for a larger float32 error: the IEEE bits made monotone (a negative float's magnitude bits
    flipped), then inverted. ``errors`` is a temporary: -0.0 is folded into +0.0 in place, so that equal errors get
    equal keys. (A NaN error sorts first or last by its sign; the loss is NaN either way.)"""
    bits = errors.add_(0.0).view(torch.int32)
    return (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits).bitwise_not_()


class Problems(NamedTuple):
    """The Lovasz problems of a batch (an image and class with ``per_image``, else a class over the batch).

    ``scores`` ``(B, C, N)`` contiguous; ``fg`` ``(B, C, N)`` ground truth (bool for index targets, else float), 0
    where a voxel does not count; ``valid`` ``(B, 1, N)`` bool or None; ``fg_total`` ``(B, C)`` foreground of each
    image and class; ``labels`` ``(B, N)`` class indices of an index target (None otherwise); ``first`` the first
    class that is a problem (1 without the background).
    """

    scores: torch.Tensor
    fg: torch.Tensor
    valid: torch.Tensor | None
    fg_total: torch.Tensor
    labels: torch.Tensor | None
    first: int
    per_image: bool

    def per_problem(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` sums per image and class -> ``(B, C')`` per problem (``(1, C')`` pooled)."""
        values = values[:, self.first :]
        return values if self.per_image else values.sum(0, keepdim=True)

    def chunk_rows(self) -> torch.Tensor:
        """The problem (row of the loss table, row-major) of each ``(b, c)`` chunk of ``N`` voxels, ``(B C,)``; 0 for
        a class below ``first``, which holds no candidate."""
        batch, classes = self.scores.shape[:2]
        kept = classes - self.first
        if self.per_image:
            rows = [b * kept + max(0, c - self.first) for b in range(batch) for c in range(classes)]
        else:
            rows = [max(0, c - self.first) for _ in range(batch) for c in range(classes)]
        return torch.tensor(rows, device=self.scores.device)


class SortedProblems(NamedTuple):
    """The candidates of all problems, problem after problem, each by decreasing error (``K`` in all):
    ``positions`` (int64 flat indices into ``(B, C, N)``), ``rows`` (their problem, int32), the ``errors`` and
    ``fg`` there; ``counts`` and ``fg_total`` (the whole foreground) of each problem, ``(R,)``."""

    positions: torch.Tensor
    rows: torch.Tensor
    errors: torch.Tensor
    fg: torch.Tensor
    counts: torch.Tensor
    fg_total: torch.Tensor


def sort_problems(problems: Problems, errors: torch.Tensor, candidates: torch.Tensor) -> SortedProblems:
    """Sort the ``candidates`` (``(B, C, N)`` bool: the voxels that may get a non-zero weight, none below class
    ``first``) of every problem by decreasing ``errors`` (``(B, C, N)``), equal errors in voxel order (as a stable
    sort of the problem's voxels, the reference's), in one sort.

    Candidate-sized tensors are int32 / float32 where they can be: an int64 one of a few million candidates is
    above glibc's mmap threshold (32 MB), so each new one costs page faults, as much as several operations."""
    errors, fg = errors.contiguous().view(-1), problems.fg.contiguous().view(-1)
    chunk_rows = problems.chunk_rows()
    flat = candidates.contiguous().view(-1).nonzero().squeeze(1)  # chunk after chunk, each in voxel order
    chunk_starts = torch.arange(0, candidates.numel() + 1, candidates.shape[-1], device=flat.device)
    chunk_counts = torch.searchsorted(flat, chunk_starts).diff()
    counts = chunk_counts.new_zeros(int(chunk_rows.max()) + 1).index_add_(0, chunk_rows, chunk_counts)
    # index_select: several times faster than indexing with [flat] on a CPU
    keys = errors.index_select(0, flat)
    rows, positions = _sort_packed(
        keys, flat, chunk_rows, chunk_counts, counts, candidates.shape[-1], problems.per_image
    )
    fg_total = problems.per_problem(problems.fg_total).reshape(-1)
    return SortedProblems(
        positions, rows, errors.index_select(0, positions), fg.index_select(0, positions), counts, fg_total
    )


def _sort_packed(
    errors, flat, chunk_rows, chunk_counts, counts, voxels, per_image
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row (int32) and position of each candidate, row by row, each row by decreasing error, then position.

    One sort of int64 keys ``row * 2^(32 + P) + error bits * 2^P + position`` (P bits for a position), built in
    ``flat``'s memory word by word with int32 operations (a mixed int64/int32 operation is several times slower);
    numpy's in-place sort on a CPU (several times faster than torch's for int64). float64 errors, keys that would
    not fit in 63 bits (above 2^31 / R scores) or a big-endian machine take two stable sorts instead (errors, then
    rows)."""
    position_bits = max(1, (chunk_counts.numel() * voxels - 1).bit_length())
    rows = _runs(chunk_rows, chunk_counts, flat.numel())  # in the candidates' order
    too_wide = max(1, counts.numel() - 1).bit_length() + position_bits > 31  # the high word stays >= 0
    if errors.dtype == torch.float64 or too_wide or sys.byteorder != "little":
        order = errors.sort(descending=True, stable=True).indices
        order = order.index_select(0, rows.index_select(0, order).sort(stable=True).indices)
        return rows.index_select(0, order), flat.index_select(0, order)
    # the error's 32 bits as an unsigned number, split between the key's low word (above the position) and its
    # high word (below the row)
    error_bits = _descending_bits(errors).bitwise_xor_(-(2**31))
    low, high = flat.view(torch.int32)[0::2], flat.view(torch.int32)[1::2]
    low.bitwise_or_(error_bits << position_bits)
    high.copy_((error_bits >> (32 - position_bits)).bitwise_and_((1 << position_bits) - 1))
    high.bitwise_or_(rows.bitwise_left_shift_(position_bits))
    # a problem per image and class is a run of chunks, so the keys split between chunks without interleaving
    _sort_keys(flat, chunk_counts.cumsum(0).tolist() if per_image else [])
    return flat.view(torch.int32)[1::2] >> position_bits, flat.bitwise_and_((1 << position_bits) - 1)


def _runs(values: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    """``values.repeat_interleave(counts)`` as int32, from a cumulative sum of the steps at each run's start
    (``repeat_interleave`` builds int64 indices on the way, several times slower)."""
    steps = torch.zeros(total + 1, dtype=torch.int32, device=values.device)
    starts = counts.cumsum(0) - counts
    jumps = values.diff(prepend=values.new_zeros(1)).int()
    steps.index_add_(0, starts, jumps)  # empty runs add their step at the next run's start
    return steps[:total].cumsum(0, dtype=torch.int32)


def _sort_keys(keys: torch.Tensor, splits: list[int]) -> None:
    """Sort int64 ``keys`` in place: numpy's sort on a CPU (several times faster than torch's for int64). ``splits``:
    offsets where the keys can be cut into parts that do not interleave; such parts are sorted in parallel, one
    per torch thread (numpy's sort releases the GIL)."""
    if keys.device.type != "cpu":
        keys.copy_(keys.sort().values)
        return
    array, parts = keys.numpy(), min(torch.get_num_threads(), 1 + len(splits))
    cuts = [0, *sorted({min(splits, key=lambda s: abs(s - i * keys.numel() // parts)) for i in range(1, parts)})]
    pieces = [array[start:stop] for start, stop in zip(cuts, [*cuts[1:], keys.numel()])]
    if len(pieces) == 1 or keys.numel() < 2**16:
        array.sort()
        return
    with ThreadPoolExecutor(len(pieces)) as pool:
        list(pool.map(np.ndarray.sort, pieces))


def _sorted_grad(ordered: SortedProblems, dtype: torch.dtype) -> torch.Tensor:
    """Algorithm 1's gradient at every sorted candidate, ``(K,)``, from cumulative counts over all the problems at
    once and one constant per problem (in float64 for soft targets or past float32's exact 2^24)."""
    rows, counts = ordered.rows, ordered.counts
    exact = dtype == torch.float64 or (ordered.fg.dtype == torch.bool and ordered.fg.numel() <= 2**24)
    fg = ordered.fg.to(dtype if exact else torch.float64, copy=True)
    starts = (counts.cumsum(0) - counts).to(fg.dtype)
    # each problem's foreground before its first candidate (a problem without candidates has none to correct)
    first = starts.long().clamp_max(max(0, fg.numel() - 1))
    union = fg.cumsum(0)
    fg_before = union[first] - fg[first] if fg.numel() else starts
    position = torch.arange(1, fg.numel() + 1, dtype=fg.dtype, device=fg.device)
    # u_i = T - F_i + s_i with F_i = cumulative fg - fg_before and s_i = position - start, per problem
    union.neg_().add_(position).add_((ordered.fg_total.to(fg.dtype) + fg_before - starts).index_select(0, rows))
    seen_before = position.sub_((starts + 1).index_select(0, rows))
    return jaccard_steps(union, seen_before, fg).to(dtype)


def lovasz_weights(
    errors: torch.Tensor, fg: torch.Tensor, candidates: torch.Tensor, per_image: bool = True
) -> torch.Tensor:
    """Per-voxel weights ``w`` such that ``errors * w`` summed over a problem is its Lovasz extension.

    Only ``candidates`` are sorted: every voxel left out must have an error no larger than every candidate's and
    contribute nothing there (past the last foreground voxel of a problem the Jaccard loss of the prefix stays 1,
    so the gradient is 0; a hinge error <= 0 adds 0). The candidates then form a prefix of the full order, whose
    gradient is the same.

    Args:
        errors: ``(B, C, N)`` errors of each image and class.
        fg: ``(B, C, N)`` ground truth (bool, or float for soft targets), 0 at voxels that do not count.
        candidates: ``(B, C, N)`` bool, the voxels that may get a non-zero weight; never an ignored voxel.
        per_image: one problem per image and class; False pools each class over the batch. Defaults to True.

    Returns:
        ``(B, C, N)`` weights, 0 outside ``candidates``.
    """
    errors = errors.detach().contiguous()
    problems = Problems(errors, fg, None, fg.sum(-1, dtype=errors.dtype), None, 0, per_image)
    ordered = sort_problems(problems, errors, candidates)
    weights = torch.zeros_like(errors)
    weights.view(-1).scatter_(0, ordered.positions, _sorted_grad(ordered, errors.dtype))
    return weights


class _LovaszExtension(torch.autograd.Function):
    """The Lovasz extension ``sum_i e_(i) g_i`` of every problem, ``(B, C')`` (``(1, C')`` pooled), from the scores.

    ``errors`` ``(B, C, N)`` are the scores' errors (no gradient), whose derivative w.r.t. the score is -1 on a hard
    foreground voxel and +1 elsewhere, or ``slopes(positions, fg)`` for a soft target. The backward writes the
    weights times the slopes into the sorted voxels' positions of a zero gradient, the only full-size tensor either
    pass adds; kept between them: each candidate's position, problem and signed weight.
    """

    @staticmethod
    def forward(ctx, scores, problems, errors, candidates, slopes):
        ordered = sort_problems(problems, errors, candidates)
        weights = _sorted_grad(ordered, scores.dtype)
        if slopes is None:
            ctx.signed = torch.where(ordered.fg, -weights, weights)
        else:
            ctx.signed = slopes(ordered.positions, ordered.fg).mul_(weights)
        # each problem's sum on its own run of candidates (torch.sum adds pairwise: no error growing with the run)
        products = ordered.errors.mul_(weights).split(ordered.counts.tolist())
        table = torch.stack([run.sum() for run in products]) if products else scores.new_zeros(0)
        ctx.positions, ctx.rows, ctx.shape = ordered.positions, ordered.rows, scores.shape
        return table.view(scores.shape[0] if problems.per_image else 1, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_table):
        signed = ctx.signed * grad_table.reshape(-1).index_select(0, ctx.rows)
        grad = grad_table.new_zeros(ctx.shape)
        grad.view(-1).scatter_(0, ctx.positions, signed)
        return grad, None, None, None, None


def lovasz_hinge(problems: Problems) -> torch.Tensor:
    """Lovasz hinge (eq. 10, 11) of every problem, ``(B, C')`` (``(1, C')`` pooled): margin errors ``1 - x s`` with
    signs ``s = 2 fg - 1`` on raw logits (``problems.scores``; no sigmoid: the margin is defined on logits). The
    hinge's ``max(0, .)`` is the identity on the candidates, the voxels with a positive error."""
    logits, fg = problems.scores, problems.fg
    if fg.dtype == torch.bool:  # index targets: no float one-hot copy
        errors, slopes = torch.where(fg, -logits, logits).add_(1), None
    else:
        signs = 2 * fg - 1
        errors, slopes = 1 - logits * signs, lambda _, fg: 1 - 2 * fg
    candidates = errors.le(0).logical_not_()  # NaN included, so that a non-finite logit shows
    return _LovaszExtension.apply(logits, problems, errors, _keep(candidates, problems), slopes)


def lovasz_softmax(problems: Problems, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Lovasz-softmax terms (eq. 8, 12) of every problem, ``(B, C')`` (``(1, C')`` pooled): errors ``|fg_c - p_c|``
    of each class' probabilities (``problems.scores``). A problem not ``counted`` (``(B, C')`` / ``(1, C')`` bool;
    None: all) is not sorted and gives 0, unless a NaN score shows there."""
    probs, fg = problems.scores, problems.fg
    errors = torch.where(fg, 1 - probs, probs) if fg.dtype == torch.bool else (fg - probs).abs()

    def soft_slopes(positions, fg):
        return (probs.view(-1).index_select(0, positions) - fg).sign_()

    slopes = None if fg.dtype == torch.bool else soft_slopes
    candidates = _keep(_softmax_candidates(problems, errors, counted), problems)
    return _LovaszExtension.apply(probs, problems, errors, candidates, slopes)


def _keep(candidates: torch.Tensor, problems: Problems) -> torch.Tensor:
    """Never an ignored voxel nor a class below ``first``."""
    if problems.valid is not None:
        candidates &= problems.valid
    candidates[:, : problems.first] = False
    return candidates


def _softmax_candidates(problems: Problems, errors: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
    """The voxels of each problem that can get a Lovasz weight: its foreground and every voxel whose error is at
    least the smallest foreground error; in a problem without foreground, the voxels at its largest error (the
    extension is then that error); none in a problem that is not ``counted``. NaN scores are kept, so they show."""
    probs, fg, first, per_image = problems.scores, problems.fg, problems.first, problems.per_image
    dims = -1 if per_image else (0, -1)
    if problems.labels is not None:
        # a foreground voxel's error is 1 - p, smallest where p is largest, which the probability of each voxel's
        # own class gives in one pass over the voxels (not the classes x voxels)
        own = probs.gather(1, problems.labels.unsqueeze(1)).squeeze(1)
        own = own if problems.valid is None else own.masked_fill(~problems.valid[:, 0], -torch.inf)
        largest = probs.new_full(problems.fg_total.shape, -torch.inf).scatter_reduce_(1, problems.labels, own, "amax")
        smallest_fg_error = 1 - (largest if per_image else largest.amax(0, keepdim=True)).unsqueeze(-1)
    else:
        smallest_fg_error = errors.masked_fill(fg <= 0, torch.inf).amin(dims, keepdim=True)
    has_fg = (problems.fg_total if per_image else problems.fg_total.sum(0, keepdim=True)).unsqueeze(-1) > 0
    threshold = smallest_fg_error
    without_fg = ~has_fg[:, first:] if counted is None else ~has_fg[:, first:] & counted.unsqueeze(-1)
    if bool(without_fg.any()):  # the largest error of a problem without foreground, over its valid voxels
        scored = errors if problems.valid is None else errors.masked_fill(~problems.valid, -torch.inf)
        threshold = torch.where(has_fg, threshold, scored.amax(dims, keepdim=True))
    if counted is not None:  # a problem whose value is not used: no candidate
        threshold[:, first:].masked_fill_(~counted.unsqueeze(-1), torch.inf)
    # a foreground voxel's error is at least its problem's smallest foreground error: no need to add the foreground
    return torch.lt(errors, threshold).logical_not_()


def _problems(scores: torch.Tensor, encoded: EncodedTarget, include_background: bool, per_image: bool) -> Problems:
    """The problems of ``BNH[WD]`` scores and their target. The foreground of an index target stays bool (a quarter
    of a float one-hot) and its counts come from one pass over the labels."""
    scores = flatten_probs(scores).contiguous()
    batch, classes = scores.shape[:2]
    first = first_class(classes, include_background)
    valid = None if encoded.mask is None else encoded.mask.unsqueeze(1)
    labels = encoded.indices
    if labels is None:
        fg = encoded.dense.to(scores.dtype)
        fg = fg if valid is None else fg * valid
        return Problems(scores, fg, valid, fg.sum(-1), None, first, per_image)
    fg = labels.unsqueeze(1) == torch.arange(classes, device=scores.device).view(1, -1, 1)
    fg = fg if valid is None else fg & valid
    counts = torch.ones_like(labels, dtype=torch.int32) if valid is None else valid[:, 0].to(torch.int32)
    fg_total = counts.new_zeros(batch, classes).scatter_add_(1, labels, counts)
    return Problems(scores, fg, valid, fg_total, labels, first, per_image)


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
        lambda_ce: weight of a cross-entropy term on the same logits, added to the hinge: softmax cross-entropy
            over all channels (``torch.nn.CrossEntropyLoss``, background included, unweighted) for N > 1 channels,
            binary cross-entropy with logits for one, ignored voxels left out, as ``DiceCELoss``'s CE term.
            Berman et al. use the hinge for binary problems and the Lovasz losses beside a cross-entropy or to
            fine-tune; on a 14-class problem trained from scratch the pure hinge (the default, 0) learns nothing,
            and beside a cross-entropy weighted twenty times it learns, slowly (``docs/losses.md``).
            Not with ``reduction="none"`` (the hinge is per channel, the CE per voxel).

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
        lambda_ce: float = 0.0,
    ) -> None:
        super().__init__(include_background, to_onehot_y, per_image, reduction, weight, ignore_index)
        self.lambda_ce = check_lambda_ce(lambda_ce, self.reduction, "image and channel")

    def _table(self, input: torch.Tensor, encoded: EncodedTarget) -> tuple[torch.Tensor, torch.Tensor]:
        table = lovasz_hinge(_problems(activate(input), encoded, self.include_background, self.per_image))
        return table, torch.ones_like(table, dtype=torch.bool)

    def compute(self, input: torch.Tensor, encoded: EncodedTarget) -> torch.Tensor:
        hinge = super().compute(input, encoded)
        if self.lambda_ce == 0:
            return hinge
        return hinge + self.lambda_ce * cross_entropy_beside(input, encoded, self.reduction)


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
        problems = _problems(probs, encoded, self.include_background, self.per_image)
        if self.classes == "all":
            table = lovasz_softmax(problems)
            return table, torch.ones_like(table, dtype=torch.bool)
        # a class absent from a problem counts nowhere and is not sorted (most organs are absent from a patch)
        counted = problems.per_problem(problems.fg_total) > 0
        return lovasz_softmax(problems, counted), counted
