"""Tests of scripts/benchmark.py's bookkeeping: the markdown blocks, the CPU memory measurement and the case list
(no timings are asserted)."""

from __future__ import annotations

import torch

from scripts.benchmark import Case, Comparison, loss_cases, peak_extra_bytes, write_block
from scripts.losses import LOSSES


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
