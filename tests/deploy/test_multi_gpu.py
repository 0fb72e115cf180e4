"""configs/multi_gpu_train.json merged over train.json: two gloo processes on CPU train like one data-parallel job.

The distributed run is started the way the README tells users to start it (torchrun, `monai.bundle run`, the two
config files); a third, test-only config appends one step to `run` that saves what each rank did.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
TRAIN = BUNDLE_ROOT / "configs" / "train.json"
MULTI_GPU = BUNDLE_ROOT / "configs" / "multi_gpu_train.json"

# Appended to `run` on every rank, after training: what this rank trained on, its weights, what it reported,
# and which handlers it ran. (`+run` extends the list instead of replacing it.)
RANK_REPORT = {
    "+run": [
        "$torch.save({"
        "'rank': dist.get_rank(), 'world_size': dist.get_world_size(), 'backend': dist.get_backend(),"
        " 'pid': os.getpid(), 'iterations': @train#trainer.state.iteration, 'shard': list(@train#sampler),"
        " 'loss': float(monai.handlers.from_engine(['loss'], first=True)(@train#trainer.state.output)),"
        " 'weights': {k: v.detach().cpu() for k, v in @network.module.state_dict().items()},"
        " 'val_metrics': {k: float(v) for k, v in @validate#evaluator.state.metrics.items()"
        " if isinstance(v, (int, float))},"
        " 'train_handlers': [type(h).__name__ for h in @train#trainer#train_handlers],"
        " 'val_handlers': [type(h).__name__ for h in @validate#evaluator#val_handlers or []]},"
        " os.path.join(@output_dir, f'rank{dist.get_rank()}.pt'))"
    ]
}


def merged_config(**overrides):
    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(MULTI_GPU)])
    parser.update(overrides)
    return parser


def test_merged_config_is_data_parallel():
    parser = merged_config()
    assert parser["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert parser["train"]["dataloader"]["sampler"] == "@train#sampler"
    assert parser["train"]["dataloader"]["shuffle"] is False
    assert parser["validate"]["dataloader"]["sampler"] == "@validate#sampler"
    # training shards are padded to equal length (every rank must run the same number of all-reduces);
    # validation shards are not, so that no image is counted twice in the reduced metrics
    assert parser["train"]["sampler"]["even_divisible"] is True
    assert parser["validate"]["sampler"]["even_divisible"] is False
    # the `+imports` merge keeps every import of train.json
    train_imports = ConfigParser.load_config_file(str(TRAIN)).get("imports", [])
    assert set(train_imports) <= set(parser["imports"])


def test_initialize_runs_train_json_steps_with_rank_0_first():
    """multi_gpu_train.json replaces `initialize`: it must still run every step of train.json's.

    Rank 0 goes first through those steps and through building the datalists (which may generate the phantom
    into `dataset_dir`); the other ranks wait at a barrier until rank 0 has done so. The datalists are reached
    through `train#dataset#data` / `validate#dataset#data`, so that a caller that overrides them with its own
    lists (MONAI Label) never prepares the default dataset.
    """
    train_steps = ConfigParser.load_config_file(str(TRAIN))["initialize"]
    steps = merged_config()["initialize"]
    assert "init_process_group" in steps[0]
    wait = steps.index("$dist.get_rank() == 0 or dist.barrier()")
    datalists = steps.index("$len(@train#dataset#data) + len(@validate#dataset#data)")
    release = steps.index("$dist.get_rank() > 0 or dist.barrier()")
    missing = [step for step in train_steps if step not in steps]
    assert not missing, f"train.json initialize steps not run by multi_gpu_train.json: {missing}"
    assert all(wait < steps.index(step) < datalists for step in train_steps), steps
    assert wait < datalists < release == len(steps) - 1


@pytest.mark.parametrize(
    "overrides, backend",
    [
        ({"device": "$torch.device('cpu')"}, "gloo"),
        ({"device": "$torch.device('cuda', 0)"}, "nccl"),
        ({"device": "cuda:1"}, "nccl"),  # MONAI Label overrides `device` with a plain string
        ({"device": "$torch.device('cuda', 0)", "dist_backend": "gloo"}, "gloo"),
    ],
)
def test_backend_follows_device_and_can_be_overridden(overrides, backend):
    assert merged_config(**overrides).get_parsed_content("dist_backend") == backend


def test_backend_on_this_machine(monkeypatch):
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun sets it; `device` reads it on CUDA machines
    assert merged_config().get_parsed_content("dist_backend") == expected


def copy_of_bundle(destination: Path) -> Path:
    """The bundle's configs and scripts in `destination`, the `bundle_root` of a run that writes nothing here."""
    for part in ("configs", "ctlosses", "scripts"):
        shutil.copytree(BUNDLE_ROOT / part, destination / part, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def run_two_gloo_processes(bundle_root: Path, dataset_dir: Path) -> str:
    report_config = bundle_root / "rank_report.json"
    report_config.write_text(json.dumps(RANK_REPORT))
    configs = bundle_root / "configs"
    config_files = [str(configs / "train.json"), str(configs / "multi_gpu_train.json"), str(report_config)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr(config_files),
        "--bundle_root",
        str(bundle_root),
        "--dataset_dir",
        str(dataset_dir),
        "--epochs",
        "1",
        "--val_interval",
        "1",
        "--device",
        "$torch.device('cpu')",
    ]
    # one thread per process: two processes on two cores, no oversubscription
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if "Error" in line]
    assert done.returncode == 0, "\n".join(errors[-20:]) or output[-4000:]
    return output


def evaluate_single_process(checkpoint: Path, dataset_dir: Path, bundle_root: Path) -> float:
    """train.json's own validation (same data, transforms, inferer, metric) in this one process, on `checkpoint`."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle_root), "dataset_dir": str(dataset_dir), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    return float(evaluator.state.metrics["val_mean_dice"])


def scalar_tags_by_pid(log_dir: Path) -> dict[int, set[str]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags: dict[int, set[str]] = {}
    for path in log_dir.rglob("events.out.tfevents.*"):
        pid = int(path.name.rsplit(".", 2)[1])  # events.out.tfevents.<time>.<host>.<pid>.<n>
        found = {v.tag for event in EventFileLoader(str(path)).Load() for v in event.summary.value}
        tags.setdefault(pid, set()).update(found)
    return {pid: found for pid, found in tags.items() if found}


def test_two_gloo_processes_train_one_model(tiny_phantom, tmp_path):
    bundle_root = copy_of_bundle(tmp_path / "ddp")
    output = run_two_gloo_processes(bundle_root, tiny_phantom)
    reports = [torch.load(bundle_root / "eval" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # both ranks joined one gloo group and each trained on its own half of the four training cases
    assert [(r["rank"], r["world_size"], r["backend"]) for r in reports] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert all(r["iterations"] >= 1 and torch.isfinite(torch.tensor(r["loss"])) for r in reports)
    shards = [set(r["shard"]) for r in reports]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == {0, 1, 2, 3}
    # DistributedDataParallel averaged the gradients: the two processes end with the same weights
    assert reports[0]["weights"].keys() == reports[1]["weights"].keys()
    for name, value in reports[0]["weights"].items():
        torch.testing.assert_close(value, reports[1]["weights"][name], rtol=0, atol=0, msg=name)

    # only rank 0 saves and reports
    for handlers in (reports[1]["train_handlers"], reports[1]["val_handlers"]):
        assert not {"BestModelSaver", "StatsHandler", "TensorBoardStatsHandler", "LossProgressBar"} & set(handlers)
    assert "BestModelSaver" in reports[0]["val_handlers"]  # train.json's saver of models/model.pt
    assert "ValidationHandler" in reports[1]["train_handlers"]  # validation itself runs on both ranks
    checkpoint = bundle_root / "models" / "model.pt"
    assert checkpoint.is_file()
    assert list(scalar_tags_by_pid(bundle_root / "eval")) == [reports[0]["pid"]]

    # the saved weights are the weights that were validated, and are the ranks' common weights
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["network_settings"]["preset"] == "default"  # recorded for inference to compare
    saved = saved["model"]
    for name, value in reports[0]["weights"].items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0, msg=name)

    # the Dice reduced over the uneven validation shards (2 + 1 images) equals one process evaluating all three
    reported = reports[0]["val_metrics"]["val_mean_dice"]
    assert reports[1]["val_metrics"]["val_mean_dice"] == pytest.approx(reported, abs=1e-7)
    single = evaluate_single_process(checkpoint, tiny_phantom, copy_of_bundle(tmp_path / "single"))
    assert single == pytest.approx(reported, abs=1e-6)
    printed = [float(v) for v in re.findall(r"val_mean_dice: ([0-9.]+)", output)]
    assert printed and printed[-1] == pytest.approx(single, abs=1e-4)

    # the engines' log lines are printed once, by rank 0 (they used to come once per rank): one validation gives
    # one new best validation metric, one per-organ table and one closing line naming the best model
    def count(text):
        return sum(text in line for line in output.splitlines())

    assert count("Got new best metric of val_mean_dice") == 1, output[-4000:]
    assert count("Got new best metric of train_mean_loss") == 1
    assert count("SupervisedEvaluator - INFO - Engine run finished") == 1
    assert count("SupervisedTrainer - INFO - Engine run finished") == 1
    assert count("Current learning rate") == 1
    assert count("per-organ scores over 3 images") == 1  # both ranks' shards, reduced
    best = [line for line in output.splitlines() if "best model: " in line]
    assert len(best) == 1 and f"best model: {checkpoint} (epoch 1, val_mean_dice " in best[0], best
