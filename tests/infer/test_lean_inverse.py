"""``scripts.lean_inverse.InvertArgmaxd``: the labels of the model zoo's ``Activationsd -> Invertd -> AsDiscreted``
on every grid, never more than ``chunk_size`` full-resolution channels at once, and the configs that use it."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, SaveImaged
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import scripts.lean_inverse as lean_inverse
from scripts.lean_inverse import InvertArgmaxd

CONFIGS = BUNDLE_ROOT / "configs"
REFERENCE = CONFIGS / "reference" / "inference_invertd.json"
NUM_CLASSES = 14


def rotation(z_degrees: float, x_degrees: float) -> np.ndarray:
    z, x = np.radians(z_degrees), np.radians(x_degrees)
    about_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return about_z @ about_x


def affine_of(columns: np.ndarray, origin=(-40.0, 30.0, -25.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = columns, origin
    return affine


# (shape, affine): odd sizes, anisotropic voxels, each orientation the preprocessing has to undo differently
GRIDS = {
    "ras": ((45, 37, 19), affine_of(np.diag([1.5, 1.5, 4.0]))),
    "lps": ((63, 51, 21), affine_of(np.diag([-0.9, -0.9, 2.5]))),
    "permuted": ((23, 41, 35), affine_of(np.diag([1.3, 1.7, 3.5])[:, [2, 0, 1]])),  # voxel axis 0 along world z
    "oblique": ((39, 33, 17), affine_of(rotation(17.0, 9.0) @ np.diag([1.2, 1.4, 3.0]))),
    # fine voxels: the full-resolution grid holds many more voxels than the 3 mm network grid, as a real CT does
    "fine": ((61, 53, 29), affine_of(np.diag([-0.8, 0.8, 1.5]))),
}


def write_ct(folder, name: str, shape, affine, seed: int = 0) -> str:
    """A CT-like image (air around a soft-tissue ball) on the given grid; only its geometry matters here."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    image = np.where((grid**2).sum(0) < 0.8, 40.0, -1000.0) + rng.normal(0, 10, shape)
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(path))
    return str(path)


def parsed(*files) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    return parser


def without_save(postprocessing: Compose) -> list:
    return [t for t in postprocessing.transforms if not isinstance(t, SaveImaged)]


def smooth_logits(shape, seed: int, scale: float = 4.0) -> torch.Tensor:
    """Logits that vary like a network's (smooth, several classes competing at every boundary)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, NUM_CLASSES, *shape, generator=generator)
    return F.avg_pool3d(noise, 3, stride=1, padding=1, count_include_pad=False)[0] * scale


def preprocessed_with_pred(parser: ConfigParser, path: str, logits: torch.Tensor | None = None, seed: int = 0) -> dict:
    data = parser.get_parsed_content("preprocessing")({"image": path})
    if logits is None:
        logits = smooth_logits(data["image"].shape[1:], seed)
    data["pred"] = MetaTensor(logits.clone(), meta=data["image"].meta)
    return data


def exact_ties(probabilities: torch.Tensor) -> torch.Tensor:
    """Voxels whose two largest probabilities are exactly equal: the only ones where two correct argmaxes may
    differ."""
    top_two = probabilities.topk(2, dim=0).values
    return top_two[0] == top_two[1]


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("grids")
    return {name: write_ct(folder, name, shape, affine) for name, (shape, affine) in GRIDS.items()}


# ------------------------------------------------------------------------------------------------ same voxels


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_config_labels_equal_the_model_zoo_postprocessing(ct_files, name, record_property):
    """inference.json's postprocessing against the kept copy of the model zoo's, each with its own instance of the
    preprocessing (the inverse checks that the operations were recorded by the same instance)."""
    ours = parsed(CONFIGS / "inference.json")
    reference = parsed(CONFIGS / "inference.json", REFERENCE)
    ours_data = preprocessed_with_pred(ours, ct_files[name])
    reference_data = preprocessed_with_pred(reference, ct_files[name])
    assert torch.equal(ours_data["image"].as_tensor(), reference_data["image"].as_tensor())

    activations, invert, argmax = without_save(reference.get_parsed_content("postprocessing"))
    assert [type(t).__name__ for t in (activations, invert, argmax)] == ["Activationsd", "Invertd", "AsDiscreted"]
    probabilities = invert(activations(reference_data))["pred"]
    expected = argmax({"pred": probabilities})["pred"]
    labels = Compose(without_save(ours.get_parsed_content("postprocessing")))(ours_data)["pred"]

    shape, affine = GRIDS[name]
    assert labels.shape == expected.shape == (1, *shape) and labels.dtype == expected.dtype
    np.testing.assert_allclose(labels.affine.numpy(), affine, atol=1e-6)
    np.testing.assert_allclose(labels.affine.numpy(), expected.affine.numpy(), atol=0)
    assert labels.meta["filename_or_obj"] == expected.meta["filename_or_obj"]
    assert len(torch.unique(expected)) >= 4, "a near-constant label map would make the comparison vacuous"

    ties = exact_ties(probabilities.as_tensor())
    differ = labels.as_tensor()[0] != expected.as_tensor()[0]
    record_property("exact_ties", int(ties.sum()))
    print(f"{name}: {int(ties.sum())} exact ties, {int(differ.sum())} differing voxels of {differ.numel()}")
    assert not (differ & ~ties).any(), "labels differ where the reference's probabilities are not tied"
    assert int(differ.sum()) <= 1e-6 * differ.numel()
    assert int(ties.sum()) < 1e-6 * ties.numel(), f"{int(ties.sum())} exact ties: the logits are degenerate"


PATHS = [(1, 500), (3, 2000), (14, 10**9), (1, None), (5, None)]  # (chunk_size, slab_voxels); None: whole volumes


@pytest.mark.parametrize(("chunk_size", "slab_voxels"), PATHS)
def test_every_chunk_and_slab_size_gives_the_same_labels(ct_files, chunk_size, slab_voxels):
    parser = parsed(CONFIGS / "inference.json")
    preprocessing = parser.get_parsed_content("preprocessing")
    data = Activationsd("pred", softmax=True)(preprocessed_with_pred(parser, ct_files["oblique"], seed=1))
    reference = Compose(
        [Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False), AsDiscreted("pred", argmax=True)]
    )(dict(data))["pred"]
    labels = InvertArgmaxd("pred", preprocessing, "image", chunk_size=chunk_size, slab_voxels=slab_voxels)(dict(data))[
        "pred"
    ]
    assert torch.equal(labels.as_tensor(), reference.as_tensor())
    np.testing.assert_allclose(labels.affine.numpy(), reference.affine.numpy(), atol=0)


def test_the_bundles_preprocessing_takes_the_slab_path_and_others_the_whole_volume(ct_files):
    """The slab path needs every operation before the last resampling to be a voxel permutation; a second
    resampling before it (here a Spacingd to 2 mm, then the config's to 3 mm) takes whole volumes, same labels."""
    parser = parsed(CONFIGS / "inference.json")
    data = preprocessed_with_pred(parser, ct_files["lps"])
    assert lean_inverse.inverse_stages(parser.get_parsed_content("preprocessing"), data["image"], "image")

    steps = [dict(step) for step in parser["preprocessing#transforms"]]
    index = next(i for i, step in enumerate(steps) if step["_target_"] == "Spacingd")
    steps.insert(index, {**steps[index], "pixdim": [2.0, 2.0, 2.0]})
    parser["preprocessing#transforms"] = steps
    preprocessing = parser.get_parsed_content("preprocessing", lazy=False)
    twice = preprocessing({"image": ct_files["lps"]})
    twice["pred"] = MetaTensor(smooth_logits(twice["image"].shape[1:], seed=6), meta=twice["image"].meta)
    assert [op["class"] for op in twice["image"].applied_operations] == [
        "Orientation",
        "SpatialResample",
        "SpatialResample",
    ]
    assert lean_inverse.inverse_stages(preprocessing, twice["image"], "image") is None
    probabilities = Activationsd("pred", softmax=True)(twice)
    reference = Compose(
        [Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False), AsDiscreted("pred", argmax=True)]
    )(dict(probabilities))["pred"]
    labels = InvertArgmaxd("pred", preprocessing, "image", chunk_size=3)(dict(probabilities))["pred"]
    assert labels.shape == (1, *GRIDS["lps"][0]) and torch.equal(labels.as_tensor(), reference.as_tensor())


def test_ties_go_to_the_lowest_channel_as_in_argmax(ct_files):
    """Channel 9 is a copy of channel 2, so wherever channel 2 wins, 9 ties with it: argmax says 2, and so must
    the running maximum (a ``>=`` update would say 9)."""
    parser = parsed(CONFIGS / "inference.json")
    preprocessing = parser.get_parsed_content("preprocessing")
    data = preprocessing({"image": ct_files["lps"]})
    logits = smooth_logits(data["image"].shape[1:], seed=2)
    logits[9] = logits[2]
    data["pred"] = MetaTensor(torch.softmax(logits, 0), meta=data["image"].meta)  # as the inferer gives it
    reference = Compose(
        [Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False), AsDiscreted("pred", argmax=True)]
    )(dict(data))["pred"]
    assert (reference == 2).sum() > 100 and not (reference == 9).any()
    for chunk_size, slab_voxels in ((4, 1000), (4, None), (14, 10**9)):
        labels = InvertArgmaxd("pred", preprocessing, "image", chunk_size=chunk_size, slab_voxels=slab_voxels)(
            dict(data)
        )["pred"]
        assert torch.equal(labels.as_tensor(), reference.as_tensor()), (chunk_size, slab_voxels)


def test_evaluate_json_inverts_pred_and_label_as_before(tmp_path):
    """evaluate.json (over train.json) with CropForegroundd in the preprocessing: the chunked labels equal
    the former ``Invertd(["pred", "label"])`` + ``AsDiscreted``, and the label is still inverted by nearest.
    Voxels cropped away are 0 in every channel after the inverse: an exact tie that both resolve to 0."""
    shape, affine = GRIDS["lps"]
    image = write_ct(tmp_path, "image", shape, affine)
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image((np.asanyarray(nib.load(image).dataobj) > 0).astype(np.uint8), affine), str(label))
    parser = parsed(CONFIGS / "train.json", CONFIGS / "evaluate.json")
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    postprocessing = parser.get_parsed_content("validate#postprocessing")  # without the disabled SaveImaged
    assert [type(t).__name__ for t in postprocessing.transforms] == ["Activationsd", "InvertArgmaxd", "Invertd"]
    # scripts/study.py enables the writer as "validate#postprocessing#transforms#3"
    assert parser["validate#postprocessing#transforms#3#_target_"] == "SaveImaged"
    assert postprocessing.transforms[1].transform is preprocessing
    data = preprocessing({"image": image, "label": str(label)})
    assert any(op["class"] == "CropForeground" for op in data["image"].applied_operations)
    data["pred"] = MetaTensor(smooth_logits(data["image"].shape[1:], seed=3), meta=data["image"].meta)

    former = Compose(
        [
            Activationsd("pred", softmax=True),
            Invertd(["pred", "label"], preprocessing, orig_keys="image", nearest_interp=[False, True]),
            AsDiscreted("pred", argmax=True),
        ]
    )(dict(data))
    ours = Compose(postprocessing.transforms[:3])(dict(data))
    assert ours["pred"].shape == (1, *shape)
    assert torch.equal(ours["pred"].as_tensor(), former["pred"].as_tensor())
    assert torch.equal(ours["label"].as_tensor(), former["label"].as_tensor())


def banded_logits(shape, seed: int) -> torch.Tensor:
    """Organs that each occupy a band of slices (channel j near slice j of 13, in world z after the preprocessing's
    RAS orientation), so most channels cannot win in most slabs, and smooth noise everywhere."""
    z = torch.linspace(0, 1, shape[-1], dtype=torch.float64)
    centres = torch.linspace(0, 1, NUM_CLASSES - 1, dtype=torch.float64)
    bands = 9.0 * torch.exp(-(((z[None] - centres[:, None]) / 0.06) ** 2))
    logits = smooth_logits(shape, seed, scale=1.0).double()
    logits[1:] += bands[:, None, None, :] - 4.0
    # the top fifth has neither organs nor a leading background: near-uniform channels, winners just above 1/C
    top = z > 0.8
    logits[1:, ..., top] = logits[0, ..., top] + smooth_logits(shape, seed + 1, scale=0.5)[1:, ..., top].double()
    return logits.float()


@pytest.mark.parametrize("name", ["fine", "oblique", "lps"])
@pytest.mark.parametrize(("chunk_size", "slab_voxels"), [(1, 3000), (14, 6000)])
def test_channels_that_cannot_win_in_a_slab_are_skipped_with_the_same_labels(
    ct_files, monkeypatch, name, chunk_size, slab_voxels
):
    parser = parsed(CONFIGS / "inference.json")
    preprocessing = parser.get_parsed_content("preprocessing")
    data = preprocessing({"image": ct_files[name]})
    data["pred"] = MetaTensor(banded_logits(data["image"].shape[1:], seed=7), meta=data["image"].meta)
    data = Activationsd("pred", softmax=True)(data)
    reference = Compose(
        [Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False), AsDiscreted("pred", argmax=True)]
    )(dict(data))["pred"]
    resampled = []
    resample_slab = lean_inverse.resample_slab

    def counting(channels, *args):
        resampled.append(channels.shape[0])
        return resample_slab(channels, *args)

    monkeypatch.setattr(lean_inverse, "resample_slab", counting)
    labels = InvertArgmaxd("pred", preprocessing, "image", chunk_size=chunk_size, slab_voxels=slab_voxels)(dict(data))[
        "pred"
    ]
    assert len(torch.unique(reference)) >= 8, "the bands should give most organs a place to win"
    assert torch.equal(labels.as_tensor(), reference.as_tensor())
    slabs = math.ceil(
        data["image"].applied_operations[-1]["orig_size"][-1]
        / max(1, slab_voxels // math.prod(data["image"].applied_operations[-1]["orig_size"][:-1]))
    )
    assert sum(resampled) < NUM_CLASSES * slabs, "no channel was skipped"
    if name == "fine":  # axis-aligned slabs reach few network slices: most organs are out of reach
        assert sum(resampled) < 0.75 * NUM_CLASSES * slabs


def test_a_channel_just_below_one_over_c_is_skipped_and_one_just_above_is_kept():
    probabilities = torch.full((4, 3, 3, 3), 0.3)
    probabilities[3] = 0.1
    probabilities[2] = 0.2497  # below 1/4 by more than the rounding margin
    probabilities[1] = 1 - probabilities[0] - probabilities[2] - probabilities[3]  # every voxel sums to 1
    box = (slice(0, 3),) * 3
    assert lean_inverse.contending_channels(probabilities, box).tolist() == [0, 1]
    probabilities[2, 1, 1, 1], probabilities[1, 1, 1, 1] = 0.2501, 0.3499
    assert lean_inverse.contending_channels(probabilities, box).tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ memory bound


class ChannelStacks(TorchDispatchMode):
    """Watches every tensor that any operation returns and keeps the largest number of full-resolution channels
    held by one of them: a tensor whose last three dimensions are the full-resolution grid (in any axis order,
    as before the orientation is undone). MONAI's sampling grid (``... x 3`` coordinates) is not a channel stack."""

    def __init__(self, full_shape) -> None:
        super().__init__()
        self.full_shape, self.voxels, self.most = sorted(full_shape), math.prod(full_shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 3 and sorted(tensor.shape[-3:]) == self.full_shape:
                self.most = max(self.most, tensor.numel() // self.voxels)
        return out


class LargestTensor(TorchDispatchMode):
    """Watches every tensor that any operation returns and keeps the largest number of elements of one."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.most = max([self.most, *sizes])
        return out


def expected_chunks(chunk_size: int) -> list[int]:
    return [chunk_size] * (NUM_CLASSES // chunk_size) + [NUM_CLASSES % chunk_size] * (NUM_CLASSES % chunk_size > 0)


@pytest.fixture
def fine_probabilities(ct_files):
    parser = parsed(CONFIGS / "inference.json")
    preprocessing = parser.get_parsed_content("preprocessing")
    data = Activationsd("pred", softmax=True)(preprocessed_with_pred(parser, ct_files["fine"], seed=4))
    assert NUM_CLASSES * data["image"][0].numel() < math.prod(GRIDS["fine"][0])  # the probe below needs it
    return preprocessing, data, GRIDS["fine"][0]


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_whole_volumes_never_hold_more_than_chunk_size_full_resolution_channels(
    fine_probabilities, monkeypatch, chunk_size
):
    """Whole-volume path: one call of the per-chunk inverse per chunk, each with ``chunk_size`` channels at most,
    and no operation makes a full-resolution tensor of more than ``chunk_size`` channels, where the model zoo's
    pipeline makes one of all 14 (the probe can fail)."""
    preprocessing, data, full_shape = fine_probabilities
    chunks = []
    invert_channels = lean_inverse.invert_channels

    def counting(channels, *args):
        chunks.append(channels.shape[0])
        return invert_channels(channels, *args)

    monkeypatch.setattr(lean_inverse, "invert_channels", counting)
    with ChannelStacks(full_shape) as ours:
        labels = InvertArgmaxd("pred", preprocessing, "image", chunk_size=chunk_size, slab_voxels=None)(dict(data))[
            "pred"
        ]
    assert labels.shape == (1, *full_shape)
    assert chunks == expected_chunks(chunk_size)
    assert 1 <= ours.most <= chunk_size

    with ChannelStacks(full_shape) as reference:
        Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False)(dict(data))
    assert reference.most >= NUM_CLASSES


@pytest.mark.parametrize("chunk_size", [1, 14])
def test_slabs_never_hold_more_than_one_full_resolution_channel(fine_probabilities, monkeypatch, chunk_size):
    """The stand-in for a 512 x 512 x 800 volume: slabs of two slices (``slab_voxels`` = 2 slices' worth of the
    resampled grid), every slab resampled once per chunk of ``chunk_size`` channels; the largest tensor any
    operation makes (the label map) holds no more than one full-resolution channel, where the model zoo's
    pipeline makes one of over 14."""
    preprocessing, data, full_shape = fine_probabilities
    voxels = math.prod(full_shape)
    resampled_shape = tuple(data["image"].applied_operations[-1]["orig_size"])  # the RAS grid before Spacingd
    slab_voxels = 2 * math.prod(resampled_shape[:-1])
    calls = []
    resample_slab = lean_inverse.resample_slab

    def counting(channels, network_grid, resample, orig_key, start, stop):
        calls.append((channels.shape[0], stop - start))
        return resample_slab(channels, network_grid, resample, orig_key, start, stop)

    monkeypatch.setattr(lean_inverse, "resample_slab", counting)
    with LargestTensor() as ours:
        labels = InvertArgmaxd("pred", preprocessing, "image", chunk_size=chunk_size, slab_voxels=slab_voxels)(
            dict(data)
        )["pred"]
    assert labels.shape == (1, *full_shape)
    slabs = math.ceil(resampled_shape[-1] / 2)
    assert [c for c, _ in calls] == expected_chunks(chunk_size) * slabs
    assert {d for _, d in calls} <= {1, 2} and sum(d for _, d in calls) == resampled_shape[-1] * len(
        expected_chunks(chunk_size)
    )
    assert ours.most <= voxels

    with LargestTensor() as reference:
        Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False)(dict(data))
    assert reference.most >= NUM_CLASSES * voxels


# ------------------------------------------------------------------------------------------------ bad input


def test_non_finite_network_output_is_an_error_naming_the_image(ct_files):
    parser = parsed(CONFIGS / "inference.json")
    data = preprocessed_with_pred(parser, ct_files["ras"])
    data["pred"][3, 2, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"ras\.nii\.gz.*NaN"):
        InvertArgmaxd("pred", parser.get_parsed_content("preprocessing"), "image")(data)


def test_missing_applied_operations_is_an_error():
    from monai.transforms import Orientationd

    with pytest.raises(ValueError, match="MetaTensor"):
        InvertArgmaxd("pred", Orientationd("image", "RAS"), "image")(
            {"pred": torch.rand(3, 4, 4, 4), "image": np.zeros((1, 4, 4, 4))}
        )
    with pytest.raises(ValueError, match="chunk_size"):
        InvertArgmaxd("pred", Orientationd("image", "RAS"), "image", chunk_size=0)


# ------------------------------------------------------------------------------------------------ separable resampling


@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
@pytest.mark.parametrize("name", ["lps", "permuted", "fine"])
def test_slabs_resampled_axis_by_axis_equal_monais_inverse_to_one_float32_step(ct_files, name, padding_mode):
    """``Spacingd`` keeps every axis's direction, so undoing it on an axis-aligned scan maps axis to axis and the
    slab path resamples one axis at a time. Same weights as MONAI's ``grid_sample`` in float64: at most one float32
    rounding step apart, at every slab position, for both padding modes."""
    parser = parsed(CONFIGS / "inference.json")
    steps = [dict(step) for step in parser["preprocessing#transforms"]]
    index = next(i for i, step in enumerate(steps) if step["_target_"] == "Spacingd")
    steps[index]["padding_mode"] = padding_mode
    parser["preprocessing#transforms"] = steps
    preprocessing = parser.get_parsed_content("preprocessing", lazy=False)
    image = preprocessing({"image": ct_files[name]})["image"]
    stages = lean_inverse.inverse_stages(preprocessing, image, "image")
    network_grid = lean_inverse.undo(
        stages.after,
        MetaTensor(torch.rand(3, *image.shape[1:]), meta=image.meta, applied_operations=image.applied_operations),
        "image",
    )
    depth = network_grid.applied_operations[-1]["orig_size"][-1]
    for start, stop in ((0, depth), (0, 1), (depth // 2, depth // 2 + 3), (depth - 2, depth)):
        fast = lean_inverse.resample_slab(network_grid.as_tensor(), network_grid, stages.resample, "image", start, stop)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lean_inverse, "axis_aligned", lambda xform, shape: False)  # MONAI's own inverse
            slow = lean_inverse.resample_slab(
                network_grid.as_tensor(), network_grid, stages.resample, "image", start, stop
            )
        assert fast.shape == slow.shape and fast.dtype == slow.dtype == torch.float32
        assert (fast - slow).abs().max() <= 2**-24, (start, stop)  # one float32 step at values in [0.5, 1)
        assert (fast != slow).float().mean() < 0.01


def test_axis_aligned_grids_take_the_separable_path_and_oblique_ones_monais(ct_files, monkeypatch):
    """Every axis-aligned grid of the identity tests above goes through ``separable_resample``; the oblique one,
    whose float32 sform leaves cross terms of about 1e-8 between the axes, through MONAI's inverse."""
    calls = []
    original = lean_inverse.separable_resample
    monkeypatch.setattr(lean_inverse, "separable_resample", lambda *a, **k: calls.append(1) or original(*a, **k))
    parser = parsed(CONFIGS / "inference.json")
    postprocessing = Compose(without_save(parser.get_parsed_content("postprocessing")))
    for name in sorted(GRIDS):
        before = len(calls)
        postprocessing(preprocessed_with_pred(parser, ct_files[name]))
        assert (len(calls) > before) == (name != "oblique"), name


def test_interpolation_matrix_rows_are_grid_samples_weights():
    """1D weights at positions inside, on and beyond both edges: "border" clamps, "zeros" drops the outside tap."""
    positions = torch.tensor([-1.5, -0.25, 0.0, 1.75, 3.0, 3.5], dtype=torch.float64)
    border = lean_inverse.interpolation_matrix(positions, 4, "border", torch.float64)
    zeros = lean_inverse.interpolation_matrix(positions, 4, "zeros", torch.float64)
    expected_border = [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0.25, 0.75, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    expected_zeros = [[0, 0, 0, 0], [0.75, 0, 0, 0], [1, 0, 0, 0], [0, 0.25, 0.75, 0], [0, 0, 0, 1], [0, 0, 0, 0.5]]
    assert border.tolist() == expected_border and zeros.tolist() == expected_zeros
    values = torch.tensor([[[1.0, 2.0, 4.0, 8.0]]], dtype=torch.float64)  # N C W for grid_sample
    for mode, matrix in (("border", border), ("zeros", zeros)):
        grid = torch.stack([(2 * positions + 1) / 4 - 1, torch.zeros_like(positions)], -1)[None, None]  # voxel centres
        sampled = F.grid_sample(values[..., None, :], grid, padding_mode=mode, align_corners=False)
        torch.testing.assert_close(matrix @ values[0, 0], sampled.flatten(), rtol=0, atol=1e-12)
