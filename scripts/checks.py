"""The dataset checks that run before training and evaluation (``scripts.data.prepare_dataset``), one case at a time.

A case is refused, with one message naming the file, when

- its image and label do not share one voxel grid: same shape, and affines equal within
  :data:`GEOMETRY_TOLERANCE` (a flipped axis or another slice spacing leaves ``Orientationd``/``Spacingd``
  moving the label off the organ);
- its image holds NaN or infinite values, a single value, or nothing above :data:`FOREGROUND_HU` (the foreground
  crop of ``configs/train.json`` would be empty and the case would drop out, or crash validation);
- its label holds values other than the integer labels 0..num_classes-1.

A label holding only background is a warning, listed once per run. The checks read every voxel, so a verdict is
kept in ``<dataset_dir>/.bundle_checks.json``, keyed by each file's path, size and modification time: a second
run reads only the files that changed.

The inputs of ``configs/inference.json`` (:class:`InferenceInputs`) get the image checks, uncached; a bad one is
reported on its own line and left out, and the run ends with an error naming it after the others were segmented.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.data import NUM_CLASSES, DatasetError, _load
from scripts.errors import BundleError

# how far a label's affine may be from its image's: spacing and origin in mm, direction cosines unitless
GEOMETRY_TOLERANCE = {"spacing": 1e-3, "origin": 1e-2, "direction": 1e-4}
# the a_min of ScaleIntensityRanged in configs/train.json: CropForegroundd keeps what lies above it
FOREGROUND_HU = -175.0
# part of every cached verdict: a change of the checks (or their thresholds) invalidates the cache
CHECKS_VERSION = f"2:{sorted(GEOMETRY_TOLERANCE.items())}:{FOREGROUND_HU}"
CACHE_NAME = ".bundle_checks.json"

logger = logging.getLogger(__name__)


def _grid(image: nib.Nifti1Image) -> dict:
    linear, origin = image.affine[:3, :3], image.affine[:3, 3]
    spacing = np.linalg.norm(linear, axis=0)
    return {
        "shape": tuple(int(n) for n in image.shape[:3]),
        "spacing": spacing,
        "origin": origin,
        "direction": linear / np.where(spacing > 0, spacing, 1),
        "axes": "".join(nib.aff2axcodes(image.affine)),
    }


def _describe(what: str, path: str, grid: dict) -> str:
    numbers = lambda values: "(" + ", ".join(f"{v:.4f}" for v in values) + ")"  # noqa: E731
    return (
        f"{what} {path}: shape {grid['shape']}, spacing {numbers(grid['spacing'])} mm, "
        f"origin {numbers(grid['origin'])} mm, axes {grid['axes']}"
    )


def _grid_difference(image: dict, label: dict) -> str | None:
    """What differs between two grids beyond :data:`GEOMETRY_TOLERANCE`, or None."""
    direction = float(np.abs(image["direction"] - label["direction"]).max())
    if direction > GEOMETRY_TOLERANCE["direction"]:
        return (
            f"axis directions differ (label {label['axes']}, image {image['axes']}; "
            f"largest direction-cosine difference {direction:.3g}, tolerance {GEOMETRY_TOLERANCE['direction']})"
        )
    spacing = float(np.abs(image["spacing"] - label["spacing"]).max())
    if spacing > GEOMETRY_TOLERANCE["spacing"]:
        return f"voxel spacing differs by {spacing:.4g} mm (tolerance {GEOMETRY_TOLERANCE['spacing']} mm)"
    origin = float(np.abs(image["origin"] - label["origin"]).max())
    if origin > GEOMETRY_TOLERANCE["origin"]:
        return f"origin differs by {origin:.4g} mm (tolerance {GEOMETRY_TOLERANCE['origin']} mm)"
    return None


def check_geometry(item: dict, image: nib.Nifti1Image, label: nib.Nifti1Image) -> None:
    """Refuse a label whose voxel grid is not its image's (shape, direction, spacing, origin)."""
    image_grid, label_grid = _grid(image), _grid(label)
    if image_grid["shape"] != label_grid["shape"]:
        raise DatasetError(
            f"image {item['image']} has shape {image_grid['shape']} but its label {item['label']} has "
            f"shape {label_grid['shape']}; they must be equal."
        )
    difference = _grid_difference(image_grid, label_grid)
    if difference:
        raise DatasetError(
            f"{_describe('image', item['image'], image_grid)}\n"
            f"{_describe('label', item['label'], label_grid)}\n"
            f"label {item['label']} is not on its image's voxel grid: {difference}; "
            f"resample the label onto the image (or fix its header)."
        )


def check_finite_and_varied(path: str, data: np.ndarray) -> tuple[float, float]:
    """Refuse an image holding NaN or infinite values or a single value; returns its lowest and highest value.

    These hold whatever the intensities mean (``scripts.infer --no-hu-check`` too): such an image has nothing
    for a network to segment, and a mask of it would be all background without a word."""
    low, high = float(data.min()), float(data.max())  # a NaN anywhere makes both NaN: no full-size mask to build
    if not (math.isfinite(low) and math.isfinite(high)):
        count = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise DatasetError(
            f"image {path} holds {count} NaN or infinite voxel(s) of {data.size}; a CT image must be finite everywhere."
        )
    if low == high:
        raise DatasetError(
            f"image {path} is constant (every voxel is {low:g}, fewer than 2 distinct values); it holds no image."
        )
    return low, high


def check_intensities(path: str, data: np.ndarray) -> None:
    """Refuse an image that is not finite, holds one value, or has no voxel above :data:`FOREGROUND_HU`."""
    low, high = check_finite_and_varied(path, data)
    if high <= FOREGROUND_HU:
        raise DatasetError(
            f"image {path} has no voxel above {FOREGROUND_HU:g} HU (its values lie in "
            f"[{low:g}, {high:g}]), so the foreground crop would be empty; expected CT in Hounsfield units."
        )


def check_labels(path: str, values: np.ndarray, num_classes: int) -> None:
    bad = values[(values < 0) | (values > num_classes - 1) | (values != np.round(values))]
    if bad.size:
        raise DatasetError(
            f"label {path} has values {bad[:10].tolist()} outside the integer labels 0..{num_classes - 1} "
            f"(background + {num_classes - 1} organs; num_classes={num_classes} in the config)."
        )


def check_case(item: dict, num_classes: int = NUM_CLASSES) -> dict:
    """Check one ``{"image", "label"}`` entry; the verdict says whether its label holds only background.

    Raises:
        DatasetError: naming the file and what is wrong with it.
    """
    image = _load(item["image"], "image")
    if "label" not in item:
        check_intensities(item["image"], np.asanyarray(image.dataobj))
        return {"background_only": False}
    label = _load(item["label"], "label")
    check_geometry(item, image, label)
    check_intensities(item["image"], np.asanyarray(image.dataobj))
    values = np.unique(np.asanyarray(label.dataobj))
    check_labels(item["label"], values, num_classes)
    return {"background_only": bool(np.all(values == 0))}


class VerdictCache:
    """Verdicts of passing cases in ``<dataset_dir>/.bundle_checks.json``, keyed by the files' path, size and
    modification time (and the checks' version); a folder that cannot be written just goes uncached."""

    def __init__(self, dataset_dir: str | os.PathLike, num_classes: int) -> None:
        self.path = Path(dataset_dir) / CACHE_NAME
        self.version = f"{CHECKS_VERSION}:{num_classes}"
        try:
            content = json.loads(self.path.read_text())
        except (OSError, ValueError):
            content = {}
        self.verdicts = content.get("verdicts", {}) if content.get("version") == self.version else {}
        self.changed = False

    @staticmethod
    def key(item: dict) -> str:
        stats = []
        for name in sorted(item):
            stat = os.stat(item[name])
            stats.append(f"{item[name]}:{stat.st_size}:{stat.st_mtime_ns}")
        return "|".join(stats)

    def get(self, item: dict) -> dict | None:
        try:
            return self.verdicts.get(self.key(item))
        except OSError:  # a missing file: check_case names it
            return None

    def put(self, item: dict, verdict: dict) -> None:
        self.verdicts[self.key(item)] = verdict
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_text(json.dumps({"version": self.version, "verdicts": self.verdicts}))
            os.replace(temporary, self.path)
        except OSError:  # a read-only dataset is checked again next time
            temporary.unlink(missing_ok=True)


def check_dataset(
    dataset_dir: str | os.PathLike, sections: dict[str, list[dict]], num_classes: int = NUM_CLASSES
) -> dict:
    """Check every case of ``sections`` (``{"training": [...], "validation": [...]}``), reusing cached verdicts.

    Labels holding only background are logged once per section as a warning. Returns the cases (image paths)
    with such labels per section.

    Raises:
        DatasetError: for the first case that fails, naming its file.
    """
    cache = VerdictCache(dataset_dir, num_classes)
    background_only: dict[str, list[str]] = {}
    try:
        for section, items in sections.items():
            for item in items:
                verdict = cache.get(item)
                if verdict is None:
                    verdict = check_case(item, num_classes)
                    cache.put(item, verdict)
                if verdict["background_only"]:
                    background_only.setdefault(section, []).append(item["label"])
    finally:
        cache.save()  # what passed stays passed, even when a later case fails
    for section, labels in background_only.items():
        consequence = (
            "its cases add no organ to learn from"
            if section == "training"
            else "they are left out of the validation Dice"
        )
        logger.warning(
            f"{len(labels)} {section} label(s) hold only background (no organ), {consequence}: "
            + ", ".join(labels[:5])
            + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
        )
    return background_only


class InferenceInputs:
    """The inputs of ``configs/inference.json``, each checked before the first mask is written.

    A bad input (unreadable, not 3D, NaN or infinite voxels, constant, nothing above :data:`FOREGROUND_HU`) is
    logged on one line naming the file and left out, so that the others are still segmented, as ``scripts.infer``
    does; :meth:`report`, the config's last ``run`` step, then ends the run with an error naming them, so that a
    script calling the bundle sees a non-zero exit code. The check reads every voxel of an input once more; inputs
    are not cached, because the verdict cache would be written into the user's folder of CTs.
    """

    def __init__(self, datalist: list[dict], key: str = "image") -> None:
        self.total = len(datalist)
        self.good: list[dict] = []
        self.failed: dict[str, str] = {}
        for item in datalist:
            try:
                check_case({"image": item[key]})
            except DatasetError as error:
                self.failed[item[key]] = " ".join(str(error).splitlines())  # a library's message may span lines
                logger.warning(f"not segmented: {self.failed[item[key]]}")
            else:
                self.good.append(item)
        if self.failed and not self.good:
            raise DatasetError(self.summary())

    def summary(self) -> str:
        """The last line of a run that left inputs out: which ones, and why when it is one."""
        if len(self.failed) == 1:
            why = next(iter(self.failed.values())).rstrip(".")
        else:
            shown = list(self.failed)[:5]
            more = f" and {len(self.failed) - 5} more" if len(self.failed) > 5 else ""
            why = f"{', '.join(shown)}{more} ({len(self.failed)} of {self.total} inputs; why: each on its line above)"
        done = f"the other {len(self.good)} were segmented" if self.good else "nothing was written"
        return f"not segmented: {why}; {done}."

    def report(self) -> bool:
        """Raise naming the inputs left out, after the others were segmented; True when there were none."""
        if self.failed:
            raise DatasetError(self.summary())
        return True


class CheckpointError(BundleError, ValueError):
    """A model file that cannot segment anything; the message names it."""


def check_finite_weights(network, path: str) -> bool:
    """Refuse loaded weights holding NaN or infinite values (saved by a run that diverged): every image would get a
    NaN network output, reported deep inside the postprocessing. True, for use in a config expression."""
    import torch

    state = network.state_dict()
    bad = [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds NaN or infinite weights ({len(bad)} of {len(state)} tensors, e.g. {bad[0]}); "
            "it cannot segment anything: train again or use another checkpoint."
        )
    return True


class FiniteWeights:
    """Ignite handler: :func:`check_finite_weights` when the engine starts, after the ``CheckpointLoader`` listed
    before it has loaded ``path`` into ``network``."""

    def __init__(self, network, path: str) -> None:
        self.network, self.path = network, path

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        check_finite_weights(self.network, self.path)
