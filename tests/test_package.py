"""The installable library: a wheel of ``ctlosses`` built from this tree, installed into a fresh venv, used by a
mock bundle that has its own ``scripts`` package (as many model-zoo bundles do) through ``python -m monai.bundle run``.

The fresh venv sees torch, MONAI and Ignite through a ``.pth`` line to the test environment's site-packages, so pip
resolves the wheel's dependency ranges against installed versions with ``--no-index`` (seconds, nothing downloaded).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

import ctlosses

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "ctlosses")

MOCK_SCRIPTS = '''
"""The mock bundle's own scripts package: it must not hide ctlosses, nor ctlosses it."""
import torch


def cases(count=2, size=16, num_classes=3):
    generator = torch.Generator().manual_seed(0)
    out = []
    for index in range(count):
        label = torch.randint(0, num_classes, (1, size, size, size), generator=generator)
        image = label.float() + 0.1 * torch.randn(label.shape, generator=generator)
        out.append({"image": image, "label": label, "name": f"case_{index}"})
    return out
'''

MOCK_CONFIG = {
    "imports": ["$import scripts", "$import scripts.mock_data", "$import ctlosses", "$import ctlosses.organ_metrics"],
    "network": {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
    },
    "loss": {"_target_": "ctlosses.LovaszSoftmaxLoss", "to_onehot_y": True, "softmax": True},
    "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.001},
    "counts": {"_target_": "ctlosses.organ_metrics.OrganCounts", "labels": ["background", "liver", "spleen"]},
    "dataloader": {
        "_target_": "DataLoader",
        "dataset": {"_target_": "Dataset", "data": "$scripts.mock_data.cases()"},
        "batch_size": 2,
    },
    "trainer": {
        "_target_": "SupervisedTrainer",
        "max_epochs": 1,
        "epoch_length": 1,
        "device": "cpu",
        "train_data_loader": "@dataloader",
        "network": "@network",
        "loss_function": "@loss",
        "optimizer": "@optimizer",
        "postprocessing": {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        "key_train_metric": {
            "train_dice": {"_target_": "ctlosses.organ_metrics.OrganMetric", "counts": "@counts", "metric": "dice"}
        },
        "train_handlers": [
            {"_target_": "ctlosses.organ_metrics.OrganMetricsWriter", "counts": "@counts", "output_dir": "eval"}
        ],
    },
    "run": [
        "$print('ctlosses from', ctlosses.__file__, 'version', ctlosses.__version__)",
        "$print('scripts from', scripts.mock_data.__file__)",
        "$@trainer.run()",
        "$print('loss', float(@trainer.state.output[0]['loss']), 'dice', @trainer.state.metrics['train_dice'])",
    ],
}


def test_version_is_one_string_for_the_package_and_the_changelog():
    assert ctlosses.__version__.count(".") == 2
    assert f"## {ctlosses.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dynamic"] == ["version"]
    # a library states ranges: no exact pin may force the user's torch or MONAI
    assert not [d for d in project["dependencies"] if "==" in d], project["dependencies"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the package's files (the build writes build/ and *.egg-info/ next to them)."""
    source = tmp_path_factory.mktemp("source")
    for name in PACKAGE_FILES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, text=True)
    (built,) = dist.glob("ctlosses-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_python(wheel, tmp_path_factory) -> Path:
    """A venv without ctlosses on any path but its own site-packages, where pip installed the wheel."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "-q", str(wheel)]
    result = subprocess.run(install, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return python


def test_the_wheel_holds_the_package_only(wheel):
    import zipfile

    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top == {"ctlosses", f"ctlosses-{ctlosses.__version__}.dist-info"}, top
    names = zipfile.ZipFile(wheel).namelist()
    assert "ctlosses/organ_metrics.py" in names and "ctlosses/lovasz.py" in names


def test_a_bundle_with_its_own_scripts_package_trains_with_the_installed_losses(fresh_python, tmp_path):
    bundle = tmp_path / "mock_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "__init__.py").write_text("")
    (bundle / "scripts" / "mock_data.py").write_text(MOCK_SCRIPTS)
    (bundle / "configs" / "train.json").write_text(json.dumps(MOCK_CONFIG, indent=2))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.0.1", "name": "mock bundle"}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    command = [str(fresh_python), "-m", "monai.bundle", "run", "--config_file", "configs/train.json"]
    result = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    (origin,) = [line for line in lines if line.startswith("ctlosses from")]
    installed = Path(origin.split()[2])
    assert installed.is_relative_to(fresh_python.parents[1]), origin  # the wheel's copy, not this repository's
    assert origin.endswith(f"version {ctlosses.__version__}")
    (scripts,) = [line for line in lines if line.startswith("scripts from")]
    assert Path(scripts.split()[2]).is_relative_to(bundle), scripts
    (last,) = [line for line in lines if line.startswith("loss ")]
    loss, dice = float(last.split()[1]), float(last.split()[3])
    assert 0.0 < loss < 1.0 and 0.0 <= dice <= 1.0, last
    summary = (bundle / "eval" / "organ_metrics_summary.csv").read_text()
    assert "liver" in summary and "spleen" in summary
