"""Counts and scores of ctlosses.organ_metrics: differential against MONAI, hand-built cases, bad input, names."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ignite.exceptions import NotComputableError
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot

from ctlosses.organ_metrics import OrganCounts, overlap_counts, overlap_scores, read_organ_names, reduce_scores


def random_labels(seed, batch, num_classes, spatial, dropped=()):
    """Random class-index maps ``B1[spatial]`` with some classes removed, so that some classes are empty."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, num_classes, (batch, 1, *spatial), generator=gen)
    for b, c in dropped:
        x[b][x[b] == c] = 0
    return x


def monai_reference(metric_cls, pred_index, label_index, num_classes, include_background, ignore_empty):
    """MONAI's per-image scores (reduction "none"), per-class means ("mean_batch") and overall mean ("mean")."""
    results = {}
    for reduction in ("none", "mean_batch", "mean"):
        metric = metric_cls(include_background=include_background, reduction=reduction, ignore_empty=ignore_empty)
        metric(one_hot(pred_index, num_classes), one_hot(label_index, num_classes))
        results[reduction] = metric.aggregate().double().clone()
    not_nans = (~torch.isnan(results["none"])).sum(0)
    return results["none"], results["mean_batch"], not_nans, results["mean"].item()


def as_format(index, num_classes, fmt):
    return {"index": index, "onehot": one_hot(index, num_classes), "float_index": index.float()}[fmt]


@given(
    seed=st.integers(0, 2**16),
    num_classes=st.integers(2, 6),
    spatial=st.sampled_from([(7, 9), (5, 6, 4), (1, 13), (3, 1, 8)]),
    include_background=st.booleans(),
    ignore_empty=st.booleans(),
    pred_format=st.sampled_from(["index", "onehot", "float_index"]),
    label_format=st.sampled_from(["index", "onehot", "float_index"]),
    dropped=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5)), max_size=4),
    empty_image=st.booleans(),
)
def test_matches_monai_dice_and_mean_iou(
    seed, num_classes, spatial, include_background, ignore_empty, pred_format, label_format, dropped, empty_image
):
    """Per-image, per-organ and mean Dice and IoU equal MONAI's DiceMetric and MeanIoU, empty classes included."""
    batch = 3
    label = random_labels(seed, batch, num_classes, spatial, dropped)
    pred = random_labels(seed + 1, batch, num_classes, spatial, dropped[::-1])
    if empty_image:  # an image with nothing but background, in prediction and label
        label[1], pred[1] = 0, 0
    counts = OrganCounts(num_classes=num_classes, include_background=include_background, ignore_empty=ignore_empty)
    counts.update(as_format(pred, num_classes, pred_format), as_format(label, num_classes, label_format))
    for metric, monai_cls in (("dice", DiceMetric), ("iou", MeanIoU)):
        per_image, per_class, not_nans, mean = monai_reference(
            monai_cls, pred, label, num_classes, include_background, ignore_empty
        )
        ours = counts.image_scores(metric)
        torch.testing.assert_close(ours, per_image, atol=1e-6, rtol=0, equal_nan=True)
        our_per_class, our_mean = counts.organ_scores(metric)
        # MONAI reports 0 for a class valid in no image; we report NaN (documented)
        torch.testing.assert_close(our_per_class[not_nans > 0], per_class[not_nans > 0], atol=1e-6, rtol=0)
        assert torch.isnan(our_per_class[not_nans == 0]).all()
        assert math.isclose(our_mean, mean, abs_tol=1e-6)


@given(
    seed=st.integers(0, 2**16),
    num_classes=st.integers(2, 6),
    include_background=st.booleans(),
    dropped=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5)), max_size=6),
)
def test_global_aggregation_is_monai_on_the_images_side_by_side(seed, num_classes, include_background, dropped):
    """Pooling the voxels of all images equals scoring one image made of all of them, side by side."""
    label = random_labels(seed, 3, num_classes, (5, 4), dropped)
    pred = random_labels(seed + 1, 3, num_classes, (5, 4), dropped)
    counts = OrganCounts(num_classes=num_classes, include_background=include_background, aggregation="global")
    counts.update(pred, label)
    side_by_side = [torch.cat(list(x), dim=-1)[None] for x in (pred, label)]  # 1 x 1 x 5 x 12
    for metric, monai_cls in (("dice", DiceMetric), ("iou", MeanIoU)):
        per_image, _, _, mean = monai_reference(monai_cls, *side_by_side, num_classes, include_background, True)
        per_organ, our_mean = counts.organ_scores(metric)
        torch.testing.assert_close(per_organ, per_image[0], atol=1e-6, rtol=0, equal_nan=True)
        assert math.isclose(our_mean, mean, abs_tol=1e-6)


@given(seed=st.integers(0, 2**16), num_classes=st.integers(2, 5), include_background=st.booleans())
def test_multilabel_and_partly_empty_one_hot_match_monai(seed, num_classes, include_background):
    """One-hot maps that are not exclusive (overlapping channels, voxels with no class) take the mask path,
    against a multi-label or a class-index label."""
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.rand(2, num_classes, 6, 5, 3, generator=gen) > 0.6).float()
    multilabel = (torch.rand(2, num_classes, 6, 5, 3, generator=gen) > 0.5).float()
    label_index = random_labels(seed, 2, num_classes, (6, 5, 3))
    for label, label_given in ((multilabel, multilabel), (one_hot(label_index, num_classes), label_index)):
        counts = OrganCounts(num_classes=num_classes, include_background=include_background)
        counts.update(pred, label_given)
        for metric, monai_cls in (("dice", DiceMetric), ("iou", MeanIoU)):
            reference = monai_cls(include_background=include_background, reduction="none")
            reference(pred, label)
            torch.testing.assert_close(
                counts.image_scores(metric), reference.get_buffer().double(), atol=1e-6, rtol=0, equal_nan=True
            )


@given(seed=st.integers(0, 2**16), num_classes=st.integers(2, 6))
def test_counts_do_not_depend_on_input_format(seed, num_classes):
    """Index, float index and one-hot inputs, in any combination and dtype, give the same counts."""
    pred, label = random_labels(seed, 1, num_classes, (6, 7))[0], random_labels(seed + 7, 1, num_classes, (6, 7))[0]
    expected = overlap_counts(pred, label, num_classes)
    # every voxel is a TP or an FP of exactly one class, and a TP or an FN of exactly one class
    assert int(expected[:, :2].sum()) == int(expected[:, ::2].sum()) == 6 * 7
    pred_one_hot = one_hot(pred[None], num_classes)[0]
    for p in (pred.int(), pred.float(), pred_one_hot.half(), pred_one_hot.bool()):
        for y in (label.short(), label.double(), one_hot(label[None], num_classes)[0]):
            assert torch.equal(overlap_counts(p, y, num_classes), expected)


def test_hand_counted_image():
    """label 0 1 1 1 2 2 against pred 0 1 1 2 2 0, class by class."""
    label = torch.tensor([[[0, 1, 1, 1, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1, 2, 2, 0]]])
    counts = overlap_counts(pred, label, 3)
    assert counts.tolist() == [[1, 1, 0], [2, 0, 1], [1, 1, 1]]  # [tp, fp, fn] of classes 0, 1, 2
    expected = {
        "dice": [2 / 3, 4 / 5, 1 / 2],
        "iou": [1 / 2, 2 / 3, 1 / 3],
        "precision": [1 / 2, 1.0, 1 / 2],
        "recall": [1.0, 2 / 3, 1 / 2],
    }
    for metric, values in expected.items():
        torch.testing.assert_close(overlap_scores(counts, metric), torch.tensor(values, dtype=torch.float64))


def image_of(*rows):
    return torch.tensor([rows])  # 1HW class indices


def scores_of(pred, label, metric="dice", **kwargs):
    counts = OrganCounts(labels=["background", "liver", "spleen", "kidney"], include_background=False, **kwargs)
    counts.update(pred[None], label[None])
    return counts.organ_scores(metric)


def test_perfect_prediction():
    label = image_of([0, 1, 1, 2], [3, 3, 2, 0])
    for metric in ("dice", "iou", "precision", "recall"):
        per_organ, mean = scores_of(label, label, metric)
        assert per_organ.tolist() == [1.0, 1.0, 1.0] and mean == 1.0


def test_disjoint_prediction():
    label = image_of([1, 1, 0, 0], [2, 2, 3, 0])
    pred = image_of([0, 0, 1, 1], [3, 0, 2, 2])
    for metric in ("dice", "iou"):
        per_organ, mean = scores_of(pred, label, metric)
        assert per_organ.tolist() == [0.0, 0.0, 0.0] and mean == 0.0


def test_organ_missing_from_prediction_scores_zero():
    label = image_of([1, 1, 2, 2], [3, 3, 0, 0])
    pred = image_of([1, 1, 2, 2], [0, 0, 0, 0])  # kidney (3) missed entirely
    per_organ, mean = scores_of(pred, label, "dice")
    assert per_organ.tolist() == [1.0, 1.0, 0.0]
    assert mean == pytest.approx(2 / 3)


def test_organ_missing_from_label_is_excluded_or_penalised():
    label = image_of([1, 1, 2, 2], [0, 0, 0, 0])  # no kidney in the ground truth
    pred = image_of([1, 1, 2, 2], [3, 0, 0, 0])  # a false kidney
    per_organ, mean = scores_of(pred, label, "dice")  # MONAI's ignore_empty=True: excluded
    assert per_organ[:2].tolist() == [1.0, 1.0] and math.isnan(per_organ[2]) and mean == 1.0
    per_organ, mean = scores_of(pred, label, "dice", ignore_empty=False)  # a false positive scores 0
    assert per_organ.tolist() == [1.0, 1.0, 0.0] and mean == pytest.approx(2 / 3)
    per_organ, _ = scores_of(label, label, "dice", ignore_empty=False)  # absent from both: a perfect 1
    assert per_organ.tolist() == [1.0, 1.0, 1.0]
    # penalize_false_positives: the false kidney scores 0, an organ absent from both stays excluded
    per_organ, mean = scores_of(pred, label, "dice", penalize_false_positives=True)
    assert per_organ.tolist() == [1.0, 1.0, 0.0] and mean == pytest.approx(2 / 3)
    per_organ, mean = scores_of(label, label, "iou", penalize_false_positives=True)
    assert per_organ[:2].tolist() == [1.0, 1.0] and math.isnan(per_organ[2]) and mean == 1.0


def test_empty_image_has_no_valid_organ():
    empty = image_of([0, 0], [0, 0])
    per_organ, mean = scores_of(empty, empty, "dice")
    assert torch.isnan(per_organ).all() and mean == 0.0  # MONAI's MEAN reports 0 when nothing is valid


def test_global_aggregation_pools_voxels():
    """Two images: liver 1 voxel right of 1 in the first, 3 right of 3 plus 1 false positive in the second."""
    labels = torch.stack([image_of([1, 0, 0, 0]), image_of([1, 1, 1, 0])])
    preds = torch.stack([image_of([1, 0, 0, 0]), image_of([1, 1, 1, 1])])
    pooled = OrganCounts(labels=["background", "liver"], include_background=False, aggregation="global")
    per_image = OrganCounts(labels=["background", "liver"], include_background=False)
    for counts in (pooled, per_image):
        counts.update(preds, labels)
    assert pooled.organ_scores("dice")[1] == pytest.approx(2 * 4 / (2 * 4 + 1))  # tp=4, fp=1, fn=0
    assert per_image.organ_scores("dice")[1] == pytest.approx((1 + 6 / 7) / 2)


def test_reduce_scores_follows_monai_mean_order():
    """Mean over classes within each image first, then over images: not the mean of per-class means."""
    scores = torch.tensor([[1.0, float("nan")], [0.0, 0.5]], dtype=torch.float64)
    per_class, mean = reduce_scores(scores)
    assert per_class.tolist() == [0.5, 0.5]
    assert mean == pytest.approx((1.0 + 0.25) / 2)


def test_counts_accumulate_across_updates_and_reset():
    counts = OrganCounts(num_classes=3)
    counts.update(random_labels(0, 2, 3, (4, 4)), random_labels(1, 2, 3, (4, 4)))
    counts.update([torch.zeros(1, 4, 4)], [torch.zeros(1, 4, 4)])  # a list of channel-first images
    assert counts.image_scores("dice").shape == (3, 3)
    counts.reset()
    with pytest.raises(NotComputableError):
        counts.organ_scores("dice")


@pytest.mark.parametrize(
    "pred, label, message",
    [
        (torch.rand(1, 3, 4, 4), torch.zeros(1, 1, 4, 4), "binary"),  # softmax probabilities, not AsDiscreted
        (torch.full((1, 1, 4, 4), 3), torch.zeros(1, 1, 4, 4), "0..2"),  # class index out of range
        (torch.full((1, 1, 4, 4), 0.5), torch.zeros(1, 1, 4, 4), "whole numbers"),
        (torch.full((1, 1, 4, 4), float("nan")), torch.zeros(1, 1, 4, 4), "0..2"),
        (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), "spatial shape"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), "C=3"),
        (torch.zeros(4, 4), torch.zeros(4, 4), "BC"),
        (torch.zeros(2, 1, 4, 4), torch.zeros(1, 1, 4, 4), "same number of images"),
    ],
)
def test_bad_input_raises_value_error(pred, label, message):
    with pytest.raises(ValueError, match=message):
        OrganCounts(num_classes=3).update(pred, label)


def test_negative_values_with_one_hot_moments_are_not_taken_for_one_hot():
    """(0, 3, -3, 1) has the moments of class 0's one-hot vector (a third finite difference added to it)."""
    fake = torch.tensor([0.0, 3.0, -3.0, 1.0]).view(1, 4, 1, 1).expand(1, 4, 3, 2)
    with pytest.raises(ValueError, match="binary"):
        OrganCounts(num_classes=4).update(fake, torch.zeros(1, 1, 3, 2))


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="labels .* or num_classes"):
        OrganCounts()
    with pytest.raises(ValueError, match="num_classes=4 but labels name 3"):
        OrganCounts(labels=["a", "b", "c"], num_classes=4)
    with pytest.raises(ValueError, match="aggregation"):
        OrganCounts(num_classes=3, aggregation="mean")
    with pytest.raises(ValueError, match="metric must be one of"):
        overlap_scores(torch.zeros(3, 3, dtype=torch.long), "hausdorff")
    with pytest.raises(ValueError, match="distinct"):
        OrganCounts(labels=["background", "right kidney", "right-kidney"])
    with pytest.raises(ValueError, match="channel_def"):
        read_organ_names(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="without gaps"):
        read_organ_names({"0": "background", "2": "liver"})


def test_organ_names_from_metadata_channel_def(tmp_path):
    channel_def = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney"}
    meta = {"network_data_format": {"outputs": {"pred": {"type": "image", "channel_def": channel_def}}}}
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    assert read_organ_names(path) == read_organ_names(str(path)) == list(channel_def.values())
    assert read_organ_names(channel_def) == read_organ_names(tuple(channel_def.values()))
    counts = OrganCounts(labels=str(path), include_background=False)
    assert counts.organ_names == ["spleen", "right kidney", "left kidney"]
    assert counts.organ_keys == ["spleen", "right_kidney", "left_kidney"]
