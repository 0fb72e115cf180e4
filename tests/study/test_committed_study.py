"""The committed 400-iteration phantom study covers every preset, its tables are its runs, and every preset learns
(issue 14's bar: a mean Dice >= 0.5 over the seeds in the study's setting)."""

import csv
import json
from pathlib import Path

import pytest

from scripts import study

STUDY = study.BUNDLE_ROOT / "docs" / "study" / "phantom"
SEEDS = 2


def _table_rows() -> dict[str, dict[str, str]]:
    with open(STUDY / "results.csv") as f:
        return {row["loss"]: row for row in csv.DictReader(f)}


def _runs(loss: str) -> list[dict]:
    return [json.loads((STUDY / "runs" / loss / f"seed{k}" / "result.json").read_text()) for k in range(SEEDS)]


def test_every_preset_has_its_seeds_in_the_study():
    assert sorted(_table_rows()) == study.available_losses()
    for loss, row in _table_rows().items():
        assert row["seeds"] == str(SEEDS), loss
        assert all(Path(STUDY / "runs" / loss / f"seed{k}" / "result.json").is_file() for k in range(SEEDS)), loss


@pytest.mark.parametrize("loss", study.available_losses())
def test_table_is_the_runs(loss):
    columns, table = study.summarise({loss: _runs(loss)})
    row = _table_rows()[loss]
    for column in columns:
        mean, spread = table[0][column]
        assert float(row[column]) == pytest.approx(mean, rel=1e-5, abs=1e-6), column
        assert float(row[f"{column}_spread"]) == pytest.approx(spread, rel=1e-5, abs=1e-6), column


@pytest.mark.parametrize("loss", study.available_losses())
def test_every_preset_learns(loss):
    runs = _runs(loss)
    assert all(run["iterations"] == 400 for run in runs), loss
    mean = sum(run["mean_dice"] for run in runs) / len(runs)
    assert mean >= 0.5, f"{loss}: mean Dice {mean:.3f} over {len(runs)} seeds at 400 iterations"
