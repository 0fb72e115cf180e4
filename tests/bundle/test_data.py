"""Dataset checks that run before training: each bad input stops with one message naming the file or value."""

import gzip
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import (
    all_below_the_hu_window,
    all_nan,
    case_file,
    constant,
    double_z_spacing,
    flip_first_axis,
    make_tiny_phantom,
    one_infinite_voxel,
    resave,
    translate,
)

from scripts.checks import CACHE_NAME, FOREGROUND_HU, check_case
from scripts.data import (
    DatasetError,
    inference_datalist,
    load_datalist,
    prepare_dataset,
    write_fit_dataset,
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_tiny_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def dataset(phantom, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(phantom, copy)
    return copy


def _first(dataset, key):
    return dataset / json.loads((dataset / "dataset.json").read_text())["training"][0][key]


def test_good_dataset_passes_and_splits(dataset):
    assert prepare_dataset(dataset, generate_if_missing=False) == str(dataset)
    assert len(load_datalist(dataset, "training")) == 2 and len(load_datalist(dataset, "validation")) == 1


def test_msd_file_without_validation_list_holds_out_the_last_fifth(dataset):
    content = json.loads((dataset / "dataset.json").read_text())
    content["training"] = content["training"] * 5  # 10 entries
    del content["validation"]
    (dataset / "dataset.json").write_text(json.dumps(content))
    training, validation = load_datalist(dataset, "training"), load_datalist(dataset, "validation")
    assert (len(training), len(validation)) == (8, 2)
    assert validation == [
        {k: str((dataset / v).resolve()) for k, v in item.items()} for item in content["training"][-2:]
    ]


def test_missing_dir_is_generated(tmp_path):
    target = tmp_path / "new"
    prepare_dataset(target, num_cases=2, num_validation=1, spacing_scale=3.0)
    assert (target / "dataset.json").is_file()


@pytest.mark.parametrize("make_empty", [False, True])
def test_missing_or_empty_dir_without_generation(tmp_path, make_empty):
    target = tmp_path / "absent"
    if make_empty:
        target.mkdir()
    with pytest.raises(DatasetError, match=f"dataset_dir {target} is missing or empty"):
        prepare_dataset(target, generate_if_missing=False)


def test_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetError, match="cannot be written there"):
        prepare_dataset(blocker / "phantom", num_cases=2, num_validation=1)


def test_dataset_json_pointing_at_missing_file(dataset):
    _first(dataset, "label").unlink()
    with pytest.raises(DatasetError, match=r"label file .*phantom_000\.nii\.gz listed in dataset.json does not exist"):
        prepare_dataset(dataset, generate_if_missing=False)


def test_corrupt_nifti(dataset):
    path = _first(dataset, "image")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    with pytest.raises(DatasetError, match=rf"image file {path} is not a readable NIfTI"):
        prepare_dataset(dataset, generate_if_missing=False)


def test_not_a_nifti_at_all(dataset):
    path = _first(dataset, "image")
    path.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(DatasetError, match="is not a readable NIfTI"):
        prepare_dataset(dataset, generate_if_missing=False)


def test_shape_mismatch(dataset):
    path = _first(dataset, "label")
    label = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj)[:-1], label.affine), path)
    with pytest.raises(DatasetError, match=r"has shape \(\d+, \d+, \d+\) but its label .* has shape"):
        prepare_dataset(dataset, generate_if_missing=False)


@pytest.mark.parametrize("bad_value", [14, 255, -1, 2.5])
def test_labels_outside_btcv_range(dataset, bad_value):
    path = _first(dataset, "label")
    label = nib.load(path)
    data = np.asanyarray(label.dataobj).astype(np.float32)
    data[0, 0, 0] = bad_value
    nib.save(nib.Nifti1Image(data, label.affine), path)
    with pytest.raises(DatasetError, match=rf"label {path} has values \[{float(bad_value)}\] outside .* 0\.\.13"):
        check_case({"image": str(_first(dataset, "image")), "label": str(path)})


@pytest.mark.parametrize("content", ["{not json", json.dumps({"training": []}), json.dumps({"labels": {}})])
def test_unreadable_dataset_json(dataset, content):
    (dataset / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match="dataset.json"):
        prepare_dataset(dataset, generate_if_missing=False)


def test_inference_datalist_sources(dataset, tmp_path):
    images = sorted(str(p.resolve()) for p in (dataset / "imagesTr").glob("*.nii.gz"))
    assert [d["image"] for d in inference_datalist(dataset / "imagesTr")] == images
    assert [d["image"] for d in inference_datalist(dataset)] == images[-1:]  # the validation list
    assert inference_datalist(dataset / "dataset.json") == inference_datalist(dataset)  # the file means its folder
    (tmp_path / "dict.json").write_text(json.dumps({"training": []}))  # a dict under another name is no datalist
    with pytest.raises(DatasetError, match="expected a non-empty JSON list"):
        inference_datalist(tmp_path / "dict.json")
    assert inference_datalist(images[0]) == [{"image": images[0]}]
    (tmp_path / "list.json").write_text(json.dumps([images[1], {"image": images[2]}]))
    assert [d["image"] for d in inference_datalist(tmp_path / "list.json")] == images[1:]
    with pytest.raises(DatasetError, match="does not exist"):
        inference_datalist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no .nii"):
        inference_datalist(tmp_path / "empty")


def test_fit_dataset_validates_on_its_own_training_cases(dataset, tmp_path):
    training = load_datalist(dataset, "training")  # the tiny phantom holds one case out
    stem = lambda item: item["image"].split("/")[-1].split(".")[0]  # noqa: E731
    out = write_fit_dataset(dataset, tmp_path / "fit", cases=[stem(training[1])])
    assert load_datalist(out, "training") == load_datalist(out, "validation") == [training[1]]
    all_cases = write_fit_dataset(dataset, tmp_path / "fit_all")  # None: every listed training case, no hold-out
    assert sorted(map(stem, load_datalist(all_cases, "validation"))) == sorted(
        stem(i) for i in json.loads((dataset / "dataset.json").read_text())["training"]
    )
    assert prepare_dataset(out, generate_if_missing=False) == str(out)  # the files behind the entries check out
    with pytest.raises(DatasetError, match="no training case named"):
        write_fit_dataset(dataset, tmp_path / "bad", cases=["nope"])


# --- the checks of issue 11: geometry, intensities, background-only labels, cached verdicts -----------------------


@pytest.mark.parametrize(
    "alter, problem",
    [
        (flip_first_axis, r"axis directions differ \(label (R|L)\w\w, image (?!\1)\w{3};"),
        (double_z_spacing, r"voxel spacing differs by [\d.]+ mm \(tolerance 0.001 mm\)"),
        (translate, r"origin differs by 5 mm \(tolerance 0.01 mm\)"),
    ],
)
def test_label_off_its_image_grid(dataset, alter, problem):
    label = case_file(dataset, "training", "label")
    resave(label, affine=alter(nib.load(label).affine))
    with pytest.raises(DatasetError) as info:
        prepare_dataset(dataset, generate_if_missing=False)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"image {case_file(dataset, 'training', 'image')}: shape") and "spacing (" in lines[0]
    assert lines[1].startswith(f"label {label}: shape") and " axes " in lines[1]
    assert re.search(rf"^label {re.escape(str(label))} is not on its image's voxel grid: {problem}", lines[2])


def test_label_within_the_tolerance_passes(dataset):
    label = case_file(dataset, "training", "label")
    resave(label, affine=translate(nib.load(label).affine, 0.005))  # half the 1e-2 mm tolerance: rounding, not a move
    prepare_dataset(dataset, generate_if_missing=False)


@pytest.mark.parametrize("section", ["training", "validation"])
@pytest.mark.parametrize(
    "alter, problem",
    [
        (all_nan, r"holds \d+ NaN or infinite voxel\(s\) of \d+"),
        (one_infinite_voxel, r"holds 1 NaN or infinite voxel\(s\)"),
        (constant, r"is constant \(every voxel is -1000, fewer than 2 distinct"),
        (all_below_the_hu_window, f"has no voxel above {FOREGROUND_HU:g} HU"),
    ],
)
def test_images_that_hold_no_ct(dataset, section, alter, problem):
    image = case_file(dataset, section, "image")
    resave(image, data=alter(np.asanyarray(nib.load(image).dataobj).astype(np.float32)))
    with pytest.raises(DatasetError, match=rf"^image {re.escape(str(image))} {problem}"):
        prepare_dataset(dataset, generate_if_missing=False)


def test_background_only_labels_are_one_warning_per_section(dataset, caplog):
    for section in ("training", "validation"):
        label = case_file(dataset, section, "label")
        resave(label, data=np.zeros(nib.load(label).shape, np.uint8))
    with caplog.at_level("WARNING", logger="scripts.checks"):
        prepare_dataset(dataset, generate_if_missing=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert (
        warnings[0].startswith("1 training label(s) hold only background")
        and str(case_file(dataset, "training", "label")) in warnings[0]
    )
    assert (
        warnings[1].startswith("1 validation label(s) hold only background")
        and "left out of the validation Dice" in warnings[1]
    )


def test_verdicts_are_cached_by_size_and_mtime(dataset, monkeypatch):
    import scripts.checks

    prepare_dataset(dataset, generate_if_missing=False)
    assert (dataset / CACHE_NAME).is_file()
    read = []
    original = scripts.checks.check_case
    monkeypatch.setattr(scripts.checks, "check_case", lambda item, n: read.append(item["image"]) or original(item, n))
    prepare_dataset(dataset, generate_if_missing=False)
    assert read == []  # nothing read again
    image = case_file(dataset, "training", "image")
    data = np.asanyarray(nib.load(image).dataobj).astype(np.float32)
    data.flat[0] = np.nan
    resave(image, data=data)  # a new file: new size and mtime
    with pytest.raises(DatasetError, match="NaN"):
        prepare_dataset(dataset, generate_if_missing=False)
    assert read == [str(image)]  # only the changed case was read


def test_read_only_dataset_is_checked_uncached(dataset):
    import os
    import stat

    dataset.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(dataset, os.W_OK):  # root ignores permissions: nothing to test here
            pytest.skip("running as root")
        prepare_dataset(dataset, generate_if_missing=False)
        assert not (dataset / CACHE_NAME).exists()
    finally:
        dataset.chmod(stat.S_IRWXU)


def test_hu_threshold_is_train_json_s_window():
    content = json.loads((Path(__file__).resolve().parents[2] / "configs" / "train.json").read_text())
    window = [t for t in content["train"]["deterministic_transforms"] if t["_target_"] == "ScaleIntensityRanged"]
    assert [t["a_min"] for t in window] == [FOREGROUND_HU]


def test_check_command_reports_one_message(dataset):
    import subprocess
    import sys

    image = case_file(dataset, "validation", "image")
    resave(image, data=np.full(nib.load(image).shape, np.nan, np.float32))
    done = subprocess.run(
        [sys.executable, "-m", "scripts.data", "check", "--dataset_dir", str(dataset)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
    )
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 1 and len(lines) == 2 and "Traceback" not in done.stderr
    assert lines[-1].startswith(f"image {image} holds") and "NaN" in lines[-1]
