"""Shared helpers of the bundle tests: a tiny phantom and in-process ``monai.bundle`` runs with small overrides."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLE_ROOT / "configs"

# shrink the default run to seconds on CPU: small patches, one sample per step, no caching workers
TINY = {
    "patch_size": [32, 32, 32],
    "batch_size": 1,
    "num_samples": 1,
    "num_workers": 0,
    "network_def#channels": [4, 8, 16, 32],
}


def make_tiny_phantom(out_dir: Path, num_cases: int = 3) -> Path:
    from scripts.phantom import generate

    return generate(out_dir, num_cases=num_cases, num_validation=1, spacing_scale=2.5)


def train_workflow(config_files, dataset_dir: Path, out_dir: Path, **override) -> ConfigWorkflow:
    """A parsed and initialised training workflow writing only under ``out_dir``."""
    files = [str(CONFIGS / f) if not str(f).startswith("/") else str(f) for f in config_files]
    settings = {
        **TINY,
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(out_dir / "eval"),
        "ckpt_dir": str(out_dir / "models"),
        **override,
    }
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        **settings,
    )
    workflow.initialize()
    return workflow


def run_training(dataset_dir: Path, out_dir: Path, extra_files=(), **override) -> ConfigWorkflow:
    workflow = train_workflow(["train.json", *extra_files], dataset_dir, out_dir, **override)
    workflow.run()
    workflow.finalize()
    return workflow


# what a user may see at most for one bad input: MONAI's own 2-line security warning and logging line, then the
# bundle's message (the "about 15 lines")
MAX_ERROR_LINES = 15


def bundle_copy(out_dir: Path) -> Path:
    """A copy of the bundle (configs, scripts, models) to run ``python -m monai.bundle`` in, with ``configs/tiny.json``
    holding :data:`TINY`, so that a run may write ``models/`` and ``eval/`` without touching the repository."""
    import shutil

    copy = out_dir / "bundle"
    for part in ("configs", "ctlosses", "scripts", "models"):
        shutil.copytree(BUNDLE_ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.pt.tmp"))
    (copy / "configs" / "tiny.json").write_text(json.dumps(TINY))
    return copy


def run_bundle(bundle: Path, *args: str, configs=("train.json",), timeout: float = 300, env=None):
    """``python -m monai.bundle run`` in ``bundle`` as a user types it, with tiny.json merged last; returns
    ``(exit code, output lines)``: stdout and stderr merged in order, a progress bar's carriage returns read as
    line ends, blank lines left out."""
    import os
    import subprocess
    import sys

    files = ",".join(f"'configs/{name}'" for name in (*configs, "tiny.json"))
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"[{files}]", *args]
    environment = {key: value for key, value in os.environ.items() if key != "BUNDLE_DEBUG"}
    environment.update({"OMP_NUM_THREADS": "1", **(env or {})})
    done = subprocess.run(
        command,
        cwd=bundle,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=environment,
    )
    return done.returncode, [line for line in done.stdout.replace("\r", "\n").splitlines() if line.strip()]


def assert_one_message(result, *names: str) -> str:
    """A bad input's report: non-zero exit, at most :data:`MAX_ERROR_LINES` lines, the last naming ``names``."""
    code, lines = result
    assert code != 0, "\n".join(lines[-30:])
    assert len(lines) <= MAX_ERROR_LINES, f"{len(lines)} lines:\n" + "\n".join(lines)
    assert all(name in lines[-1] for name in names), f"last line does not name {names}:\n" + "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


# --- one file of a phantom copy altered as a user's data might be ------------------------------------------------


def case_file(dataset: Path, section: str, key: str, index: int = 0) -> Path:
    """The file of one entry of ``dataset``'s dataset.json (``section`` ``training`` or ``validation``)."""
    return dataset / json.loads((dataset / "dataset.json").read_text())[section][index][key]


def resave(path: Path, data=None, affine=None) -> None:
    """Write ``path`` again with other voxels or another affine: the one file a bad-input test alters."""
    original = nib.load(path)
    data = np.asanyarray(original.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, original.affine if affine is None else affine), path)


def flip_first_axis(affine):
    flipped = affine.copy()
    flipped[:3, 0] *= -1  # same voxels, mirrored in space
    return flipped


def double_z_spacing(affine):
    stretched = affine.copy()
    stretched[:3, 2] *= 2
    return stretched


def translate(affine, millimetres=5.0):
    moved = affine.copy()
    moved[:3, 3] += millimetres
    return moved


def all_nan(data):
    return np.full_like(data, np.nan)


def one_infinite_voxel(data):
    data.flat[data.size // 2] = np.inf
    return data


def constant(data):
    return np.full_like(data, -1000.0)


def all_below_the_hu_window(data):  # varied values, all air: the foreground crop would be empty
    return np.linspace(-1000, -500, data.size, dtype=np.float32).reshape(data.shape)
