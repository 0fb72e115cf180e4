"""The bundle inside MONAI Label 0.8.5, driven the way its `monaibundle` app drives a bundle.

`BundleInferTask` and `BundleTrainTask` run on a copy of the bundle (training rewrites `models/model.pt`) with the
studies of a `LocalDatastore` made from the tiny phantom. Needs the separate environment of
`.ci/install-monailabel.sh`; skipped, with that instruction, where MONAI Label is not installed.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip(
    "monailabel",
    reason="MONAI Label is not installed here: `bash .ci/install-monailabel.sh` builds .venv-monailabel, then run "
    "`.venv-monailabel/bin/python -m pytest -m monailabel tests/deploy`",
)
pytestmark = pytest.mark.monailabel

BUNDLE_ROOT = Path(__file__).resolve().parents[2]


def stand_in_for_torchvision_utils():
    """`monailabel.transform.post` imports `torchvision.utils.make_grid, save_image` at module level, for
    2D debugging transforms the bundle tasks never run. No PyPI build of torchvision loads next to the CPU
    torch==2.13.0 ("operator torchvision::nms does not exist"), so the MONAI Label environment has none; this
    stand-in satisfies the import and fails loudly if anything calls it."""

    def not_available(*args, **kwargs):
        raise RuntimeError("torchvision is not installed; this test's stand-in only satisfies the import")

    utils = types.ModuleType("torchvision.utils")
    utils.make_grid = utils.save_image = not_available
    package = types.ModuleType("torchvision")
    package.utils = utils
    sys.modules.setdefault("torchvision", package)
    sys.modules.setdefault("torchvision.utils", utils)


if importlib.util.find_spec("torchvision") is None:
    stand_in_for_torchvision_utils()

from monai.bundle import ConfigParser  # noqa: E402
from monai.transforms import Compose, SaveImaged  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402


def copy_bundle(folder: Path) -> Path:
    """A copy of the bundle as a MONAI Label app would hold it (`--conf models <name>`)."""
    copy = folder / "ct_organ_segmentation"
    for part in ("configs", "ctlosses", "scripts", "models"):
        shutil.copytree(BUNDLE_ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    assert (copy / "models" / "model.pt").is_file(), "the bundle ships no models/model.pt"
    return copy


@pytest.fixture
def bundle(tmp_path):
    return copy_bundle(tmp_path)


@pytest.fixture
def invertd_bundle(tmp_path):
    """A copy whose inference.json has the model zoo's postprocessing (Activationsd -> Invertd -> AsDiscreted,
    kept in configs/reference/inference_invertd.json): the bundle as MONAI Label ran it before InvertArgmaxd."""
    copy = copy_bundle(tmp_path / "invertd")
    inference = json.loads((copy / "configs" / "inference.json").read_text())
    reference = json.loads((copy / "configs" / "reference" / "inference_invertd.json").read_text())
    (copy / "configs" / "inference.json").write_text(json.dumps({**inference, **reference}, indent=4))
    return copy


@pytest.fixture(scope="module")
def studies(tiny_phantom, tmp_path_factory):
    """A MONAI Label studies folder: images at the top, their final labels under `labels/final/`."""
    folder = tmp_path_factory.mktemp("studies")
    (folder / "labels" / "final").mkdir(parents=True)
    content = json.loads((tiny_phantom / "dataset.json").read_text())
    for item in content["training"] + content["validation"]:
        name = Path(item["image"]).name
        shutil.copy(tiny_phantom / item["image"], folder / name)
        shutil.copy(tiny_phantom / item["label"], folder / "labels" / "final" / name)
    return folder


def organ_names(bundle: Path) -> dict[str, int]:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {name.lower(): int(index) for index, name in channels.items() if name.lower() != "background"}


def bundle_own_prediction(bundle: Path, image: Path) -> np.ndarray:
    """inference.json's preprocessing, network (with models/model.pt), inferer and postprocessing, without
    MONAI Label: the mask a plain `monai.bundle run inference` writes, as an array."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network_def")
    checkpoint = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint))  # the shipped plain state dict, or a trained one
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(image)})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    postprocessing = parser.get_parsed_content("postprocessing")
    kept = [t for t in postprocessing.transforms if not isinstance(t, SaveImaged)]
    return np.asarray(Compose(kept)(data)["pred"]).squeeze(0)


def non_ras_image(studies: Path) -> Path:
    """A study whose affine is not RAS-aligned, so that a missed inversion of Orientationd would show."""
    for path in sorted(studies.glob("*.nii.gz")):
        if nib.aff2axcodes(nib.load(path).affine) != ("R", "A", "S"):
            return path
    pytest.fail("the phantom produced no non-RAS case to test orientation with")


def test_infer_task_writes_the_bundles_mask_in_the_input_space(bundle, studies):
    task = BundleInferTask(str(bundle), {})
    assert task.is_valid()
    image = non_ras_image(studies)
    result_file, result = task({"image": str(image), "device": "cpu"})

    assert result["label_names"] == organ_names(bundle)
    written, source = nib.load(result_file), nib.load(image)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    mask = np.asarray(written.dataobj)
    assert set(np.unique(mask)) <= set(range(14))
    # MONAI Label loaded models/model.pt and reproduced the bundle's own pipeline voxel for voxel
    np.testing.assert_array_equal(mask, bundle_own_prediction(bundle, image))
    assert len(np.unique(mask)) > 1, "the shipped model segments nothing on a phantom case"


def test_infer_task_gives_the_voxels_it_gave_with_invertd(bundle, invertd_bundle, studies):
    """BundleInferTask appends its own Restored to the config's postprocessing: with InvertArgmaxd in place of
    Invertd + AsDiscreted, every study's mask is the same, voxel for voxel, on the same grid."""
    postprocessing = [
        t["_target_"]
        for t in json.loads((bundle / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    ]
    assert "scripts.lean_inverse.InvertArgmaxd" in postprocessing and "Invertd" not in postprocessing
    ours, before = BundleInferTask(str(bundle), {}), BundleInferTask(str(invertd_bundle), {})
    for image in (non_ras_image(studies), sorted(studies.glob("*.nii.gz"))[0]):
        ours_file, ours_result = ours({"image": str(image), "device": "cpu"})
        before_file, before_result = before({"image": str(image), "device": "cpu"})
        assert ours_result["label_names"] == before_result["label_names"]
        written, expected = nib.load(ours_file), nib.load(before_file)
        np.testing.assert_array_equal(written.affine, expected.affine)
        mask = np.asarray(written.dataobj)
        np.testing.assert_array_equal(mask, np.asarray(expected.dataobj))
        assert len(np.unique(mask)) > 1, "the shipped model segments nothing on a phantom case"


def test_train_task_fine_tunes_the_shipped_model_for_one_epoch(bundle, studies):
    checkpoint = bundle / "models" / "model.pt"
    shipped = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    assert len(datastore.datalist()) == 7

    task = BundleTrainTask(str(bundle), {})
    assert task.is_valid()
    request = {
        "model": "ct_organ_segmentation",
        "max_epochs": 1,
        "device": "cpu",
        "val_split": 0.34,
        "multi_gpu": False,
    }
    task(request, datastore)

    # MONAI Label passed its own datalist: the bundle neither generated nor checked its default phantom dataset
    # (that would write a dataset into the bundle folder and cost about half a minute on every training request)
    assert not (bundle / "data").exists()
    # MONAI Label put its loader of the shipped weights first in train#handlers (it does so only when the bundle
    # has no handler of `_target_` "CheckpointLoader" of its own)
    loaders = [h for h in task.bundle_config["train#handlers"] if h.get("_target_") == "CheckpointLoader"]
    assert [h["load_path"] for h in loaders] == [str(checkpoint)]
    # one epoch validated and saved: models/model.pt now holds new weights of the same network
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() != shipped
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    assert weights.keys() == parser.get_parsed_content("network_def").state_dict().keys()


def test_train_task_on_several_gpus_runs_multi_gpu_train_json(bundle, studies, monkeypatch, caplog):
    """With more than one GPU, BundleTrainTask exports its overrides to `configs/monailabel_train.json` and starts
    `torchrun --nproc_per_node=<GPUs> ... ['monailabel_train.json','multi_gpu_train.json']`. `force_multi_gpu`
    with two device ids takes that path on CPU too, where multi_gpu_train.json picks gloo. MONAI Label ignores
    the exit code of torchrun, so success shows as a rewritten `models/model.pt`."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # MONAI Label calls `torchrun`
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on two cores
    checkpoint = bundle / "models" / "model.pt"
    shipped = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)

    request = {
        "model": "ct_organ_segmentation",
        "max_epochs": 1,
        "device": "cpu",
        "val_split": 0.34,
        "force_multi_gpu": True,
        "gpus": "0,1",
    }
    with caplog.at_level(logging.INFO, logger="monailabel.tasks.train.bundle"):
        BundleTrainTask(str(bundle), {})(request, datastore)

    commands = [r.getMessage() for r in caplog.records if "RUNNING COMMAND" in r.getMessage()]
    assert len(commands) == 1 and "--nproc_per_node=2" in commands[0] and "multi_gpu_train.json" in commands[0]
    assert (bundle / "configs" / "monailabel_train.json").is_file()
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() != shipped
    assert not (bundle / "data").exists()
