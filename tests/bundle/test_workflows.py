"""Training, evaluation and inference through ``monai.bundle`` on a tiny phantom (CPU, seconds), resuming, the
NaN stop, and one training iteration per loss preset."""

import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import BUNDLE_ROOT, CONFIGS, TINY, make_tiny_phantom, run_training, train_workflow
from monai.bundle import ConfigWorkflow

from ctlosses import LOSSES
from scripts.training import NonFiniteLossError, latest_checkpoint

PRESETS = sorted(p.stem for p in (CONFIGS / "losses").glob("*.json"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_tiny_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    """One epoch of 2 iterations (2 training cases, batch 1) with validation at its end."""
    out = tmp_path_factory.mktemp("run")
    workflow = run_training(phantom, out, epochs=1, val_interval=1)
    return out, workflow


def _chain(error):
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def test_two_iteration_training(trained):
    out, workflow = trained
    trainer = workflow.trainer
    assert trainer.state.iteration == 2 and trainer.state.epoch == 1
    assert np.isfinite(trainer.state.metrics["train_mean_loss"])
    metrics = workflow.evaluator.state.metrics
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and 0.0 <= metrics["val_mean_iou"] <= metrics["val_mean_dice"]
    assert "val_mean_dice/left_adrenal_gland" in metrics  # per-organ entries named from metadata.json
    best = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(best) == {"model", "network_settings"}
    assert set(best["model"]) == set(workflow.parser.get_parsed_content("network").state_dict())
    assert best["network_settings"] == workflow.parser.get_parsed_content("network_settings")
    assert (out / "eval" / "checkpoints" / "checkpoint_epoch=1.pt").is_file()
    assert list((out / "eval").glob("events.out.tfevents.*"))  # TensorBoard


def test_evaluation_writes_per_organ_csv(trained, phantom):
    out, _ = trained
    run_training(phantom, out, extra_files=["evaluate.json"])
    with open(out / "eval" / "organ_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["image"].endswith("phantom_002.nii.gz")  # the one validation case
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    organs = list(metadata["network_data_format"]["outputs"]["pred"]["channel_def"].values())[1:]
    assert [c for c in rows[0] if c.startswith("dice_")] == ["dice_" + o.replace(" ", "_") for o in organs]
    assert (out / "eval" / "organ_metrics_summary.csv").is_file()


def test_inference_keeps_input_shape_and_affine(trained, phantom, tmp_path):
    out, _ = trained
    settings = {k: v for k, v in TINY.items() if k not in ("batch_size", "num_samples")}
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        input=str(phantom / "imagesTr"),
        output_dir=str(tmp_path),
        ckpt_path=str(out / "models" / "model.pt"),
        **settings,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    images = sorted((phantom / "imagesTr").glob("*.nii.gz"))
    assert len(images) == 3
    for image_path in images:
        image = nib.load(image_path)
        mask = nib.load(tmp_path / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
        values = np.unique(np.asanyarray(mask.dataobj))
        assert values.min() >= 0 and values.max() <= 13


def test_train_properties_complete(phantom, tmp_path):
    assert train_workflow(["train.json"], phantom, tmp_path).check_properties() == []
    assert train_workflow(["train.json", "evaluate.json"], phantom, tmp_path).check_properties() == []


def test_resume_continues_from_last_epoch(trained, phantom):
    out, _ = trained
    workflow = run_training(phantom, out, epochs=2, val_interval=100, resume=True)
    assert workflow.trainer.state.epoch == 2 and workflow.trainer.state.iteration == 4  # 2 more, not 4
    assert latest_checkpoint(out / "eval" / "checkpoints").endswith("checkpoint_epoch=2.pt")


def test_resume_without_checkpoint_names_the_folder(phantom, tmp_path):
    with pytest.raises(Exception) as info:
        run_training(phantom, tmp_path, epochs=1, resume=True)
    assert re.search(r"resume=true but .*checkpoints holds no checkpoint_epoch=\*\.pt", _chain(info.value))


def test_nan_loss_stops_naming_iteration_and_checkpoint(phantom, tmp_path):
    # Adam's first step moves every weight by about the learning rate: 1e30 overflows the second forward pass
    with pytest.raises(Exception) as info:
        run_training(phantom, tmp_path, epochs=1, val_interval=100, learning_rate=1e30)
    assert re.search(r"loss is (nan|inf) at epoch 1, iteration 2; .*none yet", _chain(info.value))


def test_unknown_loss_is_named_before_training(phantom, tmp_path):
    with pytest.raises(Exception) as info:
        train_workflow(["train.json"], phantom, tmp_path, **{"loss#_target_": "ctlosses.NoSuchLoss"})
    message = _chain(info.value)
    assert "unknown loss 'ctlosses.NoSuchLoss'" in message and "ctlosses.LovaszSoftmaxLoss" in message


def test_unknown_preset_is_named(phantom, tmp_path):
    with pytest.raises(Exception) as info:
        train_workflow(["train.json", "losses/no_such_loss.json"], phantom, tmp_path)
    assert "no_such_loss.json" in _chain(info.value)


def test_every_registered_loss_has_a_preset():
    targets = {json.loads((CONFIGS / "losses" / f"{p}.json").read_text())["loss"]["_target_"] for p in PRESETS}
    missing = {cls.__name__ for cls in LOSSES.values()} - {t.rsplit(".", 1)[-1] for t in targets}
    assert not missing, f"losses without a preset in configs/losses/: {sorted(missing)}"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_one_iteration(phantom, tmp_path, preset):
    workflow = run_training(
        phantom,
        tmp_path,
        extra_files=[f"losses/{preset}.json"],
        epochs=1,
        val_interval=100,
        **{"train#trainer#epoch_length": 1},
    )
    preset_target = json.loads((CONFIGS / "losses" / f"{preset}.json").read_text())["loss"]["_target_"]
    assert type(workflow.trainer.loss_function).__name__ == preset_target.rsplit(".", 1)[-1]
    assert workflow.trainer.state.iteration == 1
    assert np.isfinite(float(workflow.trainer.state.output[0]["loss"]))


def test_nan_stop_names_last_checkpoint(tmp_path):
    # the handler alone, on a plain Ignite engine whose third loss is NaN after one saved epoch
    from ignite.engine import Engine

    from scripts.training import StopOnNonFiniteLoss

    engine = Engine(lambda e, batch: [{"loss": torch.tensor(float("nan") if e.state.iteration == 7 else 1.0)}])
    StopOnNonFiniteLoss(tmp_path).attach(engine)
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(b"")  # written during the run, so the run's own
    (tmp_path / "checkpoint_epoch=10.pt").write_bytes(b"")  # numeric, not lexical, order
    with pytest.raises(NonFiniteLossError, match=r"at epoch 3, iteration 7; .*/checkpoint_epoch=10\.pt\. Resume"):
        engine.run([0, 1, 2], max_epochs=5)


def test_divergence_rule_on_a_plain_engine(tmp_path):
    from ignite.engine import Engine

    from scripts.training import DivergingLossError, StopOnNonFiniteLoss

    def run(losses):
        engine = Engine(lambda e, batch: [{"loss": torch.tensor(losses[e.state.iteration - 1])}])
        StopOnNonFiniteLoss(tmp_path).attach(engine)
        engine.run(range(len(losses)), max_epochs=1)
        return engine.state.iteration

    assert run([3.7, 3.5, 300.0, 2.0]) == 4  # 300 < 100 x 3.7: a bad batch, not divergence
    assert run([0.02, 0.9, 1.2, 99.0]) == 4  # fine-tuning from a low loss: measured against 1.0, not 0.02
    with pytest.raises(
        DivergingLossError,
        match=r"loss is 371 at epoch 1, iteration 3, above 100 x the run's first "
        r"loss \(3\.7, at least 1\): training diverged",
    ):
        run([3.7, 3.5, 371.0, 2.0])


def test_resume_takes_the_new_learning_rate_and_epochs(phantom, tmp_path, capsys):
    import math

    one_iteration = {"train#trainer#epoch_length": 1}
    run_training(phantom, tmp_path, epochs=2, val_interval=100, **one_iteration)
    capsys.readouterr()
    workflow = run_training(
        phantom, tmp_path, epochs=4, val_interval=100, learning_rate=1e-4, resume="true", **one_iteration
    )
    assert workflow.trainer.state.epoch == 4 and workflow.trainer.state.iteration == 4  # 2 more epochs, not 4
    log = capsys.readouterr().out  # logging.conf's handler writes to stdout
    notes = [line.split(" - ")[-1] for line in log.splitlines() if " - resume: " in line]
    assert notes == [
        "resume: this command's epochs 4 (checkpoint: 2), learning_rate 0.0001 (checkpoint: 0.002) take effect"
    ]
    scheduler = workflow.parser.get_parsed_content("lr_scheduler")
    assert scheduler.base_lrs == [1e-4] and scheduler.T_max == 4 and scheduler.last_epoch == 4
    # the cosine schedule of the new settings, continued at epoch 2: lr(e) = 1e-4 (1 + cos(pi e / 4)) / 2
    saved = torch.load(tmp_path / "eval" / "checkpoints" / "checkpoint_epoch=3.pt", weights_only=True)
    assert math.isclose(saved["optimizer"]["param_groups"][0]["lr"], 1e-4 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    assert saved["run"]["learning_rates"] == [1e-4] and saved["run"]["epochs"] == 4


def test_only_the_last_epoch_checkpoints_are_kept(phantom, tmp_path):
    run_training(phantom, tmp_path, epochs=3, val_interval=100, **{"train#trainer#epoch_length": 1})
    kept = sorted(p.name for p in (tmp_path / "eval" / "checkpoints").iterdir())
    assert kept == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]  # keep_epoch_checkpoints: 2 by default
    # a resumed run of 2 more epochs, keeping 1: its own older checkpoints go too
    run_training(
        phantom,
        tmp_path,
        epochs=5,
        val_interval=100,
        resume=True,
        keep_epoch_checkpoints="1",
        **{"train#trainer#epoch_length": 1},
    )
    assert [p.name for p in (tmp_path / "eval" / "checkpoints").iterdir()] == ["checkpoint_epoch=5.pt"]
