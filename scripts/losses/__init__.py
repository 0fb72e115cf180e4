"""MONAI-compatible segmentation losses on one shared core (``scripts.losses.core``).

Every class is a ``torch.nn.Module`` with ``forward(input, target)``; ``LOSSES`` maps registry names to
classes and ``get_loss(name, **kwargs)`` builds one from a config::

    {"_target_": "scripts.losses.get_loss", "name": "focal_tversky", "to_onehot_y": true, "softmax": true}
"""

from __future__ import annotations

import importlib

import torch

from .core import LossInputError
from .dice import DiceLoss, IoULoss, JaccardLoss
from .tversky import FocalTverskyLoss, TverskyLoss

LOSSES: dict[str, type] = {
    "dice": DiceLoss,
    "jaccard": JaccardLoss,
    "iou": IoULoss,
    "tversky": TverskyLoss,
    "focal_tversky": FocalTverskyLoss,
}

# registry names of the loss families in sibling modules: module -> {registry name: class name}
_FAMILY_MODULES = {
    "focal": {"focal": "FocalLoss"},
    "dice_combos": {"dice_ce": "DiceCELoss", "dice_bce": "DiceBCELoss", "dice_focal": "DiceFocalLoss"},
    "combo": {"combo": "ComboLoss"},
    "lovasz": {"lovasz_hinge": "LovaszHingeLoss", "lovasz_softmax": "LovaszSoftmaxLoss"},
}

__all__ = ["LOSSES", "LossInputError", "get_loss", *sorted({cls.__name__ for cls in LOSSES.values()}), "IoULoss"]

for _module_name, _names in _FAMILY_MODULES.items():
    try:
        _module = importlib.import_module(f"{__name__}.{_module_name}")
    except ModuleNotFoundError as error:
        # a family not written yet leaves the package importable; any other import error is a real bug
        if error.name != f"{__name__}.{_module_name}":
            raise
        continue
    for _registry_name, _class_name in _names.items():
        LOSSES[_registry_name] = globals()[_class_name] = getattr(_module, _class_name)
        if _class_name not in __all__:
            __all__.append(_class_name)


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
