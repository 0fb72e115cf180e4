"""What a user sees for each wrong input of the bundle (the table "What happens when the input is wrong" in
docs/README.md): each case is typed as on the command line, in a copy of the bundle, and must end with a non-zero
exit code, at most 15 lines whose last one names the file or key, and the shipped ``models/model.pt`` untouched."""

import hashlib
import shutil

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import (
    all_nan,
    assert_one_message,
    bundle_copy,
    case_file,
    constant,
    double_z_spacing,
    flip_first_axis,
    make_tiny_phantom,
    resave,
    run_bundle,
    train_workflow,
    translate,
)

from scripts.config_values import ConfigValueError, read_bool, read_int, read_positive_float, read_settings


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_tiny_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def bundle(tmp_path):
    return bundle_copy(tmp_path)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. configs read what users type ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed, meant",
    [
        ("false", False),
        ("False", False),
        ("FALSE", False),
        ("no", False),
        ("0", False),
        (0, False),
        (False, False),
        ("true", True),
        ("True", True),
        ("YES", True),
        ("1", True),
        (1, True),
        (True, True),
        (" yes ", True),
    ],
)
def test_booleans_as_typed(typed, meant):
    assert read_bool(typed, "resume") is meant


@pytest.mark.parametrize("typed", ["maybe", "", "2", 2, 0.5, None, "ture"])
def test_other_booleans_name_the_key(typed):
    with pytest.raises(ConfigValueError, match=r"config key 'resume' \(--resume\): expected true or false"):
        read_bool(typed, "resume")


def test_numbers_as_strings():
    assert read_int("5", "epochs", minimum=1) == 5 and read_int(5.0, "epochs") == 5 and read_int(" 7 ", "epochs") == 7
    assert read_positive_float("1e-3", "learning_rate") == 1e-3 and read_positive_float(20, "learning_rate") == 20.0
    for bad in ("abc", "2.5", True, 0, "-1", "nan", [5]):
        with pytest.raises(ConfigValueError, match="config key 'epochs'"):
            read_int(bad, "epochs", minimum=1)
    for bad in ("abc", 0, -1e-3, "inf", False):
        with pytest.raises(ConfigValueError, match="config key 'learning_rate'"):
            read_positive_float(bad, "learning_rate")
    with pytest.raises(TypeError, match="no reader"):  # a config using a setting without a reader is our bug
        read_settings(no_such_setting=1)


def test_train_json_reads_typed_strings(phantom, tmp_path):
    workflow = train_workflow(
        ["train.json"],
        phantom,
        tmp_path,
        resume="false",
        generate_phantom="no",
        epochs="3",
        learning_rate="1e-3",
        val_interval="2",
        batch_size="1",
        amp="False",
    )
    settings = workflow.parser.get_parsed_content("settings")
    assert settings["resume"] is False and settings["generate_phantom"] is False and settings["amp"] is False
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == 3 and trainer.amp is False
    assert workflow.parser.get_parsed_content("optimizer").param_groups[0]["lr"] == 1e-3
    assert workflow.parser.get_parsed_content("train#dataloader").batch_size == 1
    checkpoints = [h for h in workflow.parser.get_parsed_content("train#handlers") if hasattr(h, "resume_from")]
    assert [h.resume_from for h in checkpoints] == [None]  # 'false' did not resume


def test_generate_phantom_false_with_missing_dir(bundle, tmp_path):
    missing = tmp_path / "typo_dataset"
    shipped = digest(bundle / "models" / "model.pt")
    result = run_bundle(bundle, "--dataset_dir", str(missing), "--generate_phantom", "false")
    assert_one_message(result, str(missing), "missing or empty")
    assert not missing.exists()  # no phantom written into a mistyped folder
    assert digest(bundle / "models" / "model.pt") == shipped and not (bundle / "eval").exists()


@pytest.mark.parametrize(
    "key, typed, expected",
    [
        ("resume", "maybe", "true or false"),
        ("epochs", "abc", "a whole number >= 1"),
        ("learning_rate", "fast", "a finite number > 0"),
    ],
)
def test_bad_value_names_the_key(bundle, phantom, key, typed, expected):
    shipped = digest(bundle / "models" / "model.pt")
    result = run_bundle(bundle, "--dataset_dir", str(phantom), f"--{key}", typed)
    last = assert_one_message(result, f"config key '{key}' (--{key})", expected, repr(typed))
    assert last.startswith("config key")
    assert digest(bundle / "models" / "model.pt") == shipped and not (bundle / "eval").exists()


# --- 3. errors read as one message -----------------------------------------------------------------------------


def test_unknown_loss_is_one_message(bundle, phantom):
    result = run_bundle(bundle, "--dataset_dir", str(phantom), "--loss#_target_", "ctlosses.NoSuchLoss")
    assert_one_message(result, "unknown loss 'ctlosses.NoSuchLoss'", "ctlosses.DiceCELoss")


@pytest.mark.parametrize(
    "args, names",
    [
        (("--loss#ignore_index", "abc"), ("ignore_index", "'abc'")),
        (
            ("--loss#_target_", "ctlosses.FocalLoss"),
            # the default loss (Combo) has alpha, beta, to_onehot_y and softmax: FocalLoss has alpha and to_onehot_y
            ("FocalLoss does not take beta, softmax", "configs/losses/focal.json"),
        ),
    ],
)
def test_loss_constructor_error_is_one_message(bundle, phantom, args, names):
    # the loss is built in `initialize`, before the datasets are cached, so its message comes first and alone
    result = run_bundle(bundle, "--dataset_dir", str(phantom), *args)
    assert_one_message(result, *names)
    assert len(result[1]) <= 6 and not (bundle / "eval").exists()


def test_excepthook_reports_bundle_errors_briefly(monkeypatch, capsys):
    import os
    import sys

    from scripts.data import DatasetError
    from scripts.errors import report_errors_briefly

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.delenv("BUNDLE_DEBUG", raising=False)
    report_errors_briefly()
    report_errors_briefly()  # twice: still one hook
    try:
        try:
            raise DatasetError("image /x.nii.gz: every voxel is NaN.")
        except DatasetError as error:
            raise RuntimeError("Failed to evaluate ConfigExpression") from error  # as MONAI wraps it
    except RuntimeError as error:
        wrapped = error
    sys.excepthook(type(wrapped), wrapped, wrapped.__traceback__)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["bundle stopped (BUNDLE_DEBUG=1 shows the traceback):", "image /x.nii.gz: every voxel is NaN."]
    error = KeyError("a bug of ours")
    sys.excepthook(KeyError, error, None)
    assert "KeyError: 'a bug of ours'" in capsys.readouterr().err  # not the user's to fix: the full report
    report_errors_briefly(debug="true")  # --debug true
    assert os.environ["BUNDLE_DEBUG"] == "1"
    sys.excepthook(type(wrapped), wrapped, wrapped.__traceback__)
    shown = capsys.readouterr().err
    assert (
        "Traceback (most recent call last):" in shown and "DatasetError: image /x.nii.gz: every voxel is NaN." in shown
    )


# an error during training comes after the datasets' and the iterations' progress bars (28 lines measured; it used to
# take 125-270 lines)
RUN_ERROR_LINES = 40


def test_nan_loss_during_the_run_prints_once(bundle, phantom):
    # Adam's first step moves every weight by about the learning rate: 1e30 overflows the second forward pass
    shipped = digest(bundle / "models" / "model.pt")
    code, lines = run_bundle(
        bundle, "--dataset_dir", str(phantom), "--learning_rate", "1e30", "--epochs", "1", "--val_interval", "1"
    )
    assert code != 0 and "Traceback" not in "\n".join(lines)
    assert len(lines) <= RUN_ERROR_LINES, f"{len(lines)} lines:\n" + "\n".join(lines)
    assert sum("loss is nan" in line for line in lines) == 1, "\n".join(lines)
    assert lines[-1].startswith("loss is nan at epoch 1, iteration 2; training stopped.")
    assert digest(bundle / "models" / "model.pt") == shipped


# --- 2. dataset checks before training and evaluation ----------------------------------------------------------


@pytest.fixture
def dataset(phantom, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(phantom, copy)
    return copy


def alter_label_grid(dataset, section, alter):
    label = case_file(dataset, section, "label")
    resave(label, affine=alter(nib.load(label).affine))
    return label


def alter_image(dataset, section, alter):
    image = case_file(dataset, section, "image")
    resave(image, data=alter(np.asanyarray(nib.load(image).dataobj).astype(np.float32)))
    return image


@pytest.mark.parametrize(
    "section, alter, altered, problem",
    [
        ("training", flip_first_axis, alter_label_grid, "is not on its image's voxel grid: axis directions differ"),
        ("training", double_z_spacing, alter_label_grid, "is not on its image's voxel grid: voxel spacing differs"),
        ("validation", translate, alter_label_grid, "is not on its image's voxel grid: origin differs by 5 mm"),
        ("training", all_nan, alter_image, "NaN or infinite voxel(s)"),
        ("training", constant, alter_image, "is constant"),
        ("validation", all_nan, alter_image, "NaN or infinite voxel(s)"),
        ("validation", constant, alter_image, "is constant"),
    ],
)
def test_bad_case_stops_training_before_the_run(bundle, dataset, section, alter, altered, problem):
    bad_file = altered(dataset, section, alter)
    shipped = digest(bundle / "models" / "model.pt")
    result = run_bundle(bundle, "--dataset_dir", str(dataset))
    assert_one_message(result, str(bad_file), problem)
    assert digest(bundle / "models" / "model.pt") == shipped and not (bundle / "eval").exists()


def test_nan_validation_image_stops_evaluate_json(bundle, dataset):
    # it used to exit 0 with val_mean_dice 0.0000
    bad_file = alter_image(dataset, "validation", all_nan)
    result = run_bundle(bundle, "--dataset_dir", str(dataset), configs=("train.json", "evaluate.json"))
    assert_one_message(result, str(bad_file), "NaN or infinite voxel(s)")
    assert not (bundle / "eval").exists()


# --- 4. no model is lost -----------------------------------------------------------------------------------------


def test_diverging_learning_rate_stops_before_a_model_is_written(bundle, phantom):
    # finite all the way (1.5e11 on the second iteration), so the NaN stop alone never fired
    shipped = digest(bundle / "models" / "model.pt")
    code, lines = run_bundle(
        bundle, "--dataset_dir", str(phantom), "--learning_rate", "1000", "--epochs", "1", "--val_interval", "1"
    )
    assert code != 0 and "Traceback" not in "\n".join(lines)
    assert len(lines) <= RUN_ERROR_LINES, f"{len(lines)} lines:\n" + "\n".join(lines)
    assert sum("training diverged" in line for line in lines) == 1, "\n".join(lines)
    assert "training diverged and was stopped before writing a model; lower --learning_rate." in lines[-1]
    assert lines[-1].startswith("loss is ") and "at epoch 1, iteration 2, above 100 x the run's first loss" in lines[-1]
    assert digest(bundle / "models" / "model.pt") == shipped
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt"]


def test_training_keeps_the_shipped_model_aside(bundle, phantom):
    shipped = digest(bundle / "models" / "model.pt")
    code, lines = run_bundle(bundle, "--dataset_dir", str(phantom), "--epochs", "1", "--val_interval", "1")
    assert code == 0, "\n".join(lines[-30:])
    kept = [p for p in (bundle / "models").glob("model.*.pt")]
    assert len(kept) == 1 and digest(kept[0]) == shipped  # the shipped weights, byte for byte
    assert digest(bundle / "models" / "model.pt") != shipped  # the new best model where MONAI Label looks for it
    notes = [line for line in lines if "was not written by this run: kept it as" in line]
    assert len(notes) == 1 and str(kept[0].relative_to(bundle)) in notes[0]
    first_run_model = digest(bundle / "models" / "model.pt")

    # --resume false, as docs/README.md spells it, with that run's checkpoint present: a new run from epoch 1
    code, lines = run_bundle(
        bundle, "--dataset_dir", str(phantom), "--epochs", "1", "--val_interval", "1", "--resume", "false"
    )
    assert code == 0, "\n".join(lines[-30:])
    assert not any("resuming run" in line for line in lines) and any("Epoch[1] Complete" in line for line in lines)
    kept = sorted((bundle / "models").glob("model.*.pt"))
    assert len(kept) == 2 and {digest(p) for p in kept} == {shipped, first_run_model}  # the first run's model too


# --- 5. resume that means what it says ---------------------------------------------------------------------------


def _checkpoint(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def test_kill_9_mid_run_then_resume(bundle, phantom):
    import os
    import signal
    import subprocess
    import sys
    import time

    checkpoints = bundle / "eval" / "checkpoints"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/tiny.json']",
        "--dataset_dir",
        str(phantom),
        "--epochs",
        "4",
        "--val_interval",
        "2",
    ]
    run = subprocess.Popen(
        command,
        cwd=bundle,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 240
        while not (checkpoints / "checkpoint_epoch=2.pt").exists() and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
    finally:
        run.wait()
    written = sorted(checkpoints.glob("checkpoint_epoch=*.pt"))
    assert run.returncode == -signal.SIGKILL and written, "the run ended before its second epoch checkpoint"
    last = max(written, key=lambda p: int(p.stem.split("=")[1]))
    epoch = int(last.stem.split("=")[1])
    assert epoch in (2, 3)  # killed mid-run: the kill came after epoch 2's checkpoint, not after the last epoch
    before = _checkpoint(last)
    best_before = before["best_model"]
    model_before = digest(bundle / "models" / "model.pt")

    code, lines = run_bundle(
        bundle, "--dataset_dir", str(phantom), "--epochs", "4", "--val_interval", "2", "--resume", "true"
    )
    assert code == 0, "\n".join(lines[-30:])
    assert any(
        f"resuming run {before['run']['id']} from eval/checkpoints/checkpoint_epoch={epoch}.pt at epoch {epoch}" in line
        for line in lines
    ), "\n".join(lines)
    assert any("Epoch[4] Complete" in line for line in lines) and not any(
        f"Epoch[{epoch}] Complete" in line for line in lines
    )
    after = _checkpoint(checkpoints / "checkpoint_epoch=4.pt")
    assert after["run"]["id"] == before["run"]["id"] and after["run"]["epoch"] == 4
    # the best metric survived the resume: it only rose, and the best epoch moved only if it did
    assert after["best_model"]["best_metric"] >= best_before["best_metric"]
    if after["best_model"]["best_metric"] == best_before["best_metric"]:
        assert after["best_model"]["best_epoch"] == best_before["best_epoch"]
        assert digest(bundle / "models" / "model.pt") == model_before
    # the shipped model kept once (by the first run), not the run's own model again after the resume
    assert len(list((bundle / "models").glob("model.*.pt"))) == 1
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt"]


def test_stale_checkpoint_of_another_run(bundle, phantom):
    code, lines = run_bundle(
        bundle,
        "--dataset_dir",
        str(phantom),
        "--epochs",
        "1",
        "--val_interval",
        "100",
        configs=("train.json", "losses/dice.json"),
    )
    assert code == 0, "\n".join(lines[-30:])
    model = digest(bundle / "models" / "model.pt")
    result = run_bundle(bundle, "--dataset_dir", str(phantom), "--epochs", "3", "--resume", "true")
    last = assert_one_message(
        result, "resume=true but none of the 1 checkpoint(s) in ./eval/checkpoints belongs to a run of this config"
    )
    assert "train without --resume" in last
    assert (
        "checkpoint_epoch=1.pt: differs in loss ('ctlosses.DiceLoss' there, 'ctlosses.ComboLoss' now)" in result[1][-2]
    )
    assert digest(bundle / "models" / "model.pt") == model
    # the same checkpoint with its own run's settings fits, but has trained its epoch already
    result = run_bundle(
        bundle,
        "--dataset_dir",
        str(phantom),
        "--epochs",
        "1",
        "--resume",
        "true",
        configs=("train.json", "losses/dice.json"),
    )
    assert_one_message(
        result,
        "checkpoint_epoch=1.pt ends epoch 1 of this run, so --epochs 1 leaves nothing to train; "
        "resume with --epochs above 1.",
    )
    assert digest(bundle / "models" / "model.pt") == model
