"""The loss study runner on a tiny phantom: table shape and values, the three PNGs, resuming, and bad input."""

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from bundle_helpers import TINY, make_tiny_phantom  # noqa: E402

from scripts import study  # noqa: E402

LOSSES = ["dice", "focal"]
ORGANS = [
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic veins",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
]


def _argv(phantom, out):
    shrink = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    return [
        "--dataset_dir",
        str(phantom),
        "--losses",
        ",".join(LOSSES),
        "--iterations",
        "2",
        "--val-points",
        "2",
        "--seeds",
        "1",
        "--out",
        str(out),
        *shrink,
    ]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    phantom = make_tiny_phantom(tmp_path_factory.mktemp("phantom"))
    out = tmp_path_factory.mktemp("study")
    results = study.main(_argv(phantom, out))
    return phantom, out, results


def test_table_has_one_row_per_loss_and_a_column_per_organ(study_run):
    _, out, results = study_run
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["loss"] for r in rows] == LOSSES
    assert [c for c in rows[0] if c.startswith("dice_") and not c.endswith("_spread")] == [f"dice_{o}" for o in ORGANS]
    for row, loss in zip(rows, LOSSES):
        run = results[loss][0]
        assert run["iterations"] == 2 and len(run["curve"]) == 2  # validated at iterations 1 and 2
        # the small-organ Dice of every validation, for the curves plot: same iterations, scores of those organs
        assert [it for it, _ in run["small_organ_curve"]] == [it for it, _ in run["curve"]]
        assert all(0.0 <= value <= 1.0 for _, value in run["small_organ_curve"]), run["small_organ_curve"]
        assert not math.isnan(float(row["mean_dice"])) and 0.0 <= float(row["mean_dice"]) <= 1.0
        assert float(row["mean_dice"]) == pytest.approx(run["mean_dice"], abs=1e-5)
        expected_small = sum(run["dice"][o] for o in study.SMALL_ORGANS) / len(study.SMALL_ORGANS)
        assert float(row["small_organ_dice"]) == pytest.approx(expected_small, abs=1e-5)
        assert float(row["mean_dice_spread"]) == 0.0  # one seed
        assert float(row["s_per_iteration"]) > 0 and float(row["peak_memory_mb"]) > 0
    markdown = (out / "results.md").read_text().splitlines()
    assert len([line for line in markdown if line.startswith("| ") and " ± " in line]) == len(LOSSES)
    commands = (out / "commands.md").read_text()
    assert "--losses dice,focal" in commands and "torch" in commands and "monai" in commands


def test_curve_table_is_the_validation_curves(study_run):
    _, out, results = study_run
    text = (out / "curves.md").read_text()
    _, mean_dice, small, _ = text.split("### ")
    assert mean_dice.startswith("validation mean Dice") and small.startswith("validation small-organ Dice")
    for section, key in ((mean_dice, "curve"), (small, "small_organ_curve")):
        rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}
        header = [cell.strip() for cell in rows["loss"].strip("|").split("|")][2:]
        for loss in LOSSES:
            run = results[loss][0]
            assert header == [str(it) for it, _ in run[key]]
            cells = [cell.strip() for cell in rows[loss].strip("|").split("|")][2:]
            assert [float(c) for c in cells] == pytest.approx([v for _, v in run[key]], abs=5e-4)


def test_first_reaching_is_the_first_validation_at_or_above():
    curve = [[300, 0.62], [100, 0.2], [200, 0.59], [400, 0.55], [500, 0.71]]  # unordered, and not monotone
    assert study.first_reaching(curve, 0.6) == 300
    assert study.first_reaching(curve, 0.59) == 200
    assert study.first_reaching(curve, 0.71) == 500
    assert study.first_reaching(curve, 0.72) is None
    assert study.first_reaching([], 0.5) is None


def test_curves_md_lists_per_seed_iterations_to_reach_each_level(tmp_path):
    def run(points):
        return {"curve": points, "small_organ_curve": points}

    results = {
        "fast": [run([[100, 0.55], [200, 0.72]]), run([[100, 0.61], [200, 0.65]])],
        "slow": [run([[100, 0.1], [200, 0.5]])],
        "old": [{"curve": [[100, 0.3]]}],  # a run from before small-organ curves were recorded
    }
    study.write_curve_table(tmp_path, results)
    section = (tmp_path / "curves.md").read_text().split("### ")[3]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == "| loss | seeds | >= 0.5 | >= 0.6 | >= 0.7 |"
    assert rows[1:] == [
        "| fast | 2 | 100, 100 | 200, 100 | 200, — |",
        "| slow | 1 | 200 | — | — |",
        "| old | 1 | n/a | n/a | n/a |",
    ]


def test_curves_md_has_no_reach_table_without_small_organ_curves(tmp_path):
    study.write_curve_table(tmp_path, {"old": [{"curve": [[100, 0.3]]}]})
    assert "first reaches" not in (tmp_path / "curves.md").read_text()


def test_plots_exist(study_run):
    pytest.importorskip("matplotlib", reason="plots need matplotlib; the tables are written without it")
    _, out, _ = study_run
    assert len(study.PLOTS) == 4  # the three of the issue plus the headline small-organ chart
    for name in (*study.PLOTS, "small_organ_dice_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_second_invocation_skips_finished_runs(study_run, capsys, monkeypatch):
    phantom, out, results = study_run
    done = {loss: (out / "runs" / loss / "seed0" / "result.json").stat().st_mtime_ns for loss in LOSSES}

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished run was started again: {args}")

    monkeypatch.setattr(study, "train_in_child", no_training)
    again = study.main(_argv(phantom, out))
    assert again == results
    assert all((out / "runs" / loss / "seed0" / "result.json").stat().st_mtime_ns == t for loss, t in done.items())
    assert capsys.readouterr().out.count("[study] skipping") == len(LOSSES)


def test_tabulate_only_tables_the_finished_runs_and_trains_nothing(study_run, tmp_path, monkeypatch):
    phantom, out, results = study_run
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    shutil.rmtree(partial / "runs" / "focal")  # a study stopped after dice's run

    def no_training(*args, **kwargs):
        raise AssertionError(f"--tabulate-only started a run: {args}")

    monkeypatch.setattr(study, "train_in_child", no_training)
    argv = _argv(phantom, partial)
    argv[argv.index("--seeds") + 1] = "2"  # seed 1 never ran
    tabled = study.main([*argv, "--tabulate-only"])
    assert tabled == {"dice": results["dice"]}
    with open(partial / "results.csv") as f:
        assert [(r["loss"], r["seeds"]) for r in csv.DictReader(f)] == [("dice", "1")]
    commands = (partial / "commands.md").read_text()
    assert "runs finished: 1 of 4" in commands and "--tabulate-only" not in commands and "--seeds 2" in commands
    shutil.rmtree(partial / "runs" / "dice")
    with pytest.raises(SystemExit, match="no finished run"):
        study.main([*argv, "--tabulate-only"])


def test_summary_is_mean_and_sample_spread_over_seeds():
    def run(seed, dice):
        return {
            "seed": seed,
            "dice": {o: dice for o in ORGANS},
            "mean_dice": dice,
            "mean_iou": dice / 2,
            "s_per_iteration": 1.0 + seed,
            "peak_memory_mb": 100.0,
        }

    columns, table = study.summarise({"x": [run(0, 0.2), run(1, 0.4)]})
    assert columns[: len(ORGANS)] == [f"dice_{o}" for o in ORGANS]
    assert table[0]["mean_dice"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert table[0]["small_organ_dice"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert table[0]["s_per_iteration"] == pytest.approx((1.5, math.sqrt(0.5)))


def test_small_organ_mean_skips_organs_absent_from_validation():
    # the real CT's validation case has no esophagus or left adrenal: NaN there, and they must not count as 0
    dice = {o: 0.9 for o in ORGANS} | {"esophagus": math.nan, "left adrenal gland": math.nan, "pancreas": 0.5}
    expected = (0.9 + 0.9 + 0.5 + 0.9) / 4  # gallbladder, right adrenal, pancreas, portal/splenic veins
    assert study.small_organ_dice(dice) == pytest.approx(expected)
    assert math.isnan(study.small_organ_dice({o: math.nan for o in ORGANS}))
    columns, table = study.summarise(
        {
            "x": [
                {
                    "seed": 0,
                    "dice": dice,
                    "mean_dice": 0.8,
                    "mean_iou": 0.7,
                    "s_per_iteration": 1.0,
                    "peak_memory_mb": 1.0,
                }
            ]
        }
    )
    assert table[0]["small_organ_dice"] == pytest.approx((expected, 0.0))
    assert math.isnan(table[0]["dice_esophagus"][0])


@pytest.mark.parametrize("spec", ["", "dice,nope", "DICE"])
def test_unknown_losses_are_rejected(spec):
    with pytest.raises(ValueError, match="--losses must be"):
        study.parse_losses(spec)


def test_bad_set_override_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="KEY=JSON_VALUE"):
        study.main(["--dataset_dir", str(tmp_path), "--iterations", "1", "--out", str(tmp_path), "--set", "epochs"])


def test_budget_mode_stops_on_time_and_validates_the_last_weights(study_run, tmp_path):
    phantom, _, _ = study_run
    argv = _argv(phantom, tmp_path)
    argv[argv.index("--iterations") : argv.index("--iterations") + 2] = ["--budget-minutes", "0.03"]
    argv[argv.index("--losses") + 1] = "dice"
    run = study.main(argv)["dice"][0]
    assert run["iterations"] >= 1 and run["iterations"] < 100_000  # stopped by the ~1.8 s budget, not the cap
    assert run["curve"][-1][0] == run["iterations"]
    assert [it for it, _ in run["curve"]] == sorted({it for it, _ in run["curve"]})


def test_moved_study_finds_its_predictions_and_keeps_the_slice_panel_without_them(study_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import shutil

    phantom, out, _ = study_run
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out / "runs" / "dice" / "seed0" / "eval")  # as if cloned elsewhere: the first folder is gone
    results = {loss: [json.loads((moved / "runs" / loss / "seed0" / "result.json").read_text())] for loss in LOSSES}
    _, preds, missing = study._axial_slices(results, phantom, moved)
    assert sorted(preds) == sorted(LOSSES) and missing == []  # found under the moved folder

    shutil.rmtree(moved / "runs" / "focal" / "seed0" / "eval")  # predictions are not committed
    _, preds, missing = study._axial_slices(results, phantom, moved)
    assert sorted(preds) == ["dice"] and missing == ["focal"]
    panel = (moved / "axial_slices.png").read_bytes()
    study.main(_argv(phantom, moved))
    assert (moved / "axial_slices.png").read_bytes() == panel  # the full panel is not replaced by a partial one
    assert "axial_slices.png kept" in capsys.readouterr().out
