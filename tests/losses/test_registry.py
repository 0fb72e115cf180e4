"""The loss registry: names, get_loss, bundle-config instantiation, MONAI-compatible signatures, the literal
registry against the exports, and a missing module as an import error."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import monai
import pytest
import torch
from monai.bundle import ConfigParser

import ctlosses as losses
from ctlosses import LOSSES, LossInputError, core, get_loss

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
REGISTRY = {
    "dice": "DiceLoss",
    "jaccard": "JaccardLoss",
    "iou": "IoULoss",
    "tversky": "TverskyLoss",
    "focal_tversky": "FocalTverskyLoss",
    "generalized_dice": "GeneralizedDiceLoss",
    "focal": "FocalLoss",
    "dice_ce": "DiceCELoss",
    "dice_bce": "DiceBCELoss",
    "dice_focal": "DiceFocalLoss",
    "lovasz_hinge": "LovaszHingeLoss",
    "lovasz_softmax": "LovaszSoftmaxLoss",
    "combo": "ComboLoss",
}
# our class -> the MONAI class whose arguments it keeps (names and defaults)
MONAI_ANCHORS = {
    "dice": monai.losses.DiceLoss,
    "jaccard": monai.losses.DiceLoss,
    "tversky": monai.losses.TverskyLoss,
    "generalized_dice": monai.losses.GeneralizedDiceLoss,
    "focal": monai.losses.FocalLoss,
    "dice_ce": monai.losses.DiceCELoss,
    "dice_focal": monai.losses.DiceFocalLoss,
}


def parameters(cls):
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


def test_registry_holds_every_loss_under_its_name():
    assert set(LOSSES) == set(REGISTRY)
    for name, class_name in REGISTRY.items():
        assert LOSSES[name] is getattr(losses, class_name), name
        assert class_name in losses.__all__
    assert LOSSES["iou"] is LOSSES["jaccard"] and LOSSES["dice_bce"] is LOSSES["dice_ce"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_get_loss_builds_a_module_with_the_kwargs(name):
    loss = get_loss(name, reduction="sum", weight=[1.0, 3.0, 0.5])
    assert type(loss) is LOSSES[name] and isinstance(loss, torch.nn.Module)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=generator)
    target = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 4, 5), generator=generator), 3).movedim(-1, 1).float()
    direct = LOSSES[name](reduction="sum", weight=[1.0, 3.0, 0.5])(logits, target)
    torch.testing.assert_close(loss(logits, target), direct)
    assert not torch.isclose(direct, LOSSES[name]()(logits, target))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(LossInputError, match="unknown loss 'dices'; known losses: combo, dice, dice_bce") as error:
        get_loss("dices")
    assert isinstance(error.value, ValueError)
    for name in REGISTRY:
        assert name in str(error.value)


def test_bad_kwargs_still_raise_from_the_class():
    with pytest.raises(LossInputError, match="alpha"):
        get_loss("focal_tversky", alpha=2.0)
    with pytest.raises(TypeError):
        get_loss("dice", not_an_argument=1)


@pytest.mark.parametrize(
    "config",
    [
        {"_target_": "ctlosses.get_loss", "name": "focal_tversky", "to_onehot_y": True, "softmax": True},
        {"_target_": "ctlosses.FocalTverskyLoss", "to_onehot_y": True, "softmax": True},
    ],
)
def test_bundle_config_instantiates_by_name_or_class(config):
    loss = ConfigParser({"loss": config}).get_parsed_content("loss")
    assert isinstance(loss, losses.FocalTverskyLoss) and loss.to_onehot_y and loss.softmax
    value = loss(torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 1, 4, 4)))
    assert 0 <= value <= 1


def test_a_monai_config_works_unchanged_with_our_class():
    config = {
        "_target_": "monai.losses.DiceLoss",
        "to_onehot_y": True,
        "softmax": True,
        "include_background": False,
        "squared_pred": True,
        "batch": True,
        "smooth_nr": 0.0,
        "smooth_dr": 1e-6,
        "ignore_index": 255,
    }
    theirs = ConfigParser({"loss": config}).get_parsed_content("loss")
    ours = ConfigParser({"loss": {**config, "_target_": "ctlosses.DiceLoss"}}).get_parsed_content("loss")
    logits, labels = torch.randn(2, 4, 5, 6), torch.randint(0, 4, (2, 1, 5, 6))
    torch.testing.assert_close(ours(logits, labels), theirs(logits, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MONAI_ANCHORS))
def test_arguments_shared_with_monai_keep_monai_defaults(name):
    ours, theirs = parameters(LOSSES[name]), parameters(MONAI_ANCHORS[name])
    for argument in ours.keys() & theirs.keys():
        default, monai_default = ours[argument].default, theirs[argument].default
        monai_default = getattr(monai_default, "value", monai_default)  # LossReduction.MEAN -> "mean"
        assert default == monai_default, f"{name}.{argument}: ours {default!r}, MONAI {monai_default!r}"


@pytest.mark.parametrize("name", ["dice", "tversky", "generalized_dice"])
def test_dice_and_tversky_take_every_monai_argument(name):
    missing = parameters(MONAI_ANCHORS[name]).keys() - parameters(LOSSES[name]).keys()
    assert not missing


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_loss_takes_weight_and_ignore_index(name):
    assert {"weight", "ignore_index", "reduction"} <= parameters(LOSSES[name]).keys()


def test_registry_is_every_loss_class_the_package_exports():
    """The literal registry and the exports agree: no loss class is exported without a name, none named twice
    under different classes except the documented aliases (iou, dice_bce)."""
    exported = [getattr(losses, name) for name in losses.__all__]
    loss_classes = {cls for cls in exported if isinstance(cls, type) and issubclass(cls, torch.nn.Module)}
    assert loss_classes == set(LOSSES.values())
    # and every one derives from the core's base, so it ends in the one finishing step
    assert all(issubclass(cls, core.SegmentationLoss) for cls in loss_classes)


def test_a_missing_family_module_is_an_import_error():
    """A typo or a deleted module must fail loudly, not drop a loss from the registry."""
    code = "import sys; sys.modules['ctlosses.lovasz'] = None\nimport ctlosses"
    result = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr and "ctlosses.lovasz" in result.stderr
