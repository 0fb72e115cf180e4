"""Shared helpers of the bundle tests: a tiny phantom and in-process ``monai.bundle`` runs with small overrides."""

from __future__ import annotations

from pathlib import Path

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
    settings = {**TINY, "bundle_root": str(BUNDLE_ROOT), "dataset_dir": str(dataset_dir),
                "output_dir": str(out_dir / "eval"), "ckpt_dir": str(out_dir / "models"), **override}  # fmt: skip
    workflow = ConfigWorkflow(config_file=files, meta_file=str(CONFIGS / "metadata.json"),
                              logging_file=str(CONFIGS / "logging.conf"), workflow_type="train", **settings)  # fmt: skip
    workflow.initialize()
    return workflow


def run_training(dataset_dir: Path, out_dir: Path, extra_files=(), **override) -> ConfigWorkflow:
    workflow = train_workflow(["train.json", *extra_files], dataset_dir, out_dir, **override)
    workflow.run()
    workflow.finalize()
    return workflow
