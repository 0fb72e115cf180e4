"""``configs/gpu.json``, the GPU preset, merged the same way into train, evaluate, inference and multi-GPU training;
``models/model.pt`` recording the settings it was trained with; and a checkpoint refused, with one message, by
``inference.json``, ``evaluate.json`` and ``scripts.infer`` when the config does not fit it.

No GPU here: the preset's network (full width) runs on CPU with 32^3 patches, ``amp`` off, on a phantom whose
voxels are shrunk to about 1.7 mm so that the preset's 1.5 x 1.5 x 2 mm grid stays small."""

import json
import subprocess
import sys

import pytest
import torch
from bundle_helpers import BUNDLE_ROOT, CONFIGS, assert_one_message, bundle_copy, make_tiny_phantom, resave, run_bundle
from bundle_helpers import run_training as run_tiny_training
from monai.bundle import ConfigParser

from scripts.network_settings import CheckpointMismatchError, check_checkpoint_fits, check_settings_fit

PRESET = json.loads((CONFIGS / "gpu.json").read_text())
# what the tests change of the preset to run on CPU in seconds; not recorded beyond patch_size
ON_CPU = {"patch_size": [32, 32, 32], "amp": False, "device": "$torch.device('cpu')"}
CONFIG_SETS = {
    "train": ["train.json"],
    "evaluate": ["train.json", "evaluate.json"],
    "inference": ["inference.json"],
    "multi_gpu": ["train.json", "multi_gpu_train.json"],
}


def parse(files, **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    for key, value in override.items():
        parser[key] = value
    return parser


# --- one preset file for every config ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIG_SETS)
def test_gpu_json_sets_the_sizes_of_every_config(name):
    parser = parse([*CONFIG_SETS[name], "gpu.json"])
    assert parser.get_parsed_content("preset") == "gpu"
    assert parser.get_parsed_content("pixdim") == [1.5, 1.5, 2.0]
    assert parser.get_parsed_content("patch_size") == [96, 96, 96]
    assert parser.get_parsed_content("amp") is True
    network = parser.get_parsed_content("network_def")
    assert (list(network.channels), list(network.strides)) == ([32, 64, 128, 256, 512], [2, 2, 2, 2])
    settings = parser.get_parsed_content("network_settings")
    assert settings["network_def"]["channels"] == [32, 64, 128, 256, 512]
    if name != "inference":
        assert parser.get_parsed_content("settings")["num_samples"] == 4
        assert parser.get_parsed_content("settings")["num_workers"] == 0
        assert (
            parser.get("train#dataloader#_target_") == parser.get("validate#dataloader#_target_") == "@dataloader_type"
        )
        assert parser.get_parsed_content("dataloader_type") == "ThreadDataLoader"
        # the ToDeviced hook sits between the cached deterministic transforms and the random crops
        assert "@device_transforms" in parser.get("train#preprocessing#transforms")
        [to_device] = parser.get_parsed_content("device_transforms")
        assert type(to_device).__name__ == "ToDeviced"


@pytest.mark.parametrize("preset", [[], ["gpu.json"]], ids=["default", "gpu"])
def test_every_config_describes_the_same_network(preset):
    """What training records is what inference and evaluation compare it with, with or without the preset."""
    described = {
        name: parse([*files, *preset]).get_parsed_content("network_settings") for name, files in CONFIG_SETS.items()
    }
    assert all(settings == described["train"] for settings in described.values()), described
    assert described["train"]["preset"] == ("gpu" if preset else "default")


def test_keys_only_training_reads_leave_inference_untouched(tmp_path, monkeypatch):
    """Every key of gpu.json resolves in inference.json's context (MONAI Label-style evaluation of the whole file)
    without reading or writing anything."""
    monkeypatch.chdir(tmp_path)
    parser = parse(["inference.json", "gpu.json"], bundle_root=str(tmp_path), **ON_CPU)
    for key in PRESET:
        parser.get_parsed_content(key.split("#")[0])
    assert list(tmp_path.iterdir()) == []


# --- the checkpoint records its settings; a config that does not fit is refused -------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One training and one validation case whose voxels are shrunk fourfold (about 1.7 x 1.7 x 2.5 mm, 80 mm
    across): at the preset's 1.5 x 1.5 x 2 mm a volume is about 54 x 40 x 29 voxels."""
    dataset = make_tiny_phantom(tmp_path_factory.mktemp("phantom"), num_cases=2)
    for path in [*dataset.glob("imagesTr/*.nii.gz"), *dataset.glob("labelsTr/*.nii.gz")]:
        import nibabel as nib

        affine = nib.load(path).affine.copy()
        affine[:3, :3] *= 0.25
        resave(path, affine=affine)
    return dataset


@pytest.fixture(scope="module")
def gpu_model(phantom, tmp_path_factory):
    """models/model.pt of one iteration with the preset's network (trained on CPU, 32^3 patches)."""
    out = tmp_path_factory.mktemp("gpu_run")
    override = {**ON_CPU, "network_def#channels": PRESET["network_def#channels"], "epochs": 1, "val_interval": 1}
    workflow = run_tiny_training(phantom, out, extra_files=["gpu.json"], **override)
    assert workflow.trainer.state.iteration == 1
    return out / "models" / "model.pt"


def test_training_with_the_preset_records_its_settings(gpu_model):
    checkpoint = torch.load(gpu_model, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model", "network_settings"}
    expected = parse(["inference.json", "gpu.json"], **ON_CPU).get_parsed_content("network_settings")
    assert checkpoint["network_settings"] == expected
    recorded = checkpoint["network_settings"]
    assert (recorded["preset"], recorded["pixdim"], recorded["num_classes"]) == ("gpu", [1.5, 1.5, 2.0], 14)
    assert recorded["network_def"]["channels"] == [32, 64, 128, 256, 512]
    assert recorded["network_def"]["strides"] == [2, 2, 2, 2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle copy whose configs/tiny.json (merged last by ``run_bundle``) only moves the preset onto the CPU."""
    copy = bundle_copy(tmp_path_factory.mktemp("bundle"))
    (copy / "configs" / "tiny.json").write_text(json.dumps(ON_CPU))
    return copy


def validation_image(phantom):
    return sorted(phantom.glob("imagesTr/*.nii.gz"))[-1]


def test_inference_json_with_the_preset_segments(bundle, phantom, gpu_model, tmp_path):
    code, lines = run_bundle(
        bundle,
        *("--input", str(validation_image(phantom)), "--ckpt_path", str(gpu_model), "--output_dir", str(tmp_path)),
        configs=("inference.json", "gpu.json"),
    )
    assert code == 0, "\n".join(lines[-30:])
    assert len(list(tmp_path.glob("*_seg.nii.gz"))) == 1


def test_inference_json_without_the_preset_is_refused(bundle, phantom, gpu_model):
    result = run_bundle(
        bundle, "--input", str(validation_image(phantom)), "--ckpt_path", str(gpu_model), configs=("inference.json",)
    )
    last = assert_one_message(result, f"checkpoint {gpu_model} was trained with the gpu preset")
    assert "pixdim [1.5, 1.5, 2.0] vs [3.0, 3.0, 3.0]" in last
    assert "network_def#channels [32, 64, 128, 256, 512] vs [8, 16, 32, 64]" in last
    assert last.endswith("""add configs/gpu.json: --config_file "['configs/inference.json','configs/gpu.json']\"""")
    assert not (bundle / "eval").exists()


def infer(bundle, phantom, model, output, *configs):
    command = [sys.executable, "-m", "scripts.infer", str(validation_image(phantom)), "--output", str(output)]
    command += ["--config", *configs, "configs/tiny.json", "--model", str(model), "--device", "cpu", "--no-progress"]
    done = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=300)
    return done.returncode, (done.stdout + done.stderr).strip().splitlines()


def test_scripts_infer_with_the_preset_segments(bundle, phantom, gpu_model, tmp_path):
    code, lines = infer(bundle, phantom, gpu_model, tmp_path, "configs/inference.json", "configs/gpu.json")
    assert code == 0, "\n".join(lines)
    assert len(list(tmp_path.glob("*_seg.nii.gz"))) == 1


def test_scripts_infer_without_the_preset_is_refused(bundle, phantom, gpu_model, tmp_path):
    code, lines = infer(bundle, phantom, gpu_model, tmp_path, "configs/inference.json")
    assert code == 2 and "Traceback" not in "\n".join(lines), "\n".join(lines)
    assert lines[-1].startswith(f"scripts.infer: error: checkpoint {gpu_model} was trained with the gpu preset")
    assert "pixdim [1.5, 1.5, 2.0] vs [3.0, 3.0, 3.0]" in lines[-1]
    assert lines[-1].endswith(
        "add configs/gpu.json: --config configs/inference.json configs/tiny.json configs/gpu.json"
    )
    assert not list(tmp_path.iterdir())


def test_evaluate_json_without_the_preset_is_refused(phantom, gpu_model, tmp_path):
    from bundle_helpers import train_workflow

    with pytest.raises(Exception) as raised:
        # checked when the evaluator starts, before CheckpointLoader: a bad validation image is reported first
        train_workflow(
            ["train.json", "evaluate.json"], phantom, tmp_path, ckpt_dir=str(gpu_model.parent), **ON_CPU
        ).run()
    error = raised.value
    while error is not None and not isinstance(error, CheckpointMismatchError):
        error = error.__cause__ or error.__context__
    assert error is not None, raised.value
    assert "pixdim [1.5, 1.5, 2.0] vs [3.0, 3.0, 3.0]" in str(error)
    assert str(error).endswith("""--config_file "['configs/train.json','configs/evaluate.json','configs/gpu.json']\"""")
    assert not (tmp_path / "eval").exists()


def test_a_default_model_with_the_preset_says_to_drop_it():
    default = parse(["inference.json"]).get_parsed_content("network_settings")
    gpu = parse(["inference.json", "gpu.json"]).get_parsed_content("network_settings")
    with pytest.raises(CheckpointMismatchError) as raised:
        check_settings_fit("models/model.pt", default, gpu)
    assert str(raised.value).startswith("checkpoint models/model.pt was trained with the default preset")
    assert "patch_size [48, 48, 48] vs [96, 96, 96]" in str(raised.value)
    assert str(raised.value).endswith(
        """it was trained without configs/gpu.json: drop it, --config_file "['configs/inference.json']\""""
    )
    assert check_settings_fit("models/model.pt", gpu, gpu) is True


def test_same_preset_other_overrides_asks_for_the_same_values():
    gpu = parse(["inference.json", "gpu.json"]).get_parsed_content("network_settings")
    with pytest.raises(
        CheckpointMismatchError, match=r"patch_size \[32, 32, 32\] vs \[96, 96, 96\].*same command-line"
    ):
        check_settings_fit("m.pt", {**gpu, "patch_size": [32, 32, 32]}, gpu)


def test_a_legacy_state_dict_loads_with_the_preset(bundle, phantom, tmp_path):
    """A plain state dict (written before checkpoints recorded their settings) has nothing to compare: accepted."""
    network = parse(["inference.json", "gpu.json"]).get_parsed_content("network_def")
    legacy = tmp_path / "legacy.pt"
    torch.save(network.state_dict(), legacy)
    assert check_checkpoint_fits(legacy, parse(["inference.json"]).get_parsed_content("network_settings"))
    code, lines = run_bundle(
        bundle,
        *("--input", str(validation_image(phantom)), "--ckpt_path", str(legacy), "--output_dir", str(tmp_path / "out")),
        configs=("inference.json", "gpu.json"),
    )
    assert code == 0, "\n".join(lines[-30:])
    assert len(list((tmp_path / "out").glob("*_seg.nii.gz"))) == 1


def test_the_shipped_model_still_loads():
    assert check_checkpoint_fits(
        BUNDLE_ROOT / "models" / "model.pt", parse(["inference.json"]).get_parsed_content("network_settings")
    )
