"""Two gloo processes on CPU count disjoint shares of the images; their synced scores equal one process's."""

import csv
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctlosses.organ_metrics import OVERLAP_METRICS, OrganCounts, OrganMetricsWriter

NUM_CLASSES = 4
SHARES = ([0, 1, 2], [3, 4])  # uneven on purpose: averaging the ranks' means would be wrong


def images():
    gen = torch.Generator().manual_seed(11)
    labels = torch.randint(0, NUM_CLASSES, (5, 1, 6, 5, 3), generator=gen)
    noise = torch.randint(0, NUM_CLASSES, labels.shape, generator=gen)
    preds = torch.where(torch.rand(labels.shape, generator=gen) < 0.7, labels, noise)
    labels[3][labels[3] == 2] = 0  # an organ absent from one image
    return preds, labels, [f"case_{i}" for i in range(len(labels))]


def count(indices, aggregation):
    preds, labels, names = images()
    counts = OrganCounts(num_classes=NUM_CLASSES, include_background=False, aggregation=aggregation)
    for i in indices:
        counts.update(preds[i : i + 1], labels[i : i + 1], names=[names[i]])
    return counts


def results(indices, csv_dir):
    out = {}
    for aggregation in ("per_image", "global"):
        counts = count(indices, aggregation)
        out[aggregation] = {m: counts.organ_scores(m) for m in OVERLAP_METRICS}
    out["image_counts"], out["names"] = counts.image_counts()
    OrganMetricsWriter(counts, output_dir=csv_dir, logger_name=None)(None)
    return out


def ddp_worker(rank, world_size, port, tmp_dir):
    os.environ["LOCAL_RANK"] = str(rank)  # ignite would guess it from host names, with a warning
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        out = results(SHARES[rank], tmp_dir / "ddp_csv")
        torch.save(out, tmp_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    single = results(SHARES[0] + SHARES[1], tmp_path / "single_csv")
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(ddp["image_counts"], single["image_counts"])
        assert ddp["names"] == single["names"] == [f"case_{i}" for i in range(5)]
        for aggregation in ("per_image", "global"):
            for metric in OVERLAP_METRICS:
                ddp_organs, ddp_mean = ddp[aggregation][metric]
                organs, mean = single[aggregation][metric]
                torch.testing.assert_close(ddp_organs, organs, atol=1e-12, rtol=0, equal_nan=True)
                assert ddp_mean == pytest.approx(mean, abs=1e-12)

    # the naive reduction (mean of each rank's mean) differs, so the test above can fail
    rank_means = [count(share, "per_image").organ_scores("dice")[1] for share in SHARES]
    assert abs(sum(rank_means) / 2 - single["per_image"]["dice"][1]) > 1e-3

    # rank 0 alone wrote the CSV, with every rank's images
    assert sorted(p.name for p in (tmp_path / "ddp_csv").iterdir()) == [
        "organ_metrics.csv",
        "organ_metrics_summary.csv",
    ]

    def rows(folder):
        with open(tmp_path / folder / "organ_metrics.csv") as f:
            return list(csv.reader(f))

    assert rows("ddp_csv") == rows("single_csv")
