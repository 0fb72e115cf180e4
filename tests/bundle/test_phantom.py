"""The synthetic CT phantom: deterministic, anatomically placed in RAS+ whatever the stored orientation, every
organ present, small organs small, plausible Hounsfield values, an MSD-style dataset.json."""

import json

import nibabel as nib
import numpy as np
import pytest

from scripts.phantom import LABELS, ORIENTATIONS, generate, make_case


@pytest.fixture(scope="module")
def cases():
    # seeds 0..3 cover the four stored orientations (seed % 4 picks one)
    return {seed: make_case(seed) for seed in range(4)}


def _world_centroid(label, affine, organ):
    ijk = np.argwhere(label == organ)
    return (affine[:3, :3] @ ijk.mean(0)) + affine[:3, 3]


def test_same_seed_same_case(cases):
    image, label, affine = make_case(1)
    np.testing.assert_array_equal(image, cases[1][0])
    np.testing.assert_array_equal(label, cases[1][1])
    np.testing.assert_array_equal(affine, cases[1][2])
    assert not np.array_equal(cases[0][1].shape, cases[1][1].shape) or not np.array_equal(cases[0][1], cases[1][1])


def test_orientations_and_spacing_vary(cases):
    codes = {nib.aff2axcodes(affine) for _, _, affine in cases.values()}
    assert len(codes) == len(ORIENTATIONS)
    assert len({tuple(np.round(np.abs(np.diag(a)[:3]), 3)) for _, _, a in cases.values()}) > 1


@pytest.mark.parametrize("seed", range(4))
def test_every_organ_present_and_small_organs_small(cases, seed):
    image, label, _ = cases[seed]
    fraction = np.bincount(label.ravel(), minlength=14) / label.size
    assert set(np.unique(label)) == set(LABELS)
    assert fraction[6] == fraction[1:].max()  # the liver is the largest organ
    for small in (4, 5, 10, 12, 13):  # gallbladder, esophagus, veins, adrenals
        assert fraction[small] < 0.003, (LABELS[small], fraction[small])
    for adrenal in (12, 13):
        assert fraction[adrenal] < fraction[2] / 10  # far smaller than a kidney
    assert image.dtype == np.int16 and label.dtype == np.uint8


@pytest.mark.parametrize("seed", range(4))
def test_organs_on_their_anatomical_side_in_world_space(cases, seed):
    # RAS+: x grows towards the patient's right, y anterior, z superior, whatever the voxel order on disk
    _, label, affine = cases[seed]
    x = {organ: _world_centroid(label, affine, organ)[0] for organ in range(1, 14)}
    for right, left in ((6, 1), (2, 3), (12, 13), (9, 8)):  # liver/spleen, kidneys, adrenals, IVC/aorta
        assert x[right] > x[left], (LABELS[right], LABELS[left])
    z = {organ: _world_centroid(label, affine, organ)[2] for organ in (2, 12, 5, 11)}
    assert z[12] > z[2] and z[5] > z[11]  # adrenal above kidney, esophagus above pancreas
    y = {organ: _world_centroid(label, affine, organ)[1] for organ in (2, 4)}
    assert y[4] > y[2]  # gallbladder anterior to the kidney


def test_hounsfield_values_plausible(cases):
    image, label, _ = cases[2]
    mean = {organ: image[label == organ].mean() for organ in range(1, 14)}
    assert 80 < mean[6] < 130 and 150 < mean[8] < 220 and -30 < mean[4] < 50  # liver, aorta, gallbladder
    assert image.min() <= -990  # air outside the body
    body = (label == 0) & (image > -500)
    assert (image[body] < -50).mean() > 0.1  # fat is there
    assert (image[body] > 20).mean() > 0.1  # muscle, bowel and bone are there


def test_generate_writes_msd_dataset(tmp_path):
    out = generate(tmp_path / "p", num_cases=3, num_validation=1, spacing_scale=2.5)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {str(k): v for k, v in LABELS.items()}
    assert len(dataset["training"]) == 2 and len(dataset["validation"]) == 1
    first = dataset["training"][0]
    image, label = nib.load(out / first["image"]), nib.load(out / first["label"])
    assert image.shape == label.shape
    np.testing.assert_allclose(image.affine, label.affine)
    again = generate(tmp_path / "q", num_cases=3, num_validation=1, spacing_scale=2.5)
    np.testing.assert_array_equal(np.asanyarray(nib.load(again / first["label"]).dataobj), np.asanyarray(label.dataobj))
    assert not list(out.rglob(".tmp_*"))


def test_generate_rejects_bad_split(tmp_path):
    with pytest.raises(ValueError, match="num_validation"):
        generate(tmp_path, num_cases=2, num_validation=2)
