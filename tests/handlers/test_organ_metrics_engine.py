"""ctlosses.organ_metrics attached to a tiny MONAI SupervisedEvaluator, and built from the bundle's config snippet."""

import csv
import json
import logging

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, MeanIoUHandler, StatsHandler, TensorBoardStatsHandler, from_engine
from monai.transforms import AsDiscreted
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ctlosses.organ_metrics import OrganCounts, OrganMetric, OrganMetricsWriter

ORGANS = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gallbladder"}
NUM_CLASSES = len(ORGANS)
NUM_IMAGES = 5


class NearestClass(torch.nn.Module):
    """A network with no weights: logits peak at the class whose index is nearest to the voxel's intensity."""

    def forward(self, image):
        classes = torch.arange(NUM_CLASSES, dtype=image.dtype).view(1, -1, *([1] * (image.ndim - 2)))
        return -((image - classes) ** 2)


@pytest.fixture
def metadata_path(tmp_path):
    meta = {"network_data_format": {"outputs": {"pred": {"type": "image", "channel_def": ORGANS}}}}
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    return path


def validation_data():
    """Noisy images whose rounded intensity is the label; gallbladder absent from image 2, all organs from 4."""
    gen = torch.Generator().manual_seed(3)
    items = []
    for i in range(NUM_IMAGES):
        label = torch.randint(0, NUM_CLASSES, (1, 6, 5, 4), generator=gen).float()
        label[label == 4] = 0 if i == 2 else 4
        if i == 4:
            label.zero_()
        image = label + 0.4 * torch.randn(label.shape, generator=gen)
        items.append({"image": MetaTensor(image, meta={"filename_or_obj": f"case_{i}.nii.gz"}), "label": label})
    return items


def make_evaluator(counts, handlers):
    from_pred_label = from_engine(["pred", "label"])
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(validation_data(), batch_size=2),
        network=NearestClass(),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=NUM_CLASSES),
        key_val_metric={"val_mean_dice": OrganMetric(counts, "dice")},
        additional_metrics={
            "val_mean_iou": OrganMetric(counts, "iou"),
            # MONAI's own handlers on the same outputs, as the reference
            "monai_dice": MeanDice(include_background=False, output_transform=from_pred_label),
            "monai_dice_batch": MeanDice(
                include_background=False, reduction="mean_batch", output_transform=from_pred_label
            ),
            "monai_iou": MeanIoUHandler(include_background=False, output_transform=from_pred_label),
        },
        val_handlers=handlers,
    )


def test_evaluator_reports_monai_values_per_organ_from_one_pass(metadata_path, tmp_path, caplog):
    counts = OrganCounts(labels=metadata_path, include_background=False)
    writer = OrganMetricsWriter(counts, output_dir=tmp_path / "eval")
    tensorboard = TensorBoardStatsHandler(log_dir=str(tmp_path / "tb"), iteration_log=False)
    evaluator = make_evaluator(counts, [writer, StatsHandler(iteration_log=False), tensorboard])
    with caplog.at_level(logging.INFO, logger="ctlosses.organ_metrics"):
        evaluator.run()
    metrics = evaluator.state.metrics

    # one accumulation: each image counted once although two metrics and a writer read the counts
    assert counts.image_scores("dice").shape == (NUM_IMAGES, NUM_CLASSES - 1)
    assert metrics["val_mean_dice"] == pytest.approx(metrics["monai_dice"], abs=1e-6)
    assert metrics["val_mean_iou"] == pytest.approx(metrics["monai_iou"], abs=1e-6)
    assert 0.3 < metrics["val_mean_dice"] < 1.0  # a noisy but informative prediction, not a degenerate case
    organ_keys = ["spleen", "right_kidney", "left_kidney", "gallbladder"]
    for key, monai_value in zip(organ_keys, metrics["monai_dice_batch"].tolist()):
        assert metrics[f"val_mean_dice/{key}"] == pytest.approx(monai_value, abs=1e-6)
        assert 0.0 <= metrics[f"val_mean_iou/{key}"] <= metrics[f"val_mean_dice/{key}"]
    assert evaluator.state.metric_details["val_mean_dice"].shape == (NUM_IMAGES, NUM_CLASSES - 1)

    # console: the table names every organ
    table = "\n".join(r.getMessage() for r in caplog.records if r.name == "ctlosses.organ_metrics")
    for organ in ("spleen", "right kidney", "left kidney", "gallbladder", "mean"):
        assert organ in table

    # TensorBoard: every organ under its name
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"val_mean_{m}/{k}" for m in ("dice", "iou") for k in organ_keys} <= tags

    # per-image CSV: one row per image, one column per metric and organ, named from metadata.json
    with open(tmp_path / "eval" / "organ_metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image"] + [f"{m}_{k}" for m in ("dice", "iou") for k in organ_keys]
    assert [r[0] for r in rows[1:]] == [f"case_{i}.nii.gz" for i in range(NUM_IMAGES)]
    dice_columns = torch.tensor([[float(v) for v in r[1:5]] for r in rows[1:]], dtype=torch.float64)
    torch.testing.assert_close(dice_columns, counts.image_scores("dice"), atol=1e-6, rtol=0, equal_nan=True)
    assert rows[3][4] == "nan" and all(v == "nan" for v in rows[5][1:])  # absent gallbladder, empty image

    with open(tmp_path / "eval" / "organ_metrics_summary.csv") as f:
        summary = list(csv.reader(f))
    assert summary[0] == ["organ", "dice", "iou", "images_scored"]
    assert [r[0] for r in summary[1:]] == ["spleen", "right kidney", "left kidney", "gallbladder", "mean"]
    assert summary[4][3] == "3"  # gallbladder scored in images 0, 1 and 3
    assert float(summary[-1][1]) == pytest.approx(metrics["val_mean_dice"], abs=1e-6)


def test_every_validation_restarts_the_counts(metadata_path):
    counts = OrganCounts(labels=metadata_path, include_background=False)
    evaluator = make_evaluator(counts, [])
    evaluator.run()
    first = evaluator.state.metrics["val_mean_dice"]
    evaluator.run()
    assert counts.image_scores("dice").shape[0] == NUM_IMAGES
    assert evaluator.state.metrics["val_mean_dice"] == first


# The snippet given to configs/train.json and configs/evaluate.json (docs: /tmp/docs/organ_metrics.md).
CONFIG_SNIPPET = """
{
  "validate": {
    "organ_counts": {
      "_target_": "ctlosses.organ_metrics.OrganCounts",
      "labels": "$@bundle_root + '/configs/metadata.json'",
      "num_classes": "@num_classes",
      "include_background": false,
      "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"
    },
    "key_metric": {
      "val_mean_dice": {"_target_": "ctlosses.organ_metrics.OrganMetric", "counts": "@validate#organ_counts",
                        "metric": "dice"}
    },
    "additional_metrics": {
      "val_mean_iou": {"_target_": "ctlosses.organ_metrics.OrganMetric", "counts": "@validate#organ_counts",
                       "metric": "iou"}
    },
    "handlers": [
      {"_target_": "ctlosses.organ_metrics.OrganMetricsWriter", "counts": "@validate#organ_counts",
       "output_dir": "@output_dir"}
    ]
  }
}
"""


def test_config_snippet_builds_shared_counts(metadata_path, tmp_path):
    (tmp_path / "configs").mkdir()
    metadata_path.rename(tmp_path / "configs" / "metadata.json")
    parser = ConfigParser(json.loads(CONFIG_SNIPPET))
    parser["bundle_root"] = str(tmp_path)
    parser["output_dir"] = str(tmp_path / "eval")
    parser["num_classes"] = NUM_CLASSES
    key_metric = parser.get_parsed_content("validate#key_metric")
    iou = parser.get_parsed_content("validate#additional_metrics")["val_mean_iou"]
    writer = parser.get_parsed_content("validate#handlers")[0]
    assert key_metric["val_mean_dice"].counts is iou.counts is writer.counts
    assert iou.counts.organ_names == ["spleen", "right kidney", "left kidney", "gallbladder"]
