import json
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[2]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "monailabel: needs MONAI Label 0.8.5 (bash .ci/install-monailabel.sh builds .venv-monailabel for them)",
    )


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """Seven small phantom cases of the bundle's own generator: four for training, three held out for validation
    (an odd number: two processes get uneven validation shards, which only a reduction of counts gets right).

    ``spacing_scale=2`` halves the resolution, so that every volume resamples to well under the bundle's
    patch size plus padding and one epoch is a single iteration per process.
    """
    from scripts.phantom import generate

    out = generate(tmp_path_factory.mktemp("phantom"), num_cases=7, num_validation=3, seed=7, spacing_scale=2.0)
    content = json.loads((out / "dataset.json").read_text())
    assert len(content["training"]) == 4 and len(content["validation"]) == 3
    return out
