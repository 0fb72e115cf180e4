"""Tests of scripts/benchmark.py's bookkeeping: the markdown blocks, the CPU memory measurement and the case list
(no timings are asserted)."""

from __future__ import annotations

import torch

from ctlosses import LOSSES
from scripts.benchmark import Case, Comparison, loss_cases, peak_extra_bytes, write_block


def test_write_block_replaces_only_its_own_block(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nintro\n\n## Metrics\n\nmetrics table\n")
    write_block(path, "Losses", "losses:cpu", "cpu table v1")
    write_block(path, "Losses", "losses:cuda", "cuda table")
    write_block(path, "Losses", "losses:cpu", "cpu table v2")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n## Metrics\n\nmetrics table\n")
    assert "cpu table v2" in text and "cpu table v1" not in text and "cuda table" in text
    assert text.count("## Losses") == 1 and text.index("cpu table v2") < text.index("cuda table")


def test_write_block_creates_the_file(tmp_path):
    path = tmp_path / "docs" / "benchmarks.md"
    write_block(path, "Losses", "losses:cpu", "table")
    lines = path.read_text().splitlines()
    assert lines[0] == "# Benchmarks" and "## Losses" in lines and "<!-- losses:cpu -->" in lines


def test_cpu_peak_memory_counts_live_tensors():
    logits = torch.randn(256, 1024)
    size = logits.numel() * logits.element_size()
    # x * 2 is freed after the sum (a product with a scalar saves nothing), then backward makes the input grad:
    # never more than one logits-sized tensor alive (plus a few scalars)
    assert size <= peak_extra_bytes(lambda x, _: (x * 2).sum(), logits, None) < size + 1024
    # exp and sin are both kept for backward and their product is alive with them: three at once at least
    assert peak_extra_bytes(lambda x, _: (x.exp() * x.sin()).sum(), logits, None) >= 3 * size


def test_every_registry_loss_has_an_anchor():
    cases, notes = loss_cases(None)
    names = {case.name.split(" ")[0] for case in cases}
    aliases = {name for name in LOSSES if any(note.startswith(f"`{name}` is an alias") for note in notes)}
    assert names | aliases == set(LOSSES)
    assert not any("no anchor" in note for note in notes)


def test_verdict_uses_both_limits():
    case = Case("dice", "monai DiceLoss", None, None, time_limit=0.7, memory_limit=0.5)
    assert Comparison(case, [0.6], [1.0], 40, 100).verdict().endswith(": met")
    assert "not met" in Comparison(case, [0.6], [1.0], 60, 100).verdict()
    assert "not met" in Comparison(case, [0.8], [1.0], 40, 100).verdict()
    assert Comparison(Case("focal", "monai FocalLoss", None, None), [2.0], [1.0], 1, 1).verdict() == ""


def test_metric_update_timings_are_paired_and_positive():
    from scripts.benchmark import metric_update_seconds

    ours, monai = metric_update_seconds((1, 4, 8, 8, 8), "class-index", torch.device("cpu"), repeats=3)
    assert len(ours) == len(monai) == 3  # the warm-up round is not counted
    assert all(t > 0 for t in ours + monai)


def test_metrics_table_has_one_row_per_label_format():
    import argparse

    from scripts.benchmark import run_metrics

    args = argparse.Namespace(device="cpu", shape="1,4,8,8,8", repeats=2, threads=1)
    table = run_metrics(args)
    rows = [line for line in table.splitlines() if line.startswith("| one-hot") or line.startswith("| class-index")]
    assert len(rows) == 2
    assert "OrganCounts.update" in table and "DiceMetric" in table


def test_inference_volumes_keep_the_field_of_view(tmp_path):
    import nibabel as nib
    import numpy as np

    from scripts.benchmark import write_benchmark_volumes
    from scripts.phantom import make_case

    voxels = write_benchmark_volumes(tmp_path, (40, 30, 20), count=1)
    written = nib.load(tmp_path / "case_00.nii.gz")
    image, _, affine = make_case(seed=1000)
    assert voxels == 40 * 30 * 20 and written.shape == (40, 30, 20)
    extent = lambda a, shape: np.abs(a[:3, :3] @ np.array(shape, dtype=float))  # noqa: E731
    np.testing.assert_allclose(extent(written.affine, written.shape), extent(affine, image.shape), rtol=1e-6)
    np.testing.assert_allclose(written.affine[:3, 3], affine[:3, 3])


def test_each_subcommand_has_its_own_repeat_default():
    from scripts.benchmark import build_parser

    parser = build_parser()
    assert parser.parse_args(["inference"]).repeats == 1  # minutes per run at full size
    assert parser.parse_args(["losses"]).repeats == 5
    assert parser.parse_args(["metrics", "--repeats", "3"]).repeats == 3


def test_inference_cases_parse_and_default_to_the_issue_sizes():
    import argparse

    import pytest

    from scripts.benchmark import build_parser, parse_case

    assert parse_case("2x512x512x200") == (2, (512, 512, 200))
    for bad in ("512x512x200", "2x512x512x0", "2x512xAx200"):
        with pytest.raises(argparse.ArgumentTypeError, match="VOLUMESxXxYxZ"):
            parse_case(bad)
    assert build_parser().parse_args(["inference"]).cases == [(2, (512, 512, 200)), (1, (512, 512, 800))]


def test_inference_reference_command_merges_the_model_zoo_postprocessing(tmp_path):
    from monai.bundle import ConfigParser

    from scripts.benchmark import inference_commands

    commands = inference_commands(tmp_path, "cpu")
    assert len(commands) == 3 and list(commands)[0] == "python -m scripts.infer"
    reference = commands[list(commands)[2]](tmp_path / "out")
    config_files = reference[reference.index("--config_file") + 1]
    parser = ConfigParser()
    parser.read_config(ConfigParser.load_config_files(eval(config_files)))  # the list monai.bundle run parses
    assert [t["_target_"] for t in parser["postprocessing#transforms"]][:3] == [
        "Activationsd",
        "Invertd",
        "AsDiscreted",
    ]
    ours = commands[list(commands)[1]](tmp_path / "out")
    assert (
        ConfigParser.load_config_file(ours[ours.index("--config_file") + 1])["postprocessing"]["transforms"][1][
            "_target_"
        ]
        == "scripts.lean_inverse.InvertArgmaxd"
    )


def test_measured_run_sees_the_memory_of_its_process_tree(tmp_path):
    import sys

    from scripts.benchmark import run_measured

    # the child keeps 300 MB resident in a grandchild, as scripts.infer keeps a volume in a loader worker
    grandchild = "import time; block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(1)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}], check=True)"
    run = run_measured([sys.executable, "-c", child], 1, None, tmp_path / "log")
    assert run.error is None and run.peak_rss_bytes >= 300 * 2**20 and run.seconds >= 1


def test_measured_run_over_the_memory_cap_fails_alone(tmp_path):
    import sys

    from scripts.benchmark import run_measured

    run = run_measured([sys.executable, "-c", "bytearray(2 * 2**30)"], 1, 1 * 2**30, tmp_path / "log")
    assert run.error is not None and "exit status 1" in run.error and "MemoryError" in run.error


def test_inference_table_ratios_and_a_reference_that_did_not_fit():
    from scripts.benchmark import Run, inference_table

    gib = 2**30
    names = ["script", "bundle", "reference"]
    fitted = {"script": [Run(10.0, 1 * gib)], "bundle": [Run(11.0, 1 * gib)], "reference": [Run(30.0, 4 * gib)]}
    lines = "\n".join(inference_table(1, (10, 10, 10), 3000, {n: fitted[n] for n in names}, 18))
    assert "| script | 10.0 | 1 of 1 | 1.00 | 300 |" in lines
    assert "0.25x (target <= 0.3x): met" in lines and "3.00x (target >= 2x): met" in lines
    assert "1.10x (target <= 1.2x): met" in lines

    failed = {**fitted, "reference": [Run(50.0, 17 * gib, "exit status 1: RuntimeError: can't allocate memory")]}
    lines = "\n".join(inference_table(1, (10, 10, 10), 3000, {n: failed[n] for n in names}, 18))
    assert "| reference | did not complete | 0 of 1 | | |" in lines
    assert "reference failed under the 18 GiB address-space cap: `exit status 1: RuntimeError" in lines
    assert "did not complete, so the ratios to it cannot be given" in lines and "not met" not in lines
