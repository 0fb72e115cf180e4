"""The committed long phantom study (1,500 iterations, issue 14): its tables are its runs, and the reading in
docs/losses.md quotes them, with the number of finished runs it claims."""

import csv
import json
import re

import pytest

from scripts import study

STUDY = study.BUNDLE_ROOT / "docs" / "study" / "phantom_long"
LOSSES = ["dice_ce", "combo", "lovasz_softmax", "tversky", "generalized_dice"]
SEEDS, ITERATIONS, VAL_POINTS = 3, 1500, 15


def _runs() -> dict[str, list[dict]]:
    found = {loss: sorted((STUDY / "runs" / loss).glob("seed*/result.json")) for loss in LOSSES}
    return {loss: [json.loads(path.read_text()) for path in paths] for loss, paths in found.items() if paths}


def _long_section() -> str:
    text = (study.BUNDLE_ROOT / "docs" / "losses.md").read_text()
    start = text.index("### At 1,500 iterations")
    return text[start : text.index("\n### ", start + 1)]


def test_every_run_is_a_full_long_run():
    for loss, runs in _runs().items():
        for run in runs:
            assert run["loss"] == loss and run["iterations"] == ITERATIONS, (loss, run["seed"])
            assert [it for it, _ in run["small_organ_curve"]] == list(range(100, ITERATIONS + 1, 100)), loss
            assert len(run["curve"]) == VAL_POINTS, loss


def test_results_table_is_the_runs():
    runs = _runs()
    columns, table = study.summarise(runs)
    with open(STUDY / "results.csv") as f:
        rows = {row["loss"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(runs)
    for expected in table:
        row = rows[expected["loss"]]
        assert row["seeds"] == str(expected["seeds"])
        for column in columns:
            assert float(row[column]) == pytest.approx(expected[column][0], rel=1e-5, abs=1e-6), column


def test_curves_md_is_the_runs(tmp_path):
    study.write_curve_table(tmp_path, _runs())
    assert (STUDY / "curves.md").read_text() == (tmp_path / "curves.md").read_text()


def test_losses_md_counts_the_finished_runs():
    finished = sum(len(runs) for runs in _runs().values())
    claim = re.search(r"in progress: (\d+) of (\d+) runs", _long_section().splitlines()[0])
    if claim:
        assert (int(claim[1]), int(claim[2])) == (finished, SEEDS * len(LOSSES))
    else:
        assert finished == SEEDS * len(LOSSES), "docs/losses.md calls the long study finished"
    assert f"runs finished: {finished} of {SEEDS * len(LOSSES)}" in (STUDY / "commands.md").read_text()


def test_losses_md_table_quotes_the_runs():
    _, table = study.summarise(_runs())
    quoted = {}
    for line in _long_section().splitlines():
        cells = [cell.strip().strip("*`") for cell in line.strip("|").split("|")]
        if cells[0] in LOSSES and len(cells) == 7:
            quoted[cells[0]] = cells
    assert sorted(quoted) == sorted(LOSSES)
    for row in table:
        seeds, final_mean, final_small = quoted[row["loss"]][1], quoted[row["loss"]][3], quoted[row["loss"]][5]
        assert seeds == str(row["seeds"])
        for cell, (mean, spread) in ((final_mean, row["mean_dice"]), (final_small, row["small_organ_dice"])):
            assert cell == (f"{mean:.3f} ± {spread:.3f}" if row["seeds"] > 1 else f"{mean:.3f}"), row["loss"]
