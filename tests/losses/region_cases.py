"""Inputs shared by the region-loss tests (test_dice.py, test_tversky.py): random logits with index, one-hot or
soft targets, ignored voxels, and the loss value + input gradient of one call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SENTINEL = 255
TOL = {"rtol": 1e-5, "atol": 1e-5}
ACTIVATIONS = {
    "softmax": {"softmax": True},
    "sigmoid": {"sigmoid": True},
    "tanh": {"other_act": torch.tanh},
    "none": {},
}


def make_case(spatial, target_kind, ignore, num_classes=3, batch=2, seed=0):
    """Random logits and a target of ``target_kind`` ("index", "onehot" or "soft") with some ignored voxels.

    ``ignore``: None, "class" (class 1 is ignore_index) or "sentinel" (255: label 255 in an index target,
    all-zero voxels in a dense one). Returns (logits, target, ignore_index, to_onehot_y).
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, *spatial, generator=generator)
    labels = torch.randint(0, num_classes, (batch, 1, *spatial), generator=generator)
    dropped = torch.rand(labels.shape, generator=generator) < 0.25
    ignore_index = {None: None, "class": 1, "sentinel": SENTINEL}[ignore]
    if target_kind == "index":
        target = labels.masked_fill(dropped, SENTINEL) if ignore == "sentinel" else labels
        return logits, target.float(), ignore_index, True
    if target_kind == "onehot":
        target = F.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()
    else:
        target = torch.softmax(2 * torch.randn(logits.shape, generator=generator), 1)
    if ignore == "sentinel":
        target = target * ~dropped
    return logits, target, ignore_index, False


def random_case(batch, classes, spatial, seed):
    """float64 logits, class-index labels and a 30 % mask of voxels to ignore, for the property tests."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, classes, *spatial, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=generator)
    ignored = torch.rand(labels.shape, generator=generator) < 0.3
    return logits, labels, ignored


def loss_and_grad(loss, logits, target):
    logits = logits.clone().requires_grad_(True)
    value = loss(logits, target)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    return value.detach(), grad
