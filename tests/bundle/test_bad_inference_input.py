"""Wrong input to inference and evaluation (the table "What happens when the input is wrong" in docs/README.md): a
folder mixing good and bad files through ``configs/inference.json``, a checkpoint of NaN weights through
``inference.json`` and ``evaluate.json``, and what the written masks keep of their input (qform and sform with their
codes) and get from the process (the umask's permissions), through ``inference.json`` and ``scripts.infer``; and
``--resume true`` with a new ``--learning_rate``, typed on the command line."""

import hashlib
import json
import os
import shutil
import stat
from contextlib import contextmanager

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import (
    CONFIGS,
    MAX_ERROR_LINES,
    TINY,
    all_nan,
    assert_one_message,
    bundle_copy,
    case_file,
    constant,
    make_tiny_phantom,
    run_bundle,
)
from monai.bundle import ConfigParser

# an error raised once the engine runs comes after the transforms' import warnings and the engine's start line
MAX_RUN_ERROR_LINES = MAX_ERROR_LINES + 5


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_tiny_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Seeded random weights of the tiny network of ``bundle_helpers.TINY`` (the shipped model.pt is full size)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["network_def#channels"] = TINY["network_def#channels"]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.fixture
def bundle(tmp_path):
    return bundle_copy(tmp_path)


@contextmanager
def umask(mask):
    """The process's umask set to ``mask`` (inherited by ``run_bundle``'s subprocess), then restored."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_inference(bundle, source, checkpoint):
    return run_bundle(bundle, "--input", str(source), "--ckpt_path", str(checkpoint), configs=("inference.json",))


def save_image(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


# --- a folder mixing good and bad files through inference.json ----------------------------------------------------


@pytest.fixture
def mixed_folder(phantom, tmp_path):
    """Two good phantom CTs around a corrupt file, an all-NaN image and a constant image (sorted in that order, so a
    good file comes after the bad ones)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = case_file(phantom, "training", "image")
    shutil.copy(good, folder / "a_good.nii.gz")
    shutil.copy(case_file(phantom, "validation", "image"), folder / "e_good.nii.gz")
    (folder / "b_corrupt.nii.gz").write_bytes(b"not a NIfTI file" * 20)
    source = nib.load(good)
    data = np.asanyarray(source.dataobj).astype(np.float32)
    save_image(folder / "c_nan.nii.gz", all_nan(data), source.affine)
    save_image(folder / "d_constant.nii.gz", constant(data), source.affine)
    return folder


def test_mixed_folder_through_inference_json(bundle, mixed_folder, checkpoint):
    bad = {
        "b_corrupt.nii.gz": "is not a readable NIfTI image",
        "c_nan.nii.gz": "NaN or infinite voxel(s)",
        "d_constant.nii.gz": "is constant (every voxel is -1000",
    }
    with umask(0o022):
        code, lines = run_inference(bundle, mixed_folder, checkpoint)
    report = "\n".join(lines)
    # the bad files are left out, the good ones (one after them) segmented, and the run says so with exit code 1
    assert code == 1, report
    written = bundle / "eval" / "inference"
    assert sorted(p.name for p in written.iterdir()) == ["a_good_seg.nii.gz", "e_good_seg.nii.gz"]
    assert all(mode(p) == 0o644 for p in written.iterdir())
    assert "Traceback" not in report
    # one line per bad file, saying what is wrong, all before the first mask is written
    reasons = [line for line in lines[:-1] if "not segmented: " in line]
    assert len(reasons) == len(bad), report
    for name, problem in bad.items():
        assert [line for line in reasons if str(mixed_folder / name) in line and problem in line], (name, report)
    first_write = next(i for i, line in enumerate(lines) if "writing: " in line)
    assert max(lines.index(line) for line in reasons) < first_write
    # the last line names every bad file; MONAI's start-up and engine lines, one line per input, then the report
    assert lines[-1].startswith("not segmented: ") and lines[-1].endswith("the other 2 were segmented."), report
    assert all(str(mixed_folder / name) in lines[-1] for name in bad)
    assert len(lines) <= MAX_RUN_ERROR_LINES + len(bad) + 2, f"{len(lines)} lines:\n{report}"


@pytest.mark.parametrize("alter", [all_nan, constant], ids=["nan", "constant"])
def test_only_bad_inputs_write_nothing(bundle, phantom, checkpoint, tmp_path, alter):
    source = nib.load(case_file(phantom, "training", "image"))
    bad_file = save_image(
        tmp_path / "bad.nii.gz", alter(np.asanyarray(source.dataobj).astype(np.float32)), source.affine
    )
    result = run_inference(bundle, bad_file, checkpoint)
    problem = "NaN or infinite voxel(s)" if alter is all_nan else "is constant"
    last = assert_one_message(result, str(bad_file), problem)
    assert last.startswith("not segmented: image ") and last.endswith("; nothing was written.")
    assert not (bundle / "eval").exists()


# --- a checkpoint of NaN weights: inference.json before any input, evaluate.json as the evaluator starts ----------


@pytest.fixture
def nan_checkpoint(checkpoint, tmp_path):
    weights = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "nan_model" / "model.pt"
    path.parent.mkdir()
    torch.save({k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in weights.items()}, path)
    return path


def test_nan_checkpoint_through_inference_json(bundle, phantom, nan_checkpoint):
    result = run_inference(bundle, case_file(phantom, "training", "image"), nan_checkpoint)
    assert_one_message(result, f"checkpoint {nan_checkpoint} holds NaN or infinite weights", "use another checkpoint")
    assert not (bundle / "eval").exists()


def test_error_during_evaluation_prints_once(bundle, phantom, nan_checkpoint):
    # raised inside the evaluator's run: it used to print three times (StatsHandler, Ignite, the process) in 268 lines
    shipped = digest(bundle / "models" / "model.pt")
    code, lines = run_bundle(
        bundle,
        "--dataset_dir",
        str(phantom),
        "--ckpt_dir",
        str(nan_checkpoint.parent),
        configs=("train.json", "evaluate.json"),
    )
    report = "\n".join(lines)
    assert code != 0 and "Traceback" not in report
    assert sum("holds NaN or infinite weights" in line for line in lines) == 1, report
    assert lines[-1].startswith(f"checkpoint {nan_checkpoint} holds NaN or infinite weights"), report
    assert len(lines) <= MAX_RUN_ERROR_LINES, f"{len(lines)} lines:\n{report}"
    assert not list((bundle / "eval").glob("organ_metrics*.csv"))
    assert digest(bundle / "models" / "model.pt") == shipped


# --- what the masks keep of their input and get from the umask --------------------------------------------------


def two_forms_copy(source, target):
    """``source``'s voxels with its affine as the qform (code 1, scanner) and, as the sform (code 2, aligned), that
    affine turned 10 degrees about z and moved 7 mm: the two forms differ, as after a registration."""
    image = nib.load(source)
    turn = np.eye(4)
    cos, sin = np.cos(np.deg2rad(10.0)), np.sin(np.deg2rad(10.0))
    turn[:2, :2] = [[cos, -sin], [sin, cos]]
    sform = turn @ image.affine
    sform[:3, 3] += 7.0
    copy = nib.Nifti1Image(np.asanyarray(image.dataobj), None)
    copy.set_qform(image.affine, code=1)
    copy.set_sform(sform, code=2)
    nib.save(copy, target)
    return target


def assert_same_forms(mask_path, source_path):
    mask, source = nib.load(mask_path), nib.load(source_path)
    assert mask.shape == source.shape
    for kind in ("qform", "sform"):
        (mask_affine, mask_code), (source_affine, source_code) = (
            getattr(image.header, f"get_{kind}")(coded=True) for image in (mask, source)
        )
        assert int(mask_code) == int(source_code), kind
        np.testing.assert_allclose(mask_affine, source_affine, atol=1e-5, err_msg=kind)
    assert len(np.unique(np.asanyarray(mask.dataobj))) >= 2, "a one-label mask would not show a misplaced mask"


def test_two_forms_copy_has_two_forms(phantom, tmp_path):
    # the test input of the two tests below: qform and sform really differ, each with its code
    image = nib.load(two_forms_copy(case_file(phantom, "training", "image"), tmp_path / "ct.nii.gz"))
    qform, qcode = image.header.get_qform(coded=True)
    sform, scode = image.header.get_sform(coded=True)
    assert (int(qcode), int(scode)) == (1, 2) and np.abs(qform - sform).max() > 5


def test_inference_json_keeps_qform_and_sform_and_the_umask(bundle, phantom, checkpoint, tmp_path):
    source = two_forms_copy(case_file(phantom, "training", "image"), tmp_path / "ct.nii.gz")
    with umask(0o077):
        code, lines = run_inference(bundle, source, checkpoint)
    assert code == 0, "\n".join(lines[-30:])
    mask = bundle / "eval" / "inference" / "ct_seg.nii.gz"
    assert_same_forms(mask, source)
    assert mode(mask) == 0o600


@pytest.mark.parametrize("mask_bits, expected", [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def test_scripts_infer_keeps_qform_and_sform_and_the_umask(phantom, checkpoint, tmp_path, mask_bits, expected):
    from scripts.infer import main

    source = two_forms_copy(case_file(phantom, "training", "image"), tmp_path / "ct.nii.gz")
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    args = [str(source), "--output", str(out), "--config", str(CONFIGS / "inference.json"), str(tiny)]
    args += ["--model", str(checkpoint), "--device", "cpu", "--num-workers", "0", "--no-progress"]
    args += ["--volumes-csv", str(out / "volumes.csv")]
    with umask(mask_bits):
        assert main(args) == 0
    assert_same_forms(out / "ct_seg.nii.gz", source)
    assert {p.name: mode(p) for p in out.iterdir()} == {
        name: expected for name in ("ct_seg.nii.gz", "ct_seg.json", "volumes.csv")
    }


# --- resume with a new learning rate, typed on the command line ---------------------------------------------------


def test_resume_with_a_new_learning_rate_from_the_command_line(bundle, phantom):
    # tests/bundle/test_workflows.py checks the schedule in-process; this is the command a user types
    shipped = digest(bundle / "models" / "model.pt")
    short = ("--dataset_dir", str(phantom), "--val_interval", "1", "--train#trainer#epoch_length", "1")
    code, lines = run_bundle(bundle, *short, "--epochs", "1")
    assert code == 0, "\n".join(lines[-30:])
    code, lines = run_bundle(bundle, *short, "--epochs", "2", "--learning_rate", "1e-4", "--resume", "true")
    assert code == 0, "\n".join(lines[-30:])
    notes = [line for line in lines if " - resume: " in line]
    assert len(notes) == 1 and notes[0].endswith(
        "resume: this command's epochs 2 (checkpoint: 1), learning_rate 0.0001 (checkpoint: 0.002) take effect"
    ), "\n".join(lines)
    assert any("Epoch[2] Complete" in line for line in lines) and not any("Epoch[1] Complete" in line for line in lines)
    saved = torch.load(bundle / "eval" / "checkpoints" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert saved["run"]["learning_rates"] == [1e-4] and saved["run"]["epochs"] == 2
    kept = list((bundle / "models").glob("model.*.pt"))  # the shipped weights, kept aside once, by the first run
    assert len(kept) == 1 and digest(kept[0]) == shipped
