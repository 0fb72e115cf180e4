"""Where ``scripts.infer`` stitches the sliding windows on CUDA: on the device when the network-grid output fits
in its available memory, else in host memory (the decision and its log line; no GPU needed)."""

from __future__ import annotations

import torch
from monai.inferers import SlidingWindowInferer

from scripts.infer import STITCHING_SHARE, choose_stitching, stitching_bytes

CUDA = torch.device("cuda", 0)
GIB = 2**30


def inferer() -> SlidingWindowInferer:
    return SlidingWindowInferer(roi_size=(48, 48, 48), sw_batch_size=4, overlap=0.25)


def test_stitching_bytes_counts_output_softmax_and_count_map():
    # 14 float32 channels of output, 14 of softmax, 1 count map
    assert stitching_bytes((100, 100, 100), 14) == 29 * 10**6 * 4


def test_an_output_that_fits_is_stitched_on_the_device():
    sliding = inferer()
    shape = (171, 171, 67)  # 512 x 512 x 200 at 3 mm from 1 mm: 0.23 GiB of output + softmax + count map
    line = choose_stitching(sliding, CUDA, shape, 14, "ct.nii.gz", available=8 * GIB)
    assert sliding.sw_device == CUDA and sliding.device == CUDA
    assert line.startswith("ct.nii.gz: sliding windows on cuda:0, stitched on cuda:0") and "<= 80% of 8.00 GiB" in line


def test_an_output_that_does_not_fit_is_stitched_in_host_memory():
    sliding = inferer()
    shape = (512, 512, 800)  # a whole-body CT kept at full resolution: 23 GiB of stitching
    line = choose_stitching(sliding, CUDA, shape, 14, "wb.nii.gz", available=8 * GIB)
    assert sliding.sw_device == CUDA and sliding.device == torch.device("cpu")
    assert "stitched in host memory" in line and "> 80% of 8.00 GiB" in line


def test_the_boundary_is_the_share_of_available_memory():
    shape, classes = (64, 64, 64), 14
    needed = stitching_bytes(shape, classes)
    enough, too_little = inferer(), inferer()
    choose_stitching(enough, CUDA, shape, classes, "a", available=int(needed / STITCHING_SHARE) + 1)
    choose_stitching(too_little, CUDA, shape, classes, "b", available=int(needed / STITCHING_SHARE) - 1)
    assert enough.device == CUDA and too_little.device == torch.device("cpu")


def test_cpu_runs_leave_the_inferer_as_configured():
    sliding = inferer()
    assert choose_stitching(sliding, torch.device("cpu"), (512, 512, 800), 14, "ct.nii.gz", available=1) is None
    assert sliding.sw_device is None and sliding.device is None
