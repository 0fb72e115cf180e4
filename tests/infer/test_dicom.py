"""DICOM in: ``scripts.infer`` segments a folder holding one CT series (or a folder of such folders), read with
MONAI's ``PydicomReader``, and writes the mask in the series' patient space: the same mask as for the same volume
given as NIfTI."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import infer_args
from monai.transforms import LoadImage

from scripts.infer import main

pydicom = pytest.importorskip("pydicom")


def write_series(
    folder: Path,
    volume: np.ndarray,
    spacing=(0.8, 0.9, 3.0),
    origin=(120.0, 95.0, -40.0),
    row_direction=(-1.0, 0.0, 0.0),
    column_direction=(0.0, -1.0, 0.0),
) -> Path:
    """``volume`` (columns x rows x slices, HU) as one CT series of single-frame files in ``folder``: each slice's
    pixel rows run along ``row_direction`` (LPS patient coordinates, as DICOM has them), slices along their
    cross product, files in reverse slice order (readers must sort by position, not by name)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(row_direction, column_direction)
    for index in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "phantom"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + index * spacing[2] * normal]
        ds.ImageOrientationPatient = [*map(float, row_direction), *map(float, column_direction)]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # between rows, between columns
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
        stored = (volume[:, :, index].T + 1024).astype(np.int16)  # rows x columns; HU = stored - 1024
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"slice_{volume.shape[2] - index:03d}.dcm", enforce_file_format=True)
    return folder


def ct_volume(shape=(40, 36, 9), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    return (np.where((grid[:2] ** 2).sum(0) < 0.7, 40.0, -1000.0) + rng.normal(0, 10, shape)).astype(np.int16)


def as_nifti(series: Path, target: Path) -> Path:
    """MONAI's reading of ``series`` (the array and its RAS affine) written as NIfTI."""
    image = LoadImage(reader="PydicomReader", image_only=True)(str(series))
    nib.save(nib.Nifti1Image(np.asarray(image).astype(np.int16), image.affine.numpy()), str(target))
    return target


def assert_same_mask_as_nifti(tiny_bundle, series: Path, tmp_path: Path) -> np.ndarray:
    out = tmp_path / "out"
    assert main(infer_args(tiny_bundle, str(series), "--output", str(out))) == 0
    mask = nib.load(out / f"{series.name}_seg.nii.gz")
    read = LoadImage(reader="PydicomReader", image_only=True)(str(series))
    assert mask.shape == tuple(read.shape)
    np.testing.assert_allclose(mask.affine, read.affine.numpy(), atol=1e-5)  # the series' patient space
    assert int(mask.header["sform_code"]) == 1 and int(mask.header["qform_code"]) == 1

    nifti = as_nifti(series, tmp_path / f"{series.name}.nii.gz")
    assert main(infer_args(tiny_bundle, str(nifti), "--output", str(tmp_path / "from_nifti"))) == 0
    expected = nib.load(tmp_path / "from_nifti" / f"{series.name}_seg.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), np.asanyarray(expected.dataobj))
    np.testing.assert_allclose(mask.affine, expected.affine, atol=1e-5)
    return np.asanyarray(mask.dataobj)


def test_a_dicom_series_folder_gives_the_mask_of_the_same_volume_as_nifti(tiny_bundle, tmp_path):
    series = write_series(tmp_path / "series", ct_volume())
    mask = assert_same_mask_as_nifti(tiny_bundle, series, tmp_path)
    assert len(np.unique(mask)) >= 2, "a one-label mask would make the comparison vacuous"


def test_a_folder_of_series_folders_gives_one_mask_per_series(tiny_bundle, tmp_path):
    studies = tmp_path / "studies"
    write_series(studies / "a", ct_volume(seed=1))
    write_series(studies / "b", ct_volume((32, 30, 7), seed=2), row_direction=(1.0, 0.0, 0.0))
    (studies / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(infer_args(tiny_bundle, str(studies), "--output", str(out))) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a_seg.nii.gz", "b_seg.nii.gz"]


def test_a_truncated_slice_is_reported_by_its_file(tiny_bundle, tmp_path, capsys):
    """MONAI's reader alone would skip the file with a warning and segment a volume one slice short."""
    series = write_series(tmp_path / "broken", ct_volume())
    first = sorted(series.iterdir())[0]
    first.write_bytes(first.read_bytes()[:400])
    out = tmp_path / "out"
    assert main(infer_args(tiny_bundle, str(series), "--output", str(out))) == 1
    assert f"FAILED {first}: not a readable CT slice" in capsys.readouterr().out and not list(out.glob("*.nii.gz"))


def test_a_missing_slice_is_reported_by_its_folder(tiny_bundle, tmp_path, capsys):
    """MONAI's reader alone would average the gap into the slice spacing: a mask on the wrong geometry."""
    series = write_series(tmp_path / "gap", ct_volume())
    sorted(series.iterdir())[4].unlink()
    out = tmp_path / "out"
    assert main(infer_args(tiny_bundle, str(series), "--output", str(out))) == 1
    assert f"FAILED {series}: the slices, in InstanceNumber order, are not evenly spaced (steps from 3 to 6 mm)" in (
        capsys.readouterr().out
    )
    assert not list(out.glob("*.nii.gz"))


@pytest.fixture(scope="module")
def example_ct_dicom(tmp_path_factory) -> Path:
    """The JPEG 2000 DICOM series of totalsegmentator==2.18.0's sdist (the one ``scripts/example_ct.py`` builds
    from); EXAMPLE_CT_SDIST names a downloaded copy, else pip downloads it (38 MB), and the test is skipped
    where neither works."""
    from scripts.example_ct import REFERENCE, download_sdist

    tmp = tmp_path_factory.mktemp("sdist")
    try:
        sdist = Path(os.environ["EXAMPLE_CT_SDIST"]) if "EXAMPLE_CT_SDIST" in os.environ else download_sdist(tmp)
    except Exception as error:  # noqa: BLE001 - no package index reachable
        pytest.skip(f"the totalsegmentator==2.18.0 sdist is not available ({error}); set EXAMPLE_CT_SDIST")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if f"{REFERENCE}/example_ct_dicom/" in m.name]
        tar.extractall(tmp, members=members, filter="data")
    return next(tmp.glob(f"totalsegmentator-*/{REFERENCE}/example_ct_dicom"))


def test_the_example_ct_dicom_series(tiny_bundle, example_ct_dicom, tmp_path):
    mask = assert_same_mask_as_nifti(tiny_bundle, example_ct_dicom, tmp_path)
    assert mask.shape == (512, 512, 20) and len(np.unique(mask)) >= 2
