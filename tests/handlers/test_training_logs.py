"""What training logs: the best-model line at the end (BestModelReport), the means-only metrics line
(log_mean_metrics), the per-organ table's epoch, and engine logs from rank 0 only (RankZeroLogs)."""

import logging

import pytest
import torch
from ignite.engine import Engine, Events

from ctlosses.organ_metrics import OrganCounts, OrganMetricsWriter, log_mean_metrics
from scripts.training import BestModelReport, BestModelSaver, RankZeroLogs


def evaluator_at(epoch, value, name="val_mean_dice"):
    engine = Engine(lambda e, b: None)
    engine.state.epoch = epoch
    engine.state.key_metric_name = name
    engine.state.metrics = {name: value}
    return engine


def one_epoch_trainer(*handlers):
    trainer = Engine(lambda e, b: None)
    for handler in handlers:
        handler.attach(trainer)
    return trainer


def test_best_model_line_names_file_epoch_and_score(tmp_path, caplog):
    saver = BestModelSaver(tmp_path / "models" / "model.pt", torch.nn.Linear(2, 2))
    for epoch, value in [(5, 0.25), (10, 0.8123), (15, 0.5), (20, 0.8123)]:  # a tie does not replace the best
        saver(evaluator_at(epoch, value))
    trainer = one_epoch_trainer(BestModelReport(saver))
    with caplog.at_level(logging.INFO, logger="scripts.training"):
        trainer.run([0], max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "scripts.training"]
    assert lines == [f"best model: {tmp_path / 'models' / 'model.pt'} (epoch 10, val_mean_dice 0.8123)"]
    assert (tmp_path / "models" / "model.pt").is_file()


def test_best_model_line_shows_the_path_as_configured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saver = BestModelSaver("./models/model.pt", torch.nn.Linear(2, 2))
    saver(evaluator_at(3, 0.5))
    assert BestModelReport(saver).summary() == "best model: models/model.pt (epoch 3, val_mean_dice 0.5000)"


def test_no_finite_score_is_a_warning(tmp_path, caplog):
    saver = BestModelSaver(tmp_path / "model.pt", torch.nn.Linear(2, 2))
    saver(evaluator_at(5, float("nan")))
    trainer = one_epoch_trainer(BestModelReport(saver))
    with caplog.at_level(logging.INFO, logger="scripts.training"):
        trainer.run([0], max_epochs=1)
    (record,) = [r for r in caplog.records if r.name == "scripts.training"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("no best model: no validation gave a finite key metric")
    assert not (tmp_path / "model.pt").exists()


def test_resumed_best_keeps_its_metric_name(tmp_path):
    saver = BestModelSaver(tmp_path / "model.pt", torch.nn.Linear(2, 2))
    saver(evaluator_at(4, 0.6, name="val_mean_iou"))
    resumed = BestModelSaver(tmp_path / "model.pt", torch.nn.Linear(2, 2))
    resumed.load_state_dict(saver.state_dict())
    assert BestModelReport(resumed).summary().endswith("(epoch 4, val_mean_iou 0.6000)")
    older = {k: v for k, v in saver.state_dict().items() if k != "best_metric_name"}  # a checkpoint from before
    resumed.load_state_dict(older)
    assert resumed.best_epoch == 4


def test_report_needs_a_saver():
    with pytest.raises(ValueError, match="BestModelSaver"):
        BestModelReport(object())


def test_means_only_metrics_line(caplog):
    engine = evaluator_at(5, 0.5)
    engine.state.metrics.update({"val_mean_dice/spleen": 0.9, "val_mean_iou": 0.25, "val_mean_iou/spleen": 0.8})
    engine.state.best_metric, engine.state.best_metric_epoch = 0.5, 5
    with caplog.at_level(logging.INFO, logger="test.stats"):
        log_mean_metrics(engine, logger_name="test.stats")
    assert [r.getMessage() for r in caplog.records] == [
        "Epoch[5] Metrics -- val_mean_dice: 0.5000 val_mean_iou: 0.2500",
        "Key metric: val_mean_dice best value: 0.5000 at epoch: 5",
    ]


def test_table_title_names_the_epoch(caplog):
    counts = OrganCounts(["background", "liver", "spleen"], include_background=False)
    counts.update(torch.tensor([[[0, 1], [2, 2]]]).unsqueeze(0), torch.tensor([[[0, 1], [2, 1]]]).unsqueeze(0))
    engine = Engine(lambda e, b: None)
    engine.state.epoch = 7
    with caplog.at_level(logging.INFO, logger="ctlosses.organ_metrics"):
        OrganMetricsWriter(counts, show_epoch=True)(engine)
        OrganMetricsWriter(counts)(engine)
    with_epoch, without = (r.getMessage().splitlines() for r in caplog.records)
    assert with_epoch[0] == "epoch 7: per-organ scores over 1 images (per_image aggregation)"
    assert without[0] == "per-organ scores over 1 images (per_image aggregation)"
    assert [line.split()[0] for line in with_epoch[1:]] == ["organ", "liver", "spleen", "mean"]  # label order
    assert with_epoch[1:] == without[1:]


@pytest.fixture
def engine_logger():
    engine = Engine(lambda e, b: None)
    level = engine.logger.level
    yield engine
    engine.logger.setLevel(level)


@pytest.mark.parametrize("rank, expected", [(0, logging.NOTSET), (1, logging.WARNING), (3, logging.WARNING)])
def test_other_ranks_log_warnings_only(monkeypatch, engine_logger, rank, expected):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
    other = logging.getLogger("test.rank_zero_logs")
    RankZeroLogs(logger_names=["test.rank_zero_logs"]).attach(engine_logger)
    assert engine_logger.logger.level == expected and other.level == expected
    other.setLevel(logging.NOTSET)


def test_single_process_logs_unchanged(engine_logger):
    assert not torch.distributed.is_initialized()
    RankZeroLogs().attach(engine_logger)
    assert engine_logger.logger.level == logging.NOTSET
    engine_logger.add_event_handler(Events.COMPLETED, lambda e: None)  # still a plain engine


def test_rank_zero_logs_level_by_name():
    assert RankZeroLogs(level="ERROR").level == logging.ERROR
    with pytest.raises(ValueError, match="logging level"):
        RankZeroLogs(level="LOUD")
