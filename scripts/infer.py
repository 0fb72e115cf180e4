"""Segment CT volumes with the bundle: NIfTI or DICOM in, one ``uint8`` organ mask per volume out, fast and
per-file safe.

Command line, from the bundle root::

    python -m scripts.infer data/ct/ --output masks/                     # a folder of .nii/.nii.gz
    python -m scripts.infer dicom/series_1/ --output masks/              # a DICOM series (or a folder of them)
    python -m scripts.infer a.nii.gz b.nii.gz --output masks/ --volumes-csv masks/volumes.csv
    python -m scripts.infer data/phantom/dataset.json --output masks/ --amp bf16 --sw-batch-size 16

The network, preprocessing, sliding-window inferer and postprocessing are the ids ``network_def``,
``preprocessing``, ``inferer`` and ``postprocessing`` of ``configs/inference.json`` read with
``monai.bundle.ConfigParser`` (``--config`` merges other files over it like ``monai.bundle run``), so this
script and ``python -m monai.bundle run --config_file configs/inference.json`` compute the same masks; the
config's ``SaveImaged`` is replaced by an atomic writer that never overwrites without ``--overwrite`` and
writes in the input's own grid with its qform and sform and their codes.

What the script adds to ``monai.bundle run``: autocast (``--amp``), loading in ``DataLoader`` workers while
the device computes, writing in a background thread, a per-file check of every input (readable, 3D, one
channel, finite and not constant, Hounsfield-unit intensities) that reports a bad file and goes on, a sidecar
JSON of organ names next to each mask, optional per-organ volumes in mL, a progress bar and a speed summary.

Exit status: 0 when every input was written, 1 when any input failed or was skipped (bad file, existing
output without ``--overwrite``), 2 for a usage or configuration error (nothing processed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import ImageWriter, NibabelWriter, decollate_batch, list_data_collate
from monai.transforms import Compose, LoadImaged, SaveImaged

from scripts.checks import check_finite_and_varied
from scripts.data import DatasetError
from scripts.network_settings import check_settings_fit, recorded_settings

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
DEFAULT_META = BUNDLE_ROOT / "configs" / "metadata.json"
AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}

# A CT of the abdomen holds air (-1000 HU: outside the body, lung bases, bowel gas) and soft tissue (about
# +40 HU). An image with nothing below -200 HU or nothing above 0 HU is not in Hounsfield units: normalised
# [0, 1] data, 8-bit exports, MR, or raw stored values without the rescale intercept.
AIR_CEILING_HU = -200.0
TISSUE_FLOOR_HU = 0.0


class InputError(ValueError):
    """One input that cannot be segmented; the message names the file, what was expected and what came."""


@dataclass
class Summary:
    """What a run did; ``main`` prints it and ``--summary-json`` writes it."""

    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # input (or command-line source) -> reason
    voxels: int = 0
    seconds: float = 0.0
    peak_gpu_memory_bytes: int | None = None
    device: str = "cpu"
    amp: str = "off"

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------------ input checks


def check_header(path: str, num_channels: int) -> nib.spatialimages.SpatialImage:
    """Read ``path``'s header (no voxel data) and check it holds a 3D volume with ``num_channels`` channels."""
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises ImageFileError, OSError, EOFError, ValueError... for bad files
        raise InputError(f"{path}: not a readable NIfTI image ({type(error).__name__}: {error}).") from None
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InputError(f"{path}: expected a 3D CT volume, got a 2D image of shape {shape}.")
    channels = int(np.prod(shape[3:], dtype=np.int64))
    if channels != num_channels:
        raise InputError(
            f"{path}: expected {num_channels} channel(s) (3D volume of shape (X, Y, Z)), got shape "
            f"{shape} with {channels} channels."
        )
    return image


def check_hounsfield(path: str, low: float, high: float) -> None:
    """Check that an image's lowest and highest values can be Hounsfield units of a CT (see ``AIR_CEILING_HU``)."""
    if low > AIR_CEILING_HU or high < TISSUE_FLOOR_HU:
        raise InputError(
            f"{path}: intensities in [{low:g}, {high:g}] are not CT Hounsfield units (expected air "
            f"below {AIR_CEILING_HU:g} HU and soft tissue above {TISSUE_FLOOR_HU:g} HU); normalised, "
            f"8-bit, MR or unscaled data? Pass --no-hu-check to segment it anyway."
        )


def check_dicom_series(folder: str) -> None:
    """Check that ``folder`` holds one readable, evenly spaced CT series before MONAI's ``PydicomReader`` reads it:
    that reader skips unreadable files with only a warning and takes the slice spacing as an average, so a
    missing or broken slice would give a volume of the wrong size or geometry without a word."""
    import pydicom

    slices = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and is_dicom_file(p)):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            position = np.asarray(header.ImagePositionPatient, dtype=float)
            rows, columns = np.asarray(header.ImageOrientationPatient, dtype=float).reshape(2, 3)
            slices.append(
                (
                    int(header.InstanceNumber),
                    float(position @ np.cross(rows, columns)),
                    str(header.SeriesInstanceUID),
                    (int(header.Rows), int(header.Columns)),
                )
            )
        except Exception as error:  # pydicom raises InvalidDicomError, EOFError, AttributeError... for a bad file
            raise InputError(
                f"{path}: not a readable CT slice with position and orientation ({type(error).__name__}: {error})."
            ) from None
    series, sizes = {s[2] for s in slices}, {s[3] for s in slices}
    if len(series) != 1 or len(sizes) != 1:
        raise InputError(
            f"{folder}: expected one DICOM series of equal-sized slices, got {len(series)} series and "
            f"slice sizes {sorted(sizes)}; give each series its own folder."
        )
    if len(slices) < 2:
        raise InputError(f"{folder}: expected a 3D DICOM series, got {len(slices)} slice.")
    steps = np.diff([position for _, position, _, _ in sorted(slices)])  # in the reader's order, InstanceNumber
    if not (np.all(steps > 0) or np.all(steps < 0)) or np.ptp(np.abs(steps)) > 0.01 * np.abs(steps).max():
        raise InputError(
            f"{folder}: the slices, in InstanceNumber order, are not evenly spaced (steps from "
            f"{np.abs(steps).min():g} to {np.abs(steps).max():g} mm); a slice is missing or the "
            "series is not one stack."
        )


class CheckedInputs(torch.utils.data.Dataset):
    """The config's preprocessing of each input, run in ``DataLoader`` workers, with the checks before it.

    An item is ``{"path", "data"}`` (``data``: the preprocessed dict) or ``{"path", "error"}``: a bad file must
    not end the worker, so every failure becomes a message for the main process to report.
    """

    def __init__(
        self,
        paths: list[str],
        loader: LoadImaged,
        transforms: Compose,
        image_key: str,
        num_channels: int,
        hu_check: bool,
    ) -> None:
        self.paths, self.loader, self.transforms = paths, loader, transforms
        self.image_key, self.num_channels, self.hu_check = image_key, num_channels, hu_check
        self.dicom_loader = LoadImaged(image_key, reader="PydicomReader", image_only=True)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, path: str) -> tuple[dict, np.ndarray, nib.Nifti1Header, tuple[int, ...]]:
        """``(loaded dict, affine, header, shape)``; the affine and header are those the mask is written with."""
        if os.path.isdir(path):  # a DICOM series: its patient space as MONAI reads it (RAS, like NIfTI)
            check_dicom_series(path)
            data = self.dicom_loader({self.image_key: path})
            image = data[self.image_key]
            if image.ndim != 3:
                raise InputError(f"{path}: expected one 3D DICOM series, got an image of shape {tuple(image.shape)}.")
            affine = image.affine.numpy()
            header = nib.Nifti1Header()
            header.set_sform(affine, code=1)  # scanner coordinates, as the DICOM series' own
            header.set_qform(affine, code=1)
            return data, affine, header, tuple(image.shape)
        image = check_header(path, self.num_channels)
        return self.loader({self.image_key: path}), image.affine, image.header, tuple(image.shape[:3])

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            data, affine, header, shape = self.load(path)
            # NaN, infinite or constant: no image to segment, whatever the intensities mean (--no-hu-check too)
            low, high = check_finite_and_varied(path, np.asarray(data[self.image_key]))
            if self.hu_check:
                check_hounsfield(path, low, high)
            data = self.transforms(data)
            return {"path": path, "data": data, "affine": affine, "header": header, "shape": shape}
        except (InputError, DatasetError) as error:
            return {"path": path, "error": str(error)}
        except Exception as error:  # a corrupt gzip stream or a transform failing on odd data
            return {"path": path, "error": f"{path}: cannot load or preprocess ({type(error).__name__}: {error})."}


def _as_is(item: dict) -> dict:
    """The ``DataLoader``'s collate: items stay unbatched, ``segment`` collates them as the config's loader would."""
    return item


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_series(folder: Path) -> list[str]:
    """``[folder]`` when it holds DICOM files (one series), else its subfolders that do, sorted."""
    if any(is_dicom_file(p) for p in folder.iterdir() if p.is_file()):
        return [str(folder.resolve())]
    return [
        str(sub.resolve())
        for sub in sorted(folder.iterdir())
        if sub.is_dir() and any(is_dicom_file(p) for p in sub.iterdir() if p.is_file())
    ]


def collect_inputs(sources: list[str], summary: Summary) -> list[str]:
    """Every NIfTI and DICOM series named by ``sources`` (files, folders, folders of DICOM series, datalists, MSD
    ``dataset.json``), in order, once. A DICOM series is given by its folder."""
    from scripts.data import NIFTI_SUFFIXES, inference_datalist

    paths: list[str] = []
    for source in sources:
        folder = Path(source)
        series = dicom_series(folder) if folder.is_dir() else []
        paths += series
        if series and not any(p.name.endswith(NIFTI_SUFFIXES) for p in folder.iterdir()):
            continue
        try:
            paths += [item["image"] for item in inference_datalist(source)]
        except DatasetError as error:
            summary.failed[source] = str(error)
    return list(dict.fromkeys(paths))


# ------------------------------------------------------------------------------------------------ the bundle


@dataclass
class Bundle:
    """The parts of ``inference.json`` the script runs; built once per process."""

    network: torch.nn.Module
    loader: LoadImaged
    transforms: Compose  # the preprocessing after loading
    inferer: object
    postprocessing: Compose  # without the config's SaveImaged
    image_key: str
    num_channels: int
    organ_names: dict[str, str]
    output_postfix: str
    output_ext: str
    ckpt_path: str


def _base_files(config_files: list[str], settings: dict) -> list[str]:
    """The config files the user gave, without the current preset's, as a fix for a misfit should list them."""
    given = ["configs/inference.json" if Path(f).resolve() == DEFAULT_CONFIG else f for f in config_files]
    return [f for f in given if Path(f).name != f"{settings.get('preset')}.json"]


def load_bundle(
    config_files: list[str], meta_file: str, device: torch.device, model: str | None, inferer_overrides: dict
) -> Bundle:
    """Parse the config with ``ConfigParser``, load the network's weights once and split out what we replace.

    Raises:
        ValueError: for a config without the ids above, a preprocessing that does not start with
            ``LoadImaged``, or a checkpoint that does not fit the network.
    """
    parser = ConfigParser()
    parser.read_config(config_files)
    parser.read_meta(meta_file)
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["device"] = f"$torch.device('{device}')"
    for key, value in inferer_overrides.items():
        parser[f"inferer#{key}"] = value
    missing = [k for k in ("network_def", "preprocessing", "inferer", "postprocessing") if k not in parser]
    if missing:
        raise ValueError(
            f"config {config_files} lacks the ids {missing}; expected an inference.json like the bundle's."
        )
    preprocessing = parser.get_parsed_content("preprocessing")
    steps = list(preprocessing.transforms) if isinstance(preprocessing, Compose) else []
    if not steps or not isinstance(steps[0], LoadImaged):
        raise ValueError(
            "the config's preprocessing must be a Compose starting with LoadImaged (so each image can "
            f"be checked after loading), got {type(preprocessing).__name__}."
        )
    # "@preprocessing" in the inverse (InvertArgmaxd, or Invertd in the reference config): the same instance
    postprocessing = parser.get_parsed_content("postprocessing")
    kept = [t for t in postprocessing.transforms if not isinstance(t, SaveImaged)]

    network = parser.get_parsed_content("network_def").to(device).eval()
    ckpt_path = model or parser.get_parsed_content("ckpt_path", default=None)
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise ValueError(f"checkpoint {ckpt_path} does not exist; train the bundle or pass --model <model.pt>.")
    try:
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
    except Exception as error:  # an unpickling error is no ValueError; say which file it was
        raise ValueError(f"checkpoint {ckpt_path} is not a readable PyTorch checkpoint: {error}") from None
    expected = parser.get_parsed_content("network_settings", default=None)
    if expected is not None:  # before any image is read: a model of another preset would misread every image
        check_settings_fit(
            ckpt_path, recorded_settings(state), expected, _base_files(config_files, expected), "--config"
        )
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # CheckpointSaver's multi-object layout
        state = state["model"]
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {ckpt_path} does not fit the config's network_def: {error}") from None

    meta = parser.get("_meta_", {}).get("network_data_format", {})
    organ_names = meta.get("outputs", {}).get("pred", {}).get("channel_def", {})
    if len(organ_names) > 256:
        raise ValueError(f"{meta_file} names {len(organ_names)} output channels; uint8 masks hold at most 256 labels.")
    return Bundle(
        network=network,
        loader=steps[0],
        transforms=Compose(steps[1:]),
        inferer=parser.get_parsed_content("inferer"),
        postprocessing=Compose(kept),
        image_key=parser.get_parsed_content("image_key", default="image"),
        num_channels=int(meta.get("inputs", {}).get("image", {}).get("num_channels", 1)),
        organ_names={str(k): v for k, v in organ_names.items()},
        output_postfix=parser.get_parsed_content("output_postfix", default="seg"),
        output_ext=parser.get_parsed_content("output_ext", default=".nii.gz"),
        ckpt_path=str(Path(ckpt_path).resolve()),
    )


# ------------------------------------------------------------------------------------------------ outputs


def split_ext(name: str) -> tuple[str, str]:
    """``"ct.001.nii.gz"`` -> ``("ct.001", ".nii.gz")``; the two-part NIfTI suffix counts as one."""
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return os.path.splitext(name)


def output_name(input_path: str, postfix: str, ext: str) -> str:
    """``ct.nii.gz`` -> ``ct_seg.nii.gz``: ``SaveImaged``'s name with ``separate_folder=False``."""
    stem = split_ext(Path(input_path).name)[0]
    return f"{stem}_{postfix}{ext}" if postfix else f"{stem}{ext}"


def _new_temporary(target: Path) -> str:
    """An empty file beside ``target`` whose permissions the umask alone decides (0644 under umask 022), as for a
    file written directly: ``tempfile.mkstemp`` creates 0600, which the rename would carry over to the mask."""
    tmp = str(target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{split_ext(target.name)[1]}"))
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def _replace_atomically(target: Path, write) -> None:
    """``write(tmp)`` then rename onto ``target``: a crash never leaves half a file or loses the old one."""
    tmp = _new_temporary(target)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def copy_forms(header: nib.Nifti1Header, image: nib.Nifti1Image) -> None:
    """Give ``image`` the qform and the sform of ``header``, each with its own code. One affine set as both (what
    MONAI's ``NibabelWriter`` does) replaces a qform that differs from the sform, e.g. the scanner's qform (code 1)
    beside an oblique sform from a registration (code 2)."""
    image.set_qform(header.get_qform(), code=int(header["qform_code"]))
    image.set_sform(header.get_sform(), code=int(header["sform_code"]))


def write_mask(mask: np.ndarray, item: dict, target: Path, organ_names: dict[str, str], source: dict) -> int:
    """Write ``mask`` (``uint8``, the input's grid) with the input's qform and sform and their codes,
    and ``<name>.json`` beside it with the organ name of every label value. Returns the number of voxels."""
    image = nib.Nifti1Image(mask, item["affine"])
    if isinstance(item["header"], nib.Nifti1Header):
        copy_forms(item["header"], image)
    image.set_data_dtype(np.uint8)
    _replace_atomically(target, lambda tmp: nib.save(image, tmp))
    sidecar = {"labels": organ_names, **source}
    json_path = target.with_name(split_ext(target.name)[0] + ".json")
    _replace_atomically(json_path, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    return mask.size


class InputFormsWriter(NibabelWriter):
    """``SaveImaged``'s NIfTI writer for ``configs/inference.json``: a mask on its input's voxel grid gets the
    input's qform and sform with their codes (read again from the input's header, :func:`copy_forms`), where
    MONAI's writer sets the one affine as both with code 1. Other masks are written as MONAI writes them."""

    def set_metadata(self, meta_dict: dict | None, resample: bool = True, **options) -> None:
        super().set_metadata(meta_dict, resample=resample, **options)
        self.source = (meta_dict or {}).get("filename_or_obj")

    def input_header(self) -> nib.Nifti1Header | None:
        """The input's header when the mask lies on the input's voxel grid, else None."""
        try:
            header = nib.load(str(self.source)).header
        except Exception:  # noqa: BLE001 - no readable NIfTI input (an array, a DICOM folder): MONAI's way
            return None
        if not isinstance(header, nib.Nifti1Header):
            return None
        return header if tuple(self.data_obj.shape[:3]) == tuple(header.get_data_shape()[:3]) else None

    def write(self, filename, verbose: bool = False, **obj_kwargs) -> None:
        header = self.input_header()
        if header is None:
            super().write(filename, verbose=verbose, **obj_kwargs)
            return
        ImageWriter.write(self, filename, verbose=verbose)  # its "writing: <file>" log line
        image = self.create_backend_obj(
            self.data_obj, affine=header.get_best_affine(), dtype=self.output_dtype, **obj_kwargs
        )
        copy_forms(header, image)
        nib.save(image, filename)


def write_volumes_csv(path: Path, rows: list[dict], organ_names: dict[str, str]) -> None:
    """One row per written mask: the input, the mask, the voxel volume and every organ's volume in mL."""
    labels = sorted(int(k) for k in organ_names if int(k) > 0)
    columns = ["image", "mask", "voxel_volume_ml"] + [f"{organ_names[str(k)]} (mL)" for k in labels]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(columns)
            for row in rows:
                counts = row["counts"]
                volumes = [counts[k] * row["voxel_ml"] if k < len(counts) else 0.0 for k in labels]
                writer.writerow([row["image"], row["mask"], f"{row['voxel_ml']:.6g}", *(f"{v:.3f}" for v in volumes)])

    _replace_atomically(path, write)


# ------------------------------------------------------------------------------------------------ running

#: the share of the device's available memory the stitched network-grid output may take; the rest is for the
#: network's activations, the windows and the postprocessing
STITCHING_SHARE = 0.8


def stitching_bytes(spatial_shape: tuple[int, ...], num_classes: int) -> int:
    """Device memory to stitch one volume's windows there: ``SlidingWindowInferer``'s float32 output and count map
    on the network grid, and the softmax's copy of the output."""
    return (2 * num_classes + 1) * math.prod(spatial_shape) * 4


def available_device_memory(device: torch.device) -> int:
    """Free device memory plus what PyTorch's cache holds unused (it hands that out before asking the driver)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def choose_stitching(
    inferer,
    device: torch.device,
    spatial_shape: tuple[int, ...],
    num_classes: int,
    path: str,
    available: int | None = None,
) -> str | None:
    """On CUDA, point ``inferer`` (a ``SlidingWindowInferer``) at where this volume's windows are stitched: on the
    device when the network-grid output fits in ``STITCHING_SHARE`` of its available memory, else in host memory
    (windows still run on the device: ``sw_device``). Returns the log line saying which; None on CPU."""
    if device.type != "cuda" or not hasattr(inferer, "sw_device"):
        return None
    available = available_device_memory(device) if available is None else available
    needed = stitching_bytes(spatial_shape, num_classes)
    fits = needed <= STITCHING_SHARE * available
    inferer.sw_device, inferer.device = device, device if fits else torch.device("cpu")
    where = f"on {device}" if fits else "in host memory"
    relation = "<=" if fits else ">"
    return (
        f"{path}: sliding windows on {device}, stitched {where} (network-grid output {needed / 2**30:.2f} GiB "
        f"{relation} {STITCHING_SHARE:.0%} of {available / 2**30:.2f} GiB available)"
    )


def segment(bundle: Bundle, item: dict, device: torch.device, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The config's inferer and postprocessing on one preprocessed item, as ``SupervisedEvaluator`` runs them:
    collate, infer, attach ``pred``, decollate, postprocess. Returns the label volume ``XYZ`` on ``device``."""
    batch = list_data_collate([item["data"]])
    image = batch[bundle.image_key].to(device)
    stitching = choose_stitching(
        bundle.inferer, device, tuple(image.shape[2:]), len(bundle.organ_names) or 1, item["path"]
    )
    if stitching:
        print(f"scripts.infer: {stitching}", file=sys.stderr)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        pred = bundle.inferer(image, bundle.network)
    batch[bundle.image_key], batch["pred"] = image, pred.float()  # the inverse resamples float32, as without AMP
    result = bundle.postprocessing(decollate_batch(batch)[0])
    label = result["pred"]
    if tuple(label.shape[1:]) != item["shape"]:
        raise InputError(
            f"{item['path']}: the postprocessing gave a mask of shape {tuple(label.shape)}, expected "
            f"the input's {item['shape']}; does the config's postprocessing (InvertArgmaxd or Invertd) "
            "undo the preprocessing?"
        )
    return label[0].as_tensor() if hasattr(label, "as_tensor") else label[0]


def _failure(path: str, error: Exception) -> str:
    """The report line of a volume that failed on the device; frees the CUDA cache after an out-of-memory."""
    if isinstance(error, InputError):
        return str(error)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()  # the next, maybe smaller, volume starts from a clean cache
        return f"{path}: out of GPU memory ({error}); try a smaller --sw-batch-size or --roi-size, or --amp bf16."
    return f"{path}: {type(error).__name__}: {error}"


def run_inference(
    sources: list[str],
    output: Path,
    bundle: Bundle,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    num_workers: int = 0,
    overwrite: bool = False,
    hu_check: bool = True,
    volumes_rows: list | None = None,
    progress: bool = True,
    source_info: dict | None = None,
) -> Summary:
    """Segment every input of ``sources`` into ``output``; a bad input is recorded in the summary, not raised.

    Args:
        sources: files, folders and datalists (see ``collect_inputs``).
        output: the folder of masks (created when missing).
        bundle: from ``load_bundle``.
        device: where the network runs.
        amp_dtype: autocast dtype, or None for float32 (default).
        num_workers: ``DataLoader`` workers that load and preprocess the next volumes (default 0).
        overwrite: replace existing masks (default False: an existing mask fails its input).
        hu_check: reject intensities that cannot be Hounsfield units (default True).
        volumes_rows: when a list, one ``{image, mask, voxel_ml, counts}`` per written mask is appended.
        progress: show a tqdm bar over volumes (default True).
        source_info: extra fields for each sidecar JSON (config, checkpoint).
    """
    from tqdm import tqdm

    summary = Summary(device=str(device), amp={None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp_dtype])
    output.mkdir(parents=True, exist_ok=True)
    todo, targets = [], {}
    for path in collect_inputs(sources, summary):
        target = output / output_name(path, bundle.output_postfix, bundle.output_ext)
        if target in targets.values():
            summary.failed[path] = f"{path}: its mask {target} would replace that of another input of this run."
        elif target.exists() and not overwrite:
            summary.failed[path] = f"{path}: {target} exists; pass --overwrite to replace it."
        else:
            todo.append(path)
            targets[path] = target

    dataset = CheckedInputs(todo, bundle.loader, bundle.transforms, bundle.image_key, bundle.num_channels, hu_check)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_is,
        prefetch_factor=2 if num_workers else None,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    pending: deque[tuple[str, Future]] = deque()

    def collect_oldest() -> None:
        path, future = pending.popleft()
        try:
            summary.voxels += future.result()
            summary.written.append(str(targets[path]))
        except Exception as error:  # noqa: BLE001 - a full disk fails this file, not the run
            summary.failed[path] = f"{path}: cannot write {targets[path]} ({type(error).__name__}: {error})."

    with torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as writer:
        for item in tqdm(loader, total=len(dataset), unit="volume", disable=not progress, file=sys.stderr):
            path = item["path"]
            if "error" in item:
                summary.failed[path] = item["error"]
                continue
            try:
                label = segment(bundle, item, device, amp_dtype).to(torch.uint8)
                counts = (
                    None
                    if volumes_rows is None
                    else torch.bincount(label.flatten(), minlength=len(bundle.organ_names)).cpu().tolist()
                )
                mask = label.cpu().numpy()
            except Exception as error:  # noqa: BLE001 - one volume's failure (e.g. out of memory) must not end the run
                summary.failed[path] = _failure(path, error)
                continue
            info = {"image": path, **(source_info or {})}
            # gzip of the previous mask runs while the device segments the next one; at most two masks wait in memory
            if len(pending) == 2:
                collect_oldest()
            pending.append((path, writer.submit(write_mask, mask, item, targets[path], bundle.organ_names, info)))
            if volumes_rows is not None:
                voxel_ml = abs(float(np.linalg.det(np.asarray(item["affine"])[:3, :3]))) / 1000.0
                volumes_rows.append({"image": path, "mask": str(targets[path]), "voxel_ml": voxel_ml, "counts": counts})
        while pending:
            collect_oldest()
    summary.seconds = time.perf_counter() - start
    if volumes_rows is not None:
        written = set(summary.written)
        volumes_rows[:] = [row for row in volumes_rows if row["mask"] in written]
    if device.type == "cuda":
        summary.peak_gpu_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    return summary


# ------------------------------------------------------------------------------------------------ command line


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    print("scripts.infer: CUDA is not available, running on the CPU (slow; pass --device to choose).", file=sys.stderr)
    return torch.device("cpu")


def default_amp(device: torch.device) -> str:
    """bf16 on GPUs that support it (same exponent range as float32: no overflow), fp16 on older GPUs, off on CPU."""
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def format_summary(summary: Summary) -> str:
    lines = [
        "inference summary:",
        f"  volumes: {len(summary.written)} written, {len(summary.failed)} failed",
        f"  total voxels: {summary.voxels}",
        f"  seconds: {summary.seconds:.2f}",
        f"  voxels/s: {summary.voxels_per_second:.4g}",
        f"  device: {summary.device}, amp: {summary.amp}",
    ]
    if summary.peak_gpu_memory_bytes is not None:
        lines.append(f"  peak GPU memory: {summary.peak_gpu_memory_bytes / 2**30:.2f} GiB")
    lines += [f"  FAILED {reason}" for reason in summary.failed.values()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.infer",
        description=__doc__.split("\n\n")[0],
        epilog="exit status: 0 all written, 1 some input failed or was skipped, 2 usage or configuration error",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="NIfTI files, folders of them, DICOM series folders, folders of those, datalist JSON "
        "files or MSD dataset.json files",
    )
    parser.add_argument("--output", required=True, type=Path, help="folder of the masks (created when missing)")
    parser.add_argument(
        "--config",
        nargs="+",
        default=[str(DEFAULT_CONFIG)],
        help="inference config file(s); later files override earlier ones, as in monai.bundle run "
        "(default: configs/inference.json)",
    )
    parser.add_argument(
        "--meta",
        default=str(DEFAULT_META),
        help="metadata.json with the organ names (channel_def) (default: configs/metadata.json)",
    )
    parser.add_argument("--model", default=None, help="checkpoint (default: the config's ckpt_path, models/model.pt)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--amp",
        choices=sorted(AMP_DTYPES),
        default=None,
        help="autocast dtype (default: bf16 on GPUs supporting it, fp16 on other GPUs, off on CPU)",
    )
    parser.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward (default: the config's)")
    parser.add_argument(
        "--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default: the config's)"
    )
    parser.add_argument(
        "--roi-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="sliding-window size in voxels (default: the config's)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(4, max((os.cpu_count() or 1) - 1, 0)),
        help="DataLoader workers loading the next volumes while one is segmented (default: min(4, CPU cores - 1))",
    )
    parser.add_argument("--volumes-csv", type=Path, default=None, help="write per-organ volumes in mL to this CSV")
    parser.add_argument("--summary-json", type=Path, default=None, help="write the run summary to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace existing masks and CSV")
    parser.add_argument(
        "--no-hu-check",
        dest="hu_check",
        action="store_false",
        help="segment images whose intensities do not look like Hounsfield units",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device) if args.device else default_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu.")
        amp = args.amp or default_amp(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every window has the same shape: pick the fastest conv once
        if args.sw_batch_size is not None and args.sw_batch_size < 1:
            raise ValueError(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}.")
        if args.overlap is not None and not 0 <= args.overlap < 1:
            raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}.")
        if args.roi_size is not None and min(args.roi_size) < 1:
            raise ValueError(f"--roi-size must be positive, got {args.roi_size}.")
        if args.volumes_csv is not None and args.volumes_csv.exists() and not args.overwrite:
            raise ValueError(f"--volumes-csv {args.volumes_csv} exists; pass --overwrite to replace it.")
        overrides = {"sw_batch_size": args.sw_batch_size, "overlap": args.overlap, "roi_size": args.roi_size}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        bundle = load_bundle(args.config, args.meta, device, args.model, overrides)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"scripts.infer: error: {error}", file=sys.stderr)
        return 2

    rows: list | None = [] if args.volumes_csv is not None else None
    source_info = {"config": [str(Path(c).resolve()) for c in args.config], "model": bundle.ckpt_path}
    summary = run_inference(
        args.inputs,
        args.output,
        bundle,
        device,
        AMP_DTYPES[amp],
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        hu_check=args.hu_check,
        volumes_rows=rows,
        progress=args.progress,
        source_info=source_info,
    )
    if rows is not None:
        args.volumes_csv.parent.mkdir(parents=True, exist_ok=True)
        write_volumes_csv(args.volumes_csv, rows, bundle.organ_names)
    if args.summary_json is not None:
        record = {**asdict(summary), "voxels_per_second": summary.voxels_per_second}
        args.summary_json.write_text(json.dumps(record, indent=2) + "\n")
    print(format_summary(summary))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
