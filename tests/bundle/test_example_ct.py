"""Real-CT preparation on a small fake sdist (no download): labels mapped by organ name, DICOM geometry."""

import gzip
import io
import json
import struct
import tarfile

import nibabel as nib
import numpy as np
import pytest

from scripts.example_ct import (
    TOTALSEG_TO_BTCV,
    _onto_grid,
    btcv_lookup,
    build_example_ct,
    read_class_map,
    read_dicom_series,
)

# TotalSegmentator numbering differs from BTCV's, and between its tasks: only names may be trusted
TOTAL = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    8: "adrenal_gland_right",
    9: "adrenal_gland_left",
    15: "esophagus",
    51: "heart",
    52: "aorta",
    63: "inferior_vena_cava",
    64: "portal_vein_and_splenic_vein",
    90: "brain",
}
MAP_TO_BINARY = (
    f"import os\n\nclass_map = {{\n    'total_v1': {{1: 'spleen', 5: 'liver'}},\n    'total': {TOTAL!r},\n}}\n"
)


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _nifti_bytes(array, affine):
    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


@pytest.fixture
def fake_sdist(tmp_path):
    rng = np.random.default_rng(0)
    seg = rng.choice(list(TOTAL) + [0], size=(6, 5, 4)).astype(np.uint8)
    ct = rng.integers(-1000, 1000, size=seg.shape).astype(np.int16)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    path = tmp_path / "totalsegmentator-2.18.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        root = "totalsegmentator-2.18.0/"
        _add(tar, root + "totalsegmentator/map_to_binary.py", MAP_TO_BINARY.encode())
        _add(tar, root + "tests/reference_files/example_ct.nii.gz", _nifti_bytes(ct, affine))
        _add(tar, root + "tests/reference_files/example_seg_fast_force_split.nii.gz", _nifti_bytes(seg, affine))
    return path, ct, seg


def test_class_map_read_without_running_the_module():
    assert read_class_map(MAP_TO_BINARY) == TOTAL
    assert read_class_map(MAP_TO_BINARY, "total_v1") == {1: "spleen", 5: "liver"}
    with pytest.raises(ValueError, match="no class_map\\['nope'\\]"):
        read_class_map(MAP_TO_BINARY, "nope")


def test_lookup_maps_by_name():
    table = btcv_lookup(TOTAL)
    for value, name in TOTAL.items():
        assert table[value] == TOTALSEG_TO_BTCV.get(name, 0), name
    assert table[5] == 6 and table[52] == 8 and table[90] == 0 and table[51] == 0  # liver, aorta, brain, heart
    with pytest.raises(ValueError, match="lacks \\['spleen'\\]"):
        btcv_lookup({k: v for k, v in TOTAL.items() if v != "spleen"})


def test_build_from_fake_sdist(fake_sdist, tmp_path):
    path, ct, seg = fake_sdist
    out = build_example_ct(tmp_path / "out", sdist=path, cases=("example_ct",))
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["training"] == [{"image": "./imagesTr/example_ct.nii.gz", "label": "./labelsTr/example_ct.nii.gz"}]
    label = np.asanyarray(nib.load(out / "labelsTr/example_ct.nii.gz").dataobj)
    expected = np.vectorize(lambda v: TOTALSEG_TO_BTCV.get(TOTAL.get(int(v), ""), 0))(seg)
    np.testing.assert_array_equal(label, expected)
    np.testing.assert_array_equal(np.asanyarray(nib.load(out / "imagesTr/example_ct.nii.gz").dataobj), ct)


def _element(group, element, vr, value: bytes):
    if len(value) % 2:
        value += b" "
    if vr in (b"OB", b"OW"):
        return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def _write_dicom(path, pixels, position, orientation=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.7)):
    numbers = lambda values: "\\".join(f"{v:g}" for v in values).encode()  # noqa: E731
    meta = _element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1\0")
    body = b"".join(
        [
            _element(0x0020, 0x0032, b"DS", numbers(position)),
            _element(0x0020, 0x0037, b"DS", numbers(orientation)),
            _element(0x0028, 0x0010, b"US", struct.pack("<H", pixels.shape[0])),
            _element(0x0028, 0x0011, b"US", struct.pack("<H", pixels.shape[1])),
            _element(0x0028, 0x0030, b"DS", numbers(spacing)),
            _element(0x0028, 0x0103, b"US", struct.pack("<H", 1)),
            _element(0x0028, 0x1052, b"DS", b"-1024"),
            _element(0x0028, 0x1053, b"DS", b"1"),
            _element(0x7FE0, 0x0010, b"OW", pixels.astype("<i2").tobytes()),
        ]
    )
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + body)


def test_dicom_series_geometry(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 2000, size=(3, 4, 5)).astype(np.int16)  # (slices, rows, columns)
    folder = tmp_path / "series"
    folder.mkdir()
    for k in (2, 0, 1):  # written out of order: sorting is by position along the slice normal
        _write_dicom(folder / f"slice{k}", stored[k], position=(-10.0, -20.0, 5.0 + 2.5 * k))
    volume, affine = read_dicom_series(folder)
    np.testing.assert_array_equal(volume, stored.transpose(2, 1, 0).astype(np.float32) - 1024)
    # LPS -> RAS: column index grows towards patient left (-x in RAS), row index towards posterior (-y)
    np.testing.assert_allclose(affine, [[-0.7, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    target = nib.Nifti1Image(
        np.zeros((5, 4, 3), np.uint8), affine @ np.array([[-1, 0, 0, 4], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    )  # the same grid stored with axis 0 flipped
    np.testing.assert_array_equal(_onto_grid(volume, affine, target, "case"), volume[::-1])
    moved = affine.copy()
    moved[:3, 3] += 3.0
    shifted = nib.Nifti1Image(np.zeros((5, 4, 3), np.uint8), moved)
    with pytest.raises(ValueError, match="do not share a voxel grid"):
        _onto_grid(volume, affine, shifted, "case")
