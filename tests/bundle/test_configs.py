"""Every config parses, every ``_target_`` resolves, metadata is the model zoo's document, presets are small."""

import json
import os

import pytest
from bundle_helpers import BUNDLE_ROOT, CONFIGS
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator
from monai.utils import optional_import

CONFIG_FILES = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.json"))
BTCV = [
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic veins",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
]


def _targets(node):
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def _resolves(target):
    module, _, name = target.rpartition(".")
    if not module:
        return ComponentLocator().get_component_module_name(target) is not None
    return optional_import(module, name=name)[1]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_parses_and_targets_resolve(name):
    content = ConfigParser.load_config_file(CONFIGS / name)
    assert isinstance(content, dict) and content
    # a "_target_" given by reference ("@dataloader_type", which gpu.json changes) is the file's own value
    targets = [content.get(t[1:], t) if t.startswith("@") else t for t in _targets(content)]
    unresolved = [t for t in targets if not _resolves(t)]
    assert not unresolved, f"{name}: targets that do not resolve: {unresolved}"


def test_train_with_evaluate_and_presets_resolve_every_reference():
    for extra in ["evaluate.json", "gpu.json"] + [f"losses/{p.name}" for p in (CONFIGS / "losses").glob("*.json")]:
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / extra)])
        parser.parse()  # raises on a dangling @reference or %macro
        assert parser.get("loss#_target_").startswith("ctlosses.")


def test_model_zoo_ids_present():
    train = ConfigParser.load_config_file(CONFIGS / "train.json")
    for key in (
        "bundle_root",
        "ckpt_dir",
        "output_dir",
        "dataset_dir",
        "device",
        "network_def",
        "network",
        "loss",
        "optimizer",
        "epochs",
        "initialize",
        "run",
        "finalize",
    ):
        assert key in train, key
    assert {"trainer", "dataset", "dataloader", "inferer", "handlers", "preprocessing"} <= set(train["train"])
    assert {"evaluator", "dataset", "inferer", "handlers", "key_metric", "postprocessing"} <= set(train["validate"])
    # the default loss is the combo preset's (docs/losses.md, "The default loss"); dice_ce.json is MONAI's usual one
    assert train["loss"] == ConfigParser.load_config_file(CONFIGS / "losses" / "combo.json")["loss"]
    inference = ConfigParser.load_config_file(CONFIGS / "inference.json")
    assert inference["network_def"] == train["network_def"]  # the shipped weights load in both


def test_metadata_describes_btcv_io():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    outputs = meta["network_data_format"]["outputs"]["pred"]
    assert outputs["num_channels"] == 14 and list(outputs["channel_def"].values()) == BTCV
    assert list(outputs["channel_def"]) == [str(i) for i in range(14)]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["modality"] == "CT" and image["format"] == "hounsfield"
    assert "not for diagnostic use" in meta["intended_use"].lower()
    assert meta["version"] in meta["changelog"] and meta["references"]


def test_top_level_metadata_is_the_same_document():
    top = BUNDLE_ROOT / "metadata.json"
    assert json.loads(top.read_text()) == json.loads((CONFIGS / "metadata.json").read_text())
    if top.is_symlink():
        assert os.path.realpath(top) == os.path.realpath(CONFIGS / "metadata.json")


def test_presets_only_set_the_loss():
    for preset in (CONFIGS / "losses").glob("*.json"):
        content = json.loads(preset.read_text())
        assert list(content) == ["loss"], preset.name
        assert content["loss"]["_target_"].startswith("ctlosses."), preset.name


@pytest.mark.parametrize("extra", [[], ["evaluate.json"]])
def test_training_run_id_runs_what_run_runs(extra):
    # `python -m monai.bundle run training --config_file ...` uses the id "training"
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), *[str(CONFIGS / e) for e in extra]])
    parser.parse()
    # a reference to the run list, not a copy ("%run"): MONAI Label's run_id "" evaluates every key, and a copy
    # ran the trainer twice (tests/deploy/test_monailabel_server.py)
    assert parser.get("training") == "@run" and isinstance(parser.get("run"), list)
