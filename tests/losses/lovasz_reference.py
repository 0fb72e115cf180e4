"""Plain Lovasz losses written line by line from Algorithm 1 of Berman et al. 2018.

"The Lovasz-Softmax loss: A tractable surrogate for the optimization of the intersection-over-union
measure in neural networks", CVPR 2018, https://arxiv.org/abs/1705.08790

This module is the oracle of ``tests/losses/test_lovasz.py`` and the anchor of ``scripts/benchmark.py``
for :mod:`ctlosses.lovasz`. It is deliberately slow: one sort per image (or batch) and class in
Python loops, ignored voxels dropped by boolean indexing, no padding and no vectorisation tricks, so
that it can be checked by reading it against the paper.

Conventions shared with :mod:`ctlosses.lovasz`:
    - ``scores`` and ``target`` are ``BNH[WD]``: logits for the hinge, probabilities for the softmax
      variant; ``target`` dense (one-hot or soft), ``valid`` a ``BH[WD]`` bool mask of voxels that count.
    - a "table" holds one loss per (group, class): groups are the images with ``per_image=True``,
      otherwise the single group of all voxels of the batch.
    - ``counted`` marks the entries that enter the class average; the "mean" reduction averages the
      counted (weighted) classes of each group, then the groups; a group with nothing counted gives 0.
"""

from __future__ import annotations

import torch


def lovasz_grad_reference(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: gradient of the Lovasz extension of the Jaccard loss, one 1-D problem.

    ``fg_sorted`` holds the ground truth of each voxel, ordered by decreasing error.
    """
    total = fg_sorted.sum()
    intersection = total - fg_sorted.cumsum(0)
    union = total + (1 - fg_sorted).cumsum(0)
    jaccard_loss = 1 - intersection / union
    grad = jaccard_loss.clone()
    grad[1:] = jaccard_loss[1:] - jaccard_loss[:-1]
    return grad


def lovasz_extension_reference(errors: torch.Tensor, fg: torch.Tensor, hinge: bool) -> torch.Tensor:
    """Lovasz extension of the Jaccard loss at ``errors`` (eq. 9 of the paper), one 1-D problem.

    Equal errors keep their voxel order (a stable sort): the extension's value does not depend on their order, its
    gradient does (each order gives a subgradient), and this one is the loss' documented choice."""
    if errors.numel() == 0:
        return errors.sum() * 0.0  # only ignored voxels: nothing to learn, zero gradient
    errors_sorted, order = torch.sort(errors, descending=True, stable=True)
    if hinge:
        errors_sorted = torch.relu(errors_sorted)
    return torch.dot(errors_sorted, lovasz_grad_reference(fg[order]))


def _groups(batch_size: int, per_image: bool) -> list[list[int]]:
    return [[b] for b in range(batch_size)] if per_image else [list(range(batch_size))]


def _valid_voxels(tensor: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Flatten ``tensor`` (images, spatial...) to the 1-D vector of its counted voxels."""
    return tensor.reshape(-1) if valid is None else tensor[valid]


def lovasz_hinge_reference(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, per_image: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lovasz hinge table: each channel a binary problem on raw logits (eq. 10, 11; no sigmoid)."""
    groups = _groups(logits.shape[0], per_image)
    rows = []
    for images in groups:
        row = []
        for c in range(logits.shape[1]):
            mask = None if valid is None else valid[images]
            x = _valid_voxels(logits[images, c], mask)
            fg = _valid_voxels(target[images, c], mask).to(x.dtype)
            signs = 2 * fg - 1
            row.append(lovasz_extension_reference(1 - x * signs, fg, hinge=True))
        rows.append(torch.stack(row))
    table = torch.stack(rows)
    return table, torch.ones_like(table, dtype=torch.bool)


def lovasz_softmax_reference(
    probs: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    per_image: bool = False,
    classes: str = "present",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lovasz-softmax table (eq. 8, 12): errors ``|fg_c - p_c|`` per class; ``classes="present"`` counts
    only the classes with some ground truth among the group's valid voxels."""
    groups = _groups(probs.shape[0], per_image)
    rows, counted_rows = [], []
    for images in groups:
        row, counted = [], []
        for c in range(probs.shape[1]):
            mask = None if valid is None else valid[images]
            p = _valid_voxels(probs[images, c], mask)
            fg = _valid_voxels(target[images, c], mask).to(p.dtype)
            row.append(lovasz_extension_reference((fg - p).abs(), fg, hinge=False))
            counted.append(classes == "all" or bool(fg.sum() > 0))
        rows.append(torch.stack(row))
        counted_rows.append(counted)
    return torch.stack(rows), torch.tensor(counted_rows, dtype=torch.bool)


def reduce_table_reference(
    table: torch.Tensor, counted: torch.Tensor, weight: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Weight each class, then average the counted classes of each group and average the groups
    ("mean"), add everything counted ("sum"), or return the weighted table with uncounted entries 0."""
    weighted = table if weight is None else table * weight
    weighted = weighted * counted
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    group_means = []
    for g in range(table.shape[0]):
        n_counted = int(counted[g].sum())
        group_means.append(weighted[g].sum() / n_counted if n_counted else weighted[g].sum() * 0.0)
    return torch.stack(group_means).mean()
