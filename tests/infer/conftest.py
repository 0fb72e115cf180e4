"""Fixtures of the inference-script tests: a tiny network and checkpoint, and small CT volumes on odd grids."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
INFERENCE_JSON = BUNDLE_ROOT / "configs" / "inference.json"
# the bundle's UNet at half width on a 6 x 6 x 8 mm grid: seconds per volume on CPU, same layers and checkpoint layout
TINY_OVERRIDE = {"network_def#channels": [4, 8, 16, 32], "patch_size": [32, 32, 32], "pixdim": [6.0, 6.0, 8.0]}


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def phantom_volumes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three small phantom CTs: LAS and LPS anisotropic grids, and one whose voxel axes are permuted
    (voxel axis 0 runs along world z), so neither the orientation nor the spacing is the config's."""
    from scripts.phantom import make_case

    las_image, _, las_affine = make_case(0, spacing_scale=2.5)
    lps_image, _, lps_affine = make_case(1, spacing_scale=2.5)
    permuted = np.ascontiguousarray(las_image.transpose(2, 0, 1))
    permuted_affine = las_affine.copy()
    permuted_affine[:3, :3] = las_affine[:3, [2, 0, 1]]
    return {"las": (las_image, las_affine), "lps": (lps_image, lps_affine), "permuted": (permuted, permuted_affine)}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> dict:
    """``{"config": [inference.json, tiny.json], "model": path}`` with a seeded random tiny UNet checkpoint."""
    root = tmp_path_factory.mktemp("tiny_bundle")
    override = root / "tiny.json"
    override.write_text(json.dumps(TINY_OVERRIDE))
    parser = ConfigParser()
    parser.read_config([str(INFERENCE_JSON), str(override)])
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    model = root / "model.pt"
    torch.save(network.state_dict(), model)
    return {"config": [str(INFERENCE_JSON), str(override)], "model": str(model)}


@pytest.fixture(scope="session")
def ct_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    for name, (image, affine) in phantom_volumes().items():
        save_nifti(folder / f"{name}.nii.gz", image, affine)
    return folder


def infer_args(tiny_bundle: dict, *extra: str) -> list[str]:
    return [
        *extra,
        "--config",
        *tiny_bundle["config"],
        "--model",
        tiny_bundle["model"],
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-progress",
    ]
