"""``python -m scripts.infer``: masks on the input's grid, the same masks as ``monai.bundle``, AMP, bad inputs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, infer_args, save_nifti
from monai.bundle import ConfigWorkflow

from scripts.infer import main

NAMES = ("las", "lps", "permuted")


@pytest.fixture(scope="module")
def inferred(tiny_bundle, ct_folder, tmp_path_factory) -> Path:
    """One run of the script over the phantom folder, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("masks")
    assert main(infer_args(tiny_bundle, str(ct_folder), "--output", str(out), "--volumes-csv", str(out / "v.csv"))) == 0
    return out


@pytest.mark.parametrize("name", NAMES)
def test_mask_on_the_input_grid(inferred, ct_folder, name):
    source = nib.load(ct_folder / f"{name}.nii.gz")
    mask = nib.load(inferred / f"{name}_seg.nii.gz")
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(source.affine)
    assert int(mask.header["sform_code"]) == int(source.header["sform_code"])
    assert mask.get_data_dtype() == np.uint8
    labels = np.unique(np.asanyarray(mask.dataobj))
    assert labels.min() >= 0 and labels.max() <= 13
    assert len(labels) >= 2, "a one-label mask would make the comparisons below vacuous"


def test_masks_equal_monai_bundle_run(inferred, tiny_bundle, ct_folder, tmp_path):
    meta = str(BUNDLE_ROOT / "configs" / "metadata.json")
    workflow = ConfigWorkflow(
        config_file=tiny_bundle["config"],
        meta_file=meta,
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        input=str(ct_folder),
        output_dir=str(tmp_path),
        ckpt_path=tiny_bundle["model"],
        device="$torch.device('cpu')",
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    for name in NAMES:
        reference = nib.load(tmp_path / f"{name}_seg.nii.gz")
        ours = nib.load(inferred / f"{name}_seg.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(reference.dataobj))
        np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-4)


def test_masks_equal_the_model_zoo_postprocessing(inferred, tiny_bundle, ct_folder, tmp_path):
    """The config's chunked inverse (InvertArgmaxd) against the model zoo's Activationsd -> Invertd -> AsDiscreted,
    kept in configs/reference/inference_invertd.json, both through the script on the LAS, LPS and permuted phantoms."""
    inference_json, tiny = tiny_bundle["config"]
    reference = {
        **tiny_bundle,
        "config": [inference_json, str(BUNDLE_ROOT / "configs" / "reference" / "inference_invertd.json"), tiny],
    }
    assert main(infer_args(reference, str(ct_folder), "--output", str(tmp_path))) == 0
    for name in NAMES:
        expected = np.asanyarray(nib.load(tmp_path / f"{name}_seg.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asanyarray(nib.load(inferred / f"{name}_seg.nii.gz").dataobj), expected)


def test_sidecar_names_every_label(inferred):
    sidecar = json.loads((inferred / "las_seg.json").read_text())
    meta = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    assert sidecar["labels"] == meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert sidecar["image"].endswith("las.nii.gz")


def test_volumes_csv_counts_times_voxel_volume(inferred, ct_folder):
    with open(inferred / "v.csv") as stream:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(stream)}
    assert sorted(rows) == sorted(f"{n}.nii.gz" for n in NAMES)
    for name in NAMES:
        mask = nib.load(inferred / f"{name}_seg.nii.gz")
        voxel_ml = abs(np.linalg.det(nib.load(ct_folder / f"{name}.nii.gz").affine[:3, :3])) / 1000.0
        counts = np.bincount(np.asanyarray(mask.dataobj).ravel(), minlength=14)
        row = rows[f"{name}.nii.gz"]
        assert float(row["voxel_volume_ml"]) == pytest.approx(voxel_ml, rel=1e-5)
        assert float(row["liver (mL)"]) == pytest.approx(counts[6] * voxel_ml, abs=1e-3)
        assert float(row["left adrenal gland (mL)"]) == pytest.approx(counts[13] * voxel_ml, abs=1e-3)


def test_cpu_bf16_autocast_gives_a_valid_mask_close_to_float32(inferred, tiny_bundle, ct_folder, tmp_path, capsys):
    assert main(infer_args(tiny_bundle, str(ct_folder / "las.nii.gz"), "--output", str(tmp_path), "--amp", "bf16")) == 0
    assert "amp: bf16" in capsys.readouterr().out
    mask = np.asanyarray(nib.load(tmp_path / "las_seg.nii.gz").dataobj)
    full = np.asanyarray(nib.load(inferred / "las_seg.nii.gz").dataobj)
    assert mask.shape == full.shape and mask.dtype == np.uint8 and mask.max() <= 13
    # a random tiny network has close logits; reduced precision may flip a few argmaxes, not the mask
    assert (mask == full).mean() > 0.9


def test_cpu_fp16_autocast_is_accepted(tiny_bundle, tmp_path, capsys):
    # CPU float16 convolutions are slow: a small volume is enough to show the flag reaches autocast
    path = save_nifti(tmp_path / "small.nii.gz", _ct(), CT_AFFINE)
    assert main(infer_args(tiny_bundle, str(path), "--output", str(tmp_path / "o"), "--amp", "fp16")) == 0
    assert "amp: fp16" in capsys.readouterr().out
    mask = nib.load(tmp_path / "o" / "small_seg.nii.gz")
    assert mask.shape == (24, 20, 12) and np.asanyarray(mask.dataobj).max() <= 13


def test_sliding_window_flags_reach_the_inferer(inferred, tiny_bundle, ct_folder, tmp_path):
    # batching windows must not change the result; a whole-volume window does
    args = ["--sw-batch-size", "2", "--overlap", "0.25"]
    assert main(infer_args(tiny_bundle, str(ct_folder / "lps.nii.gz"), "--output", str(tmp_path / "a"), *args)) == 0
    same = nib.load(tmp_path / "a" / "lps_seg.nii.gz").get_fdata()
    np.testing.assert_array_equal(same, nib.load(inferred / "lps_seg.nii.gz").get_fdata())
    args = ["--roi-size", "16", "16", "16", "--overlap", "0"]
    assert main(infer_args(tiny_bundle, str(ct_folder / "lps.nii.gz"), "--output", str(tmp_path / "b"), *args)) == 0
    other = nib.load(tmp_path / "b" / "lps_seg.nii.gz").get_fdata()
    assert other.shape == same.shape and not np.array_equal(other, same)


# ------------------------------------------------------------------------------------------------ bad inputs

CT_AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])


def _ct(shape=(24, 20, 12)) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1000, 400, shape).astype(np.int16)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"not a nifti at all" * 20)


def _truncated(path: Path) -> None:
    save_nifti(path, _ct(), CT_AFFINE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    "corrupt": (_corrupt, "not a readable NIfTI"),
    "truncated": (_truncated, "cannot load"),
    "2d": (lambda p: save_nifti(p, _ct((24, 20)), CT_AFFINE), "2D image"),
    "single_slice": (lambda p: save_nifti(p, _ct((24, 20, 1)), CT_AFFINE), "2D image"),
    "three_channels": (lambda p: save_nifti(p, _ct((24, 20, 12, 3)), CT_AFFINE), "3 channels"),
    "normalised": (
        lambda p: save_nifti(p, np.random.default_rng(0).random((24, 20, 12), dtype=np.float32), CT_AFFINE),
        "not CT Hounsfield units",
    ),
    "eight_bit": (lambda p: save_nifti(p, _ct().clip(0, 255).astype(np.uint8), CT_AFFINE), "not CT Hounsfield units"),
    "nan": (lambda p: save_nifti(p, np.where(_ct() > 0, np.nan, _ct()).astype(np.float32), CT_AFFINE), "NaN"),
    "constant": (lambda p: save_nifti(p, np.full((24, 20, 12), -1000, np.int16), CT_AFFINE), "is constant"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_reported_and_nothing_written(tiny_bundle, tmp_path, capsys, kind):
    make, message = BAD_INPUTS[kind]
    path = tmp_path / f"{kind}.nii.gz"
    make(path)
    out = tmp_path / "out"
    assert main(infer_args(tiny_bundle, str(path), "--output", str(out))) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAILED ")]
    assert len(failed) == 1 and str(path) in failed[0] and message in failed[0], failed
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["nan", "constant"])
def test_nan_or_constant_image_is_refused_without_hu_check_too(tiny_bundle, tmp_path, capsys, kind):
    # --no-hu-check lets other intensities through, not an image with nothing to segment (an all-background mask)
    make, message = BAD_INPUTS[kind]
    path = make(tmp_path / f"{kind}.nii.gz")
    out = tmp_path / "out"
    assert main(infer_args(tiny_bundle, str(path), "--output", str(out), "--no-hu-check")) == 1
    assert f"FAILED image {path} " in capsys.readouterr().out
    assert list(out.iterdir()) == []


def test_single_channel_4d_and_no_hu_check_are_accepted(tiny_bundle, tmp_path):
    save_nifti(tmp_path / "four_d.nii.gz", _ct((24, 20, 12, 1)), CT_AFFINE)
    mr = np.random.default_rng(1).uniform(0, 900, (24, 20, 12)).astype(np.float32)
    save_nifti(tmp_path / "mr.nii.gz", mr, CT_AFFINE)
    assert main(infer_args(tiny_bundle, str(tmp_path / "four_d.nii.gz"), "--output", str(tmp_path / "a"))) == 0
    assert nib.load(tmp_path / "a" / "four_d_seg.nii.gz").shape == (24, 20, 12)
    args = infer_args(tiny_bundle, str(tmp_path / "mr.nii.gz"), "--output", str(tmp_path / "b"), "--no-hu-check")
    assert main(args) == 0


def test_mixed_folder_writes_the_good_and_reports_the_bad(tiny_bundle, ct_folder, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(ct_folder / "las.nii.gz", folder / "good1.nii.gz")
    shutil.copy(ct_folder / "permuted.nii.gz", folder / "good2.nii.gz")
    _corrupt(folder / "bad1.nii.gz")
    BAD_INPUTS["three_channels"][0](folder / "bad2.nii.gz")
    out = tmp_path / "out"
    # one DataLoader worker: the per-file checks must also hold when a worker process hits the bad files
    args = infer_args(tiny_bundle, str(folder), "--output", str(out), "--summary-json", str(tmp_path / "s.json"))
    args[args.index("--num-workers") + 1] = "1"
    assert main(args) == 1
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good1_seg.nii.gz", "good2_seg.nii.gz"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert sorted(Path(p).name for p in summary["failed"]) == ["bad1.nii.gz", "bad2.nii.gz"]
    assert summary["voxels"] == sum(int(np.prod(nib.load(folder / f"good{i}.nii.gz").shape)) for i in (1, 2))
    assert summary["voxels_per_second"] > 0
    report = capsys.readouterr().out
    assert "2 written, 2 failed" in report and "voxels/s" in report


def test_missing_input_is_reported_and_the_rest_runs(tiny_bundle, ct_folder, tmp_path, capsys):
    missing = tmp_path / "missing.nii.gz"
    args = infer_args(tiny_bundle, str(missing), str(ct_folder / "las.nii.gz"), "--output", str(tmp_path / "o"))
    assert main(args) == 1
    assert (tmp_path / "o" / "las_seg.nii.gz").is_file()
    assert str(missing) in capsys.readouterr().out


def test_existing_outputs_are_kept_without_overwrite(tiny_bundle, ct_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "las_seg.nii.gz").write_bytes(b"earlier result")
    args = infer_args(tiny_bundle, str(ct_folder / "las.nii.gz"), "--output", str(out))
    assert main(args) == 1
    assert (out / "las_seg.nii.gz").read_bytes() == b"earlier result"
    assert "--overwrite" in capsys.readouterr().out
    assert main([*args, "--overwrite"]) == 0
    assert nib.load(out / "las_seg.nii.gz").shape == nib.load(ct_folder / "las.nii.gz").shape
    assert sorted(p.name for p in out.iterdir()) == ["las_seg.json", "las_seg.nii.gz"]  # no temporary left


def test_existing_volumes_csv_stops_before_any_work(tiny_bundle, ct_folder, tmp_path, capsys):
    (tmp_path / "v.csv").write_text("keep me")
    csv_args = ["--volumes-csv", str(tmp_path / "v.csv")]
    args = infer_args(tiny_bundle, str(ct_folder), "--output", str(tmp_path / "o"), *csv_args)
    assert main(args) == 2
    assert (tmp_path / "v.csv").read_text() == "keep me" and not (tmp_path / "o").exists()
    assert "--overwrite" in capsys.readouterr().err


def test_two_inputs_with_one_output_name(tiny_bundle, ct_folder, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in "ab":
        shutil.copy(ct_folder / "las.nii.gz", tmp_path / sub / "ct.nii.gz")
    args = infer_args(tiny_bundle, str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "o"))
    assert main(args) == 1
    assert "would replace" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "ct_seg.json").read_text())["image"] == str(tmp_path / "a" / "ct.nii.gz")


def test_msd_dataset_json_input(tiny_bundle, ct_folder, tmp_path):
    for name in ("las", "lps"):
        shutil.copy(ct_folder / f"{name}.nii.gz", tmp_path / f"{name}.nii.gz")
    (tmp_path / "dataset.json").write_text(
        json.dumps({"test": ["lps.nii.gz"], "training": [{"image": "las.nii.gz", "label": "las.nii.gz"}]})
    )
    assert main(infer_args(tiny_bundle, str(tmp_path / "dataset.json"), "--output", str(tmp_path / "o"))) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.nii.gz")) == ["lps_seg.nii.gz"]


def _checkpoint(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:  # a state dict of another network
        torch.save({"model": {"weight": torch.zeros(3)}}, path)
    return str(path)


USAGE_ERRORS = {
    "missing checkpoint": (lambda tmp: ["--model", "/nonexistent/model.pt"], "does not exist"),
    "garbage checkpoint": (lambda tmp: ["--model", _checkpoint(tmp, "garbage")], "not a readable PyTorch checkpoint"),
    "other network": (lambda tmp: ["--model", _checkpoint(tmp, "other")], "does not fit the config's network_def"),
    "overlap 1": (lambda tmp: ["--overlap", "1.0"], "--overlap must be in [0, 1)"),
    "no windows": (lambda tmp: ["--sw-batch-size", "0"], "--sw-batch-size must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_exit_2_before_any_output(tiny_bundle, ct_folder, tmp_path, capsys, case):
    flags, message = USAGE_ERRORS[case]
    assert main([*infer_args(tiny_bundle, str(ct_folder), "--output", str(tmp_path / "o")), *flags(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "scripts.infer: error:" in err and message in err
    assert not (tmp_path / "o").exists()


def test_command_line_exit_status(tiny_bundle, ct_folder, tmp_path):
    """``python -m scripts.infer`` from the bundle root: a bad file among good ones gives exit status 1."""
    shutil.copy(ct_folder / "las.nii.gz", tmp_path / "good.nii.gz")
    _corrupt(tmp_path / "bad.nii.gz")
    args = infer_args(
        tiny_bundle, str(tmp_path / "good.nii.gz"), str(tmp_path / "bad.nii.gz"), "--output", str(tmp_path / "o")
    )
    run = subprocess.run(
        [sys.executable, "-m", "scripts.infer", *args], cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1, run.stderr
    assert "1 written, 1 failed" in run.stdout and f"FAILED {tmp_path / 'bad.nii.gz'}" in run.stdout
    assert (tmp_path / "o" / "good_seg.nii.gz").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_requested_without_cuda_exits_2(tiny_bundle, ct_folder, tmp_path, capsys):
    args = infer_args(tiny_bundle, str(ct_folder), "--output", str(tmp_path / "o"))
    args[args.index("--device") + 1] = "cuda"
    assert main(args) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_default_device_notice_on_cpu(tiny_bundle, ct_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = infer_args(tiny_bundle, str(ct_folder / "las.nii.gz"), "--output", str(tmp_path / "o"))
    i = args.index("--device")
    del args[i : i + 2]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "running on the CPU" in captured.err and "amp: off" in captured.out


def test_a_volume_failing_on_the_device_does_not_end_the_run(tiny_bundle, ct_folder, tmp_path, capsys, monkeypatch):
    import scripts.infer as infer

    real_segment = infer.segment

    def out_of_memory_on_lps(bundle, item, device, amp_dtype):
        if item["path"].endswith("lps.nii.gz"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_segment(bundle, item, device, amp_dtype)

    monkeypatch.setattr(infer, "segment", out_of_memory_on_lps)
    assert main(infer_args(tiny_bundle, str(ct_folder), "--output", str(tmp_path))) == 1
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == ["las_seg.nii.gz", "permuted_seg.nii.gz"]
    report = capsys.readouterr().out
    assert "2 written, 1 failed" in report and "out of GPU memory" in report and "--sw-batch-size" in report
