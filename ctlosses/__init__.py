"""ctlosses: MONAI-compatible segmentation losses on one shared core (``ctlosses.core``), and per-organ metrics.

Every class is a ``torch.nn.Module`` with ``forward(input, target)``; ``LOSSES`` maps registry names to
classes and ``get_loss(name, **kwargs)`` builds one from a config::

    {"_target_": "ctlosses.get_loss", "name": "focal_tversky", "to_onehot_y": true, "softmax": true}

Adding a loss: one module, one line in ``LOSSES`` below, one preset in ``configs/losses/`` (docs/losses.md,
"Adding a loss").
"""

from __future__ import annotations

import torch

from .combo import ComboLoss
from .core import LossInputError
from .dice import DiceLoss, IoULoss, JaccardLoss
from .dice_combos import DiceBCELoss, DiceCELoss, DiceFocalLoss
from .focal import FocalLoss
from .generalized_dice import GeneralizedDiceLoss
from .lovasz import LovaszHingeLoss, LovaszSoftmaxLoss
from .tversky import FocalTverskyLoss, TverskyLoss

__version__ = "0.2.0"

LOSSES: dict[str, type[torch.nn.Module]] = {
    "dice": DiceLoss,
    "jaccard": JaccardLoss,
    "iou": IoULoss,
    "tversky": TverskyLoss,
    "focal_tversky": FocalTverskyLoss,
    "generalized_dice": GeneralizedDiceLoss,
    "focal": FocalLoss,
    "dice_ce": DiceCELoss,
    "dice_bce": DiceBCELoss,
    "dice_focal": DiceFocalLoss,
    "combo": ComboLoss,
    "lovasz_hinge": LovaszHingeLoss,
    "lovasz_softmax": LovaszSoftmaxLoss,
}

__all__ = [
    "LOSSES",
    "__version__",
    "ComboLoss",
    "DiceBCELoss",
    "DiceCELoss",
    "DiceFocalLoss",
    "DiceLoss",
    "FocalLoss",
    "FocalTverskyLoss",
    "GeneralizedDiceLoss",
    "IoULoss",
    "JaccardLoss",
    "LossInputError",
    "LovaszHingeLoss",
    "LovaszSoftmaxLoss",
    "TverskyLoss",
    "get_loss",
]


def get_loss(name: str, **kwargs) -> torch.nn.Module:
    """Build the loss registered as ``name`` (see ``LOSSES``) with ``kwargs`` passed to its ``__init__``.

    Raises:
        LossInputError: (a ``ValueError``) for an unknown name, listing the known ones.
    """
    try:
        loss_class = LOSSES[name]
    except (KeyError, TypeError):
        raise LossInputError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}.") from None
    return loss_class(**kwargs)
