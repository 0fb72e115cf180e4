"""Deterministic synthetic abdominal CT phantom with the 13 BTCV organ labels.

Each case is an elliptical body (skin, subcutaneous fat, abdominal wall muscle, spine, paraspinal muscles,
lung bases, a bowel/fat mixture) holding the 13 BTCV organs as deformed ellipsoids and tubes at positions,
sizes and Hounsfield values typical of a portal-venous abdominal CT. Cases differ in body size, organ
positions and sizes, a smooth shape deformation, noise level, voxel spacing and the orientation written into
the NIfTI affine, so that the bundle's ``Orientationd``/``Spacingd`` do real work.

Organs are defined in patient RAS+ millimetres (x towards the patient's right, y anterior, z superior, origin
near the kidney hila), so every label is placed by anatomy and not by array index. Small organs (adrenals,
gallbladder, esophagus, veins) are painted last and stay small: the class imbalance is the point.

Usage::

    python -m scripts.phantom --out data/phantom --num_cases 16
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

LABELS = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic veins",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}

# voxel axis flips written into the affine; (1, 1, 1) is RAS, (-1, -1, 1) is DICOM's LPS
ORIENTATIONS = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "LAS": (-1, 1, 1), "RPI": (1, -1, -1)}


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid with semi-axes ``radii`` (mm), rotated by ``yaw`` degrees about the z axis."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    yaw: float = 0.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = max(self.radii)
        return np.subtract(self.center, reach), np.add(self.center, reach)

    def mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        c, s = np.cos(np.radians(self.yaw)), np.sin(np.radians(self.yaw))
        dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
        u, v = c * dx + s * dy, -s * dx + c * dy
        return (u / self.radii[0]) ** 2 + (v / self.radii[1]) ** 2 + (dz / self.radii[2]) ** 2 <= 1.0


@dataclass(frozen=True)
class Tube:
    """A tube of radius ``radius`` (mm, linearly varying when a pair) around the polyline ``points``."""

    points: tuple[tuple[float, float, float], ...]
    radius: float | tuple[float, float]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = float(np.max(self.radius))
        return np.min(self.points, axis=0) - reach, np.max(self.points, axis=0) + reach

    def mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        r0, r1 = (self.radius, self.radius) if np.isscalar(self.radius) else self.radius
        inside = np.zeros(x.shape, dtype=bool)
        n = len(self.points) - 1
        for i, (a, b) in enumerate(zip(self.points[:-1], self.points[1:])):
            ab = np.subtract(b, a, dtype=float)
            t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
            t = np.clip(t, 0.0, 1.0)
            dist2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
            radius = r0 + (r1 - r0) * (i + t) / n
            inside |= dist2 <= radius**2
        return inside


# (label, mean HU) in painting order: large organs first, small ones last so that they are never overwritten
ORGAN_HU = [
    (6, 105.0),
    (1, 110.0),
    (2, 170.0),
    (3, 170.0),
    (7, 25.0),
    (11, 90.0),
    (4, 12.0),
    (12, 35.0),
    (13, 35.0),
    (8, 185.0),
    (9, 140.0),
    (10, 160.0),
    (5, 45.0),
]


def organ_shapes(rng: np.random.Generator) -> dict[int, Ellipsoid | Tube]:
    """The 13 organs of one case, jittered around a typical adult anatomy (RAS+ mm)."""

    def j(point, sd=5.0):
        return tuple(float(p + rng.normal(0.0, sd)) for p in point)

    def sz(radii, spread=0.12):
        return tuple(float(r * rng.uniform(1 - spread, 1 + spread)) for r in radii)

    confluence = j((8.0, -5.0, 12.0), 3.0)
    spleen_hilum = j((-72.0, -25.0, 30.0), 4.0)
    return {
        6: Ellipsoid(j((62.0, 5.0, 55.0)), sz((80.0, 85.0, 65.0)), rng.uniform(-15, 5)),
        1: Ellipsoid(j((-88.0, -40.0, 45.0)), sz((28.0, 50.0, 52.0)), rng.uniform(20, 40)),
        2: Ellipsoid(j((62.0, -48.0, -15.0)), sz((26.0, 22.0, 52.0)), rng.uniform(-30, -15)),
        3: Ellipsoid(j((-62.0, -48.0, -5.0)), sz((26.0, 22.0, 52.0)), rng.uniform(15, 30)),
        7: Ellipsoid(j((-45.0, 30.0, 55.0)), sz((48.0, 32.0, 45.0)), rng.uniform(-40, -20)),
        11: Tube(
            (j((22.0, 10.0, -5.0), 3), j((-20.0, 8.0, 10.0), 3), j((-62.0, -8.0, 28.0), 3)),
            (float(rng.uniform(13, 16)), float(rng.uniform(7, 9))),
        ),
        4: Ellipsoid(j((52.0, 45.0, 10.0), 4), sz((14.0, 14.0, 32.0), 0.2), rng.uniform(-20, 20)),
        12: Ellipsoid(j((32.0, -32.0, 42.0), 3), sz((5.0, 12.0, 16.0), 0.2), rng.uniform(-30, -10)),
        13: Ellipsoid(j((-34.0, -28.0, 34.0), 3), sz((5.0, 12.0, 17.0), 0.2), rng.uniform(10, 30)),
        8: Tube(
            (j((-12.0, -38.0, 140.0), 2), j((-14.0, -36.0, 0.0), 2), j((-10.0, -30.0, -140.0), 2)),
            (float(rng.uniform(11, 13)), float(rng.uniform(9, 10))),
        ),
        9: Tube(
            (j((24.0, -30.0, -140.0), 2), j((24.0, -28.0, 20.0), 2), j((30.0, -18.0, 75.0), 2)),
            float(rng.uniform(9, 11)),
        ),
        10: Tube((spleen_hilum, confluence, j((40.0, 12.0, 42.0), 3)), float(rng.uniform(5, 6.5))),
        5: Tube(
            (j((-2.0, -38.0, 150.0), 2), j((-12.0, -25.0, 100.0), 2), j((-30.0, 5.0, 78.0), 3)),
            float(rng.uniform(7, 8.5)),
        ),
    }


def _smooth(volume: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Separable 3-tap binomial blur: a partial-volume look without scipy."""
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=volume.dtype)
    out = volume[None, None]
    for _ in range(passes):
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = 3
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 1
            out = torch.nn.functional.conv3d(torch.nn.functional.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]


def _smooth_field(rng: np.random.Generator, x, y, z, amplitude: float, wavelength: float) -> np.ndarray:
    """A smooth random scalar field: a sum of three plane waves with random directions and phases."""
    field = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
    for _ in range(3):
        k = rng.normal(size=3)
        k *= 2 * np.pi / (wavelength * np.linalg.norm(k))
        field += np.sin(k[0] * x + k[1] * y + k[2] * z + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return amplitude / 3 * field


def make_case(seed: int, spacing_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case: ``(image HU int16, label uint8, affine 4x4)``, arrays in the affine's voxel order.

    Args:
        seed: the case's random seed; the same seed always gives the same case.
        spacing_scale: multiplies the voxel spacing (default 1.0, about 2.3-3 mm in-plane and 2.5-5 mm
            slices); tests use larger values for tiny volumes, at which the adrenals may vanish.
    """
    rng = np.random.default_rng(seed)
    spacing = np.array([rng.uniform(2.3, 3.0)] * 2 + [rng.choice([2.5, 3.0, 4.0, 5.0])]) * spacing_scale
    half_body = np.array([rng.uniform(150, 180), rng.uniform(105, 125)])  # lateral, anterior-posterior
    fov = np.array([2 * half_body[0] + 20, 2 * half_body[1] + 30, 0.0])
    z_range = (-rng.uniform(100, 125), rng.uniform(95, 115))
    fov[2] = z_range[1] - z_range[0]
    shape = np.maximum(np.round(fov / spacing).astype(int), 8)
    flips = np.array(ORIENTATIONS[sorted(ORIENTATIONS)[seed % len(ORIENTATIONS)]], dtype=float)

    # world coordinate of voxel 0 so that the field of view is centred laterally and spans z_range
    low = np.array([-fov[0] / 2, -fov[1] / 2 - 5.0, z_range[0]]) + rng.normal(0, 3, 3) * [1, 1, 0]
    high = low + (shape - 1) * spacing
    origin = np.where(flips > 0, low, high)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(flips * spacing)
    affine[:3, 3] = origin

    axes = [origin[a] + flips[a] * spacing[a] * np.arange(shape[a], dtype=np.float32) for a in range(3)]
    # broadcastable axes, not a meshgrid: the plane waves below then cost one full-volume pass fewer per term
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    # one smooth deformation for the whole case keeps organs from being perfect ellipsoids
    wx, wy, wz = (
        x + _smooth_field(rng, x, y, z, 6.0, 120.0),
        y + _smooth_field(rng, x, y, z, 6.0, 120.0),
        z + _smooth_field(rng, x, y, z, 6.0, 120.0),
    )

    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body_r = (wx / half_body[0]) ** 2 + ((wy + 5.0) / half_body[1]) ** 2
    fat_depth = rng.uniform(12.0, 28.0)
    inner = (wx / (half_body[0] - fat_depth)) ** 2 + ((wy + 5.0) / (half_body[1] - fat_depth)) ** 2
    cavity = (wx / (half_body[0] - fat_depth - 10.0)) ** 2 + ((wy + 5.0) / (half_body[1] - fat_depth - 10.0)) ** 2
    image[body_r <= 1.0] = -100.0  # subcutaneous fat
    image[inner <= 1.0] = 45.0  # abdominal wall muscle
    bowel = _smooth_field(rng, x, y, z, 1.0, 40.0) + 0.5 * _smooth_field(rng, x, y, z, 1.0, 18.0)
    visceral = np.where(bowel > 0.1, 30.0, -90.0).astype(np.float32)
    visceral[bowel > 0.85] = -800.0  # gas in bowel loops
    image[cavity <= 1.0] = visceral[cavity <= 1.0]
    for side in (-1.0, 1.0):
        image[Ellipsoid((side * 85.0, -20.0, 165.0), (65.0, 62.0, 95.0)).mask(wx, wy, wz)] = -850.0  # lung bases
        paraspinal = Ellipsoid((side * 38.0, -95.0, 0.0), (24.0, 20.0, 400.0)).mask(wx, wy, wz)
        image[paraspinal & (inner <= 1.0)] = 50.0
    image[Ellipsoid((0.0, -72.0, 0.0), (20.0, 18.0, 400.0)).mask(wx, wy, wz)] = 650.0  # vertebral cortex
    image[Ellipsoid((0.0, -72.0, 0.0), (16.0, 14.0, 400.0)).mask(wx, wy, wz)] = 250.0  # cancellous bone

    def box(shape: Ellipsoid | Tube) -> tuple[slice, ...]:
        """Voxel slices holding ``shape``, with a margin for the deformation (flipped axes included)."""
        low, high = shape.bounds()
        ends = [(np.array([low[a] - 10.0, high[a] + 10.0]) - origin[a]) / (flips[a] * spacing[a]) for a in range(3)]
        return tuple(slice(max(int(np.floor(e.min())), 0), max(int(np.ceil(e.max())) + 1, 0)) for e in ends)

    shapes = organ_shapes(rng)
    texture = _smooth_field(rng, x, y, z, 8.0, 25.0)
    for organ, hu in ORGAN_HU:
        sl = box(shapes[organ])
        inside = np.zeros(shape, dtype=bool)
        inside[sl] = shapes[organ].mask(wx[sl], wy[sl], wz[sl]) & (body_r[sl] <= 1.0)
        label[inside] = organ
        image[inside] = hu + rng.normal(0.0, 5.0) + texture[inside]
    stomach_gas = (label == 7) & Ellipsoid(shapes[7].center, shapes[7].radii, shapes[7].yaw).mask(
        wx, wy - 25.0, wz - 30.0
    )
    image[stomach_gas] = -900.0  # gas cap in the anterior, upper stomach (still labelled stomach)

    noisy = _smooth(torch.from_numpy(image)).numpy() + rng.normal(0.0, rng.uniform(8.0, 20.0), shape)
    return np.clip(np.round(noisy), -1024, 3071).astype(np.int16), label, affine


def generate(
    out_dir: str | os.PathLike, num_cases: int = 16, num_validation: int = 4, seed: int = 0, spacing_scale: float = 1.0
) -> Path:
    """Write ``num_cases`` phantom cases and an MSD-style ``dataset.json`` to ``out_dir``.

    The last ``num_validation`` cases go to the ``validation`` list, the others to ``training``. Files are
    written under temporary names and renamed, and ``dataset.json`` last, so an interrupted run never leaves
    a dataset that looks complete.

    Args:
        out_dir: folder to create (parents included).
        num_cases: number of cases (default 16).
        num_validation: cases held out for validation (default 4; must be < ``num_cases``).
        seed: base seed; case ``i`` uses ``seed * 1000 + i`` (default 0).
        spacing_scale: passed to :func:`make_case` (default 1.0).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if not 0 <= num_validation < num_cases:
        raise ValueError(
            f"need 0 <= num_validation < num_cases, got num_validation={num_validation}, num_cases={num_cases}."
        )
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(num_cases):
        image, label, affine = make_case(seed * 1000 + i, spacing_scale)
        name = f"phantom_{i:03d}.nii.gz"
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            nifti = nib.Nifti1Image(array, affine)
            nifti.set_qform(affine, code=1)
            nifti.set_sform(affine, code=1)
            tmp = out / folder / f".tmp_{name}"
            nib.save(nifti, tmp)
            os.replace(tmp, out / folder / name)
        items.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    split = num_cases - num_validation
    dataset = {
        "name": "SyntheticAbdomenCT",
        "description": "Deterministic synthetic abdominal CT phantom (scripts/phantom.py), BTCV label convention",
        "reference": "generated by this bundle; not patient data",
        "licence": "Apache-2.0 (generated data)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": split,
        "numValidation": num_validation,
        "generator": {"seed": seed, "num_cases": num_cases, "spacing_scale": spacing_scale},
        "training": items[:split],
        "validation": items[split:],
    }
    tmp = out / ".tmp_dataset.json"
    tmp.write_text(json.dumps(dataset, indent=2) + "\n")
    os.replace(tmp, out / "dataset.json")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_cases", type=int, default=16)
    parser.add_argument("--num_validation", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing_scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    print(generate(args.out, args.num_cases, args.num_validation, args.seed, args.spacing_scale))


if __name__ == "__main__":
    main()
