"""Real abdominal CT cases with BTCV labels, built from the reference files of ``totalsegmentator==2.18.0``'s
PyPI source distribution (Apache-2.0; see docs/data_license.md).

The sdist ships two CTs with TotalSegmentator's own multi-label output for them (model output, not manual
annotation): ``tests/reference_files/example_ct.nii.gz`` with ``example_seg_fast_force_split.nii.gz``, and the
DICOM series ``example_ct_dicom/`` with ``example_seg_dicom.nii.gz``. Label values are mapped to the 14 BTCV
labels by organ *name*, read from ``class_map["total"]`` in ``totalsegmentator/map_to_binary.py`` of the same
sdist, so a renumbering upstream cannot silently swap organs. The DICOM series is JPEG 2000 encoded; it is read
with a small explicit-VR parser and Pillow's JPEG 2000 decoder and checked voxel-for-voxel against the grid of
its segmentation.

Usage::

    python -m scripts.data example-ct --out data/example_ct [--sdist totalsegmentator-2.18.0.tar.gz]
"""

from __future__ import annotations

import ast
import io
import json
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.phantom import LABELS

SDIST = "totalsegmentator==2.18.0"
REFERENCE = "tests/reference_files"
# TotalSegmentator "total" task class name -> BTCV label
TOTALSEG_TO_BTCV = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior_vena_cava": 9,
    "portal_vein_and_splenic_vein": 10,
    "pancreas": 11,
    "adrenal_gland_right": 12,
    "adrenal_gland_left": 13,
}
CASES = {  # case name -> (image inside REFERENCE, its TotalSegmentator label map)
    "example_ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
    "example_ct_dicom": ("example_ct_dicom", "example_seg_dicom.nii.gz"),
}


def read_class_map(source: str, task: str = "total") -> dict[int, str]:
    """``class_map[task]`` of a ``map_to_binary.py`` source text, read with ``ast`` (the module is not run)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            class_map = ast.literal_eval(node.value)
            if task not in class_map:
                raise ValueError(f"map_to_binary.py has no class_map[{task!r}]; it has {sorted(class_map)}.")
            return {int(k): str(v) for k, v in class_map[task].items()}
    raise ValueError("map_to_binary.py defines no literal class_map dict.")


def btcv_lookup(class_map: dict[int, str]) -> np.ndarray:
    """A lookup table from TotalSegmentator label values to BTCV labels (0 for organs outside BTCV).

    Raises:
        ValueError: when an organ of ``TOTALSEG_TO_BTCV`` is missing from ``class_map``.
    """
    missing = sorted(set(TOTALSEG_TO_BTCV) - set(class_map.values()))
    if missing:
        raise ValueError(f"TotalSegmentator class map lacks {missing}; cannot map to BTCV labels.")
    table = np.zeros(max(class_map) + 1, dtype=np.uint8)
    for value, name in class_map.items():
        table[value] = TOTALSEG_TO_BTCV.get(name, 0)
    return table


# -- a minimal DICOM reader: explicit VR little endian, single frame, encapsulated JPEG 2000 or native pixels --

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_WANTED = {
    (0x0002, 0x0010),
    (0x0020, 0x0032),
    (0x0020, 0x0037),
    (0x0028, 0x0030),
    (0x0028, 0x0010),
    (0x0028, 0x0011),
    (0x0028, 0x0101),
    (0x0028, 0x0103),
    (0x0028, 0x1052),
    (0x0028, 0x1053),
    (0x7FE0, 0x0010),
}


def _skip_items(data: bytes, pos: int, end_tag: tuple[int, int]) -> int:
    """Skip undefined-length content up to and including its delimiter ``end_tag``; return the next position."""
    while True:
        group, element = struct.unpack_from("<HH", data, pos)
        if (group, element) == end_tag:
            return pos + 8
        if (group, element) == (0xFFFE, 0xE000):  # an item
            length = struct.unpack_from("<I", data, pos + 4)[0]
            pos = _skip_items(data, pos + 8, (0xFFFE, 0xE00D)) if length == _UNDEFINED else pos + 8 + length
        else:
            pos = _read_element(data, pos, {})


def _read_element(data: bytes, pos: int, out: dict) -> int:
    group, element = struct.unpack_from("<HH", data, pos)
    vr = data[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        length, start = struct.unpack_from("<I", data, pos + 8)[0], pos + 12
    else:
        length, start = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
    if length == _UNDEFINED:
        if (group, element) == (0x7FE0, 0x0010):  # encapsulated pixel data: offset table, then fragments
            fragments, cursor = [], start
            while struct.unpack_from("<HH", data, cursor) != (0xFFFE, 0xE0DD):
                size = struct.unpack_from("<I", data, cursor + 4)[0]
                fragments.append(data[cursor + 8 : cursor + 8 + size])
                cursor += 8 + size
            out[(group, element)] = fragments[1:]
            return cursor + 8
        return _skip_items(data, start, (0xFFFE, 0xE0DD))
    if (group, element) in _WANTED:
        out[(group, element)] = data[start : start + length]
    return start + length


def read_dicom_slice(path: Path) -> tuple[np.ndarray, dict]:
    """Pixel values in HU ``(rows, columns)`` float32 and the geometry tags of one CT slice."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path} is not a DICOM file (no DICM preamble).")
    tags: dict = {}
    pos = 132
    while pos < len(data):
        pos = _read_element(data, pos, tags)
    syntax = tags[(0x0002, 0x0010)].rstrip(b"\0 ").decode()
    if syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2"):
        raise ValueError(f"{path}: transfer syntax {syntax} (implicit VR or big endian) is not supported.")

    def numbers(tag):
        return [float(v) for v in tags[tag].decode().strip("\0 ").split("\\")]

    rows, cols = struct.unpack("<H", tags[(0x0028, 0x0010)])[0], struct.unpack("<H", tags[(0x0028, 0x0011)])[0]
    signed = struct.unpack("<H", tags.get((0x0028, 0x0103), b"\0\0"))[0] == 1
    pixels = tags[(0x7FE0, 0x0010)]
    if isinstance(pixels, list):  # encapsulated: JPEG 2000 (the sdist's series)
        from PIL import Image

        array = np.array(Image.open(io.BytesIO(b"".join(pixels))))
        bits = struct.unpack("<H", tags.get((0x0028, 0x0101), b"\x10\0"))[0]
        shift = 16 - bits
        # Pillow scales a 12-bit JPEG 2000 codestream up to 16 bits; undo it so that the rescale tags apply
        if array.dtype == np.uint16 and shift > 0 and not np.any(array % (1 << shift)):
            array = array >> shift
        if signed:
            array = array.astype(np.int32)
            array[array >= 1 << (bits - 1)] -= 1 << bits
    else:
        array = np.frombuffer(pixels, dtype=np.int16 if signed else np.uint16).reshape(rows, cols)
    if array.shape != (rows, cols):
        raise ValueError(f"{path}: decoded pixels have shape {array.shape}, expected {(rows, cols)}.")
    slope = numbers((0x0028, 0x1053))[0] if (0x0028, 0x1053) in tags else 1.0
    intercept = numbers((0x0028, 0x1052))[0] if (0x0028, 0x1052) in tags else 0.0
    geometry = {
        "position": numbers((0x0020, 0x0032)),
        "orientation": numbers((0x0020, 0x0037)),
        "spacing": numbers((0x0028, 0x0030)),
    }
    return array.astype(np.float32) * slope + intercept, geometry


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CT series as ``(volume (columns, rows, slices), RAS+ affine)``, slices sorted along their normal."""
    slices = [read_dicom_slice(p) for p in sorted(folder.iterdir()) if p.is_file()]
    if not slices:
        raise ValueError(f"no DICOM files in {folder}.")
    orientation = np.array(slices[0][1]["orientation"])
    row_dir, col_dir = orientation[:3], orientation[3:]  # directions of increasing column / row index
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(s[1]["position"], normal)))
    positions = np.array([s[1]["position"] for s in slices])
    row_spacing, col_spacing = slices[0][1]["spacing"]
    step = (positions[-1] - positions[0]) / max(len(slices) - 1, 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * col_spacing, col_dir * row_spacing, step, positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS to NIfTI's RAS
    volume = np.stack([s[0].T for s in slices], axis=-1)  # (rows, cols) -> (cols, rows), stacked on the last axis
    return volume, affine


def _onto_grid(volume: np.ndarray, affine: np.ndarray, target: nib.Nifti1Image, name: str) -> np.ndarray:
    """``volume`` reoriented to ``target``'s voxel order; raises unless both describe the same grid."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.io_orientation(target.affine)
    )
    moved = nib.orientations.apply_orientation(volume, transform)
    moved_affine = affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    if moved.shape != target.shape[:3] or not np.allclose(moved_affine, target.affine, atol=0.05):
        raise ValueError(
            f"{name}: the DICOM series (shape {moved.shape}) and its segmentation (shape "
            f"{target.shape[:3]}) do not share a voxel grid."
        )
    return moved


def download_sdist(dest: Path) -> Path:
    """``pip download`` the source distribution of ``totalsegmentator==2.18.0`` (no dependencies) to ``dest``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(dest)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    found = sorted(dest.glob("totalsegmentator-2.18.0.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download left no totalsegmentator-2.18.0.tar.gz in {dest}.")
    return found[0]


def build_example_ct(
    out_dir: str | Path, sdist: str | Path | None = None, cases: tuple[str, ...] = tuple(CASES)
) -> Path:
    """Write the sdist's CTs with BTCV labels and an MSD-style ``dataset.json`` to ``out_dir``.

    Args:
        out_dir: output folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``).
        sdist: path of ``totalsegmentator-2.18.0.tar.gz``; ``None`` downloads it with pip (default).
        cases: which of ``CASES`` to build (default both).
    """
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        archive = Path(sdist) if sdist is not None else download_sdist(tmp_dir)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_dir / "src", filter="data")
        roots = list((tmp_dir / "src").glob("totalsegmentator-*"))
        if len(roots) != 1:
            raise ValueError(f"{archive} does not hold one totalsegmentator-<version>/ folder.")
        root = roots[0]
        table = btcv_lookup(read_class_map((root / "totalsegmentator" / "map_to_binary.py").read_text()))
        (out / "imagesTr").mkdir(parents=True, exist_ok=True)
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
        items = []
        for case in cases:
            image_name, seg_name = CASES[case]
            seg = nib.load(root / REFERENCE / seg_name)
            source = root / REFERENCE / image_name
            if source.is_dir():
                image = _onto_grid(*read_dicom_series(source), seg, case)
            else:
                ct = nib.load(source)
                if ct.shape[:3] != seg.shape[:3] or not np.allclose(ct.affine, seg.affine, atol=0.05):
                    raise ValueError(f"{case}: CT and segmentation do not share a voxel grid.")
                image = np.asanyarray(ct.dataobj)
            values = np.asanyarray(seg.dataobj).astype(np.int64)
            if values.min() < 0 or values.max() >= len(table):
                raise ValueError(f"{case}: label values {values.min()}..{values.max()} outside the class map.")
            label = table[values]
            nib.save(
                nib.Nifti1Image(np.clip(np.round(image), -1024, 3071).astype(np.int16), seg.affine),
                out / "imagesTr" / f"{case}.nii.gz",
            )
            nib.save(nib.Nifti1Image(label, seg.affine), out / "labelsTr" / f"{case}.nii.gz")
            items.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    dataset = {
        "name": "TotalSegmentatorExampleCT",
        "description": "The example CTs of totalsegmentator==2.18.0's sdist with its model-output labels mapped "
        "by organ name to the BTCV convention (see docs/data_license.md).",
        "reference": "https://github.com/wasserth/TotalSegmentator (tests/reference_files)",
        "licence": "Apache-2.0 (TotalSegmentator repository)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": len(items),
        "training": items,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return out
