"""Trainer-side helpers of the bundle's configs: a stop on a non-finite or diverging loss, epoch checkpoints that
belong to one run and resume it, a saver of the best model that never loses weights it did not write and a last
line naming it, a progress bar that shows the loss, engine logs from rank 0 only under ``torch.distributed``, and an
up-front check of the configured loss."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.bundle.config_item import ComponentLocator
from monai.utils import optional_import

from scripts.config_values import ConfigValueError
from scripts.errors import BundleError

EPOCH_CHECKPOINT_GLOB = "checkpoint_epoch=*.pt"


class NonFiniteLossError(BundleError, RuntimeError):
    """Training produced a NaN or infinite loss."""


class ResumeError(BundleError, ValueError):
    """``--resume true`` cannot continue: no checkpoint of this run, or settings a checkpoint cannot take."""


def _epoch_of(path: Path) -> int:
    try:
        return int(path.stem.split("=")[-1])
    except ValueError:
        return -1


def latest_checkpoint(checkpoint_dir: str | os.PathLike, since: float | None = None) -> str | None:
    """The most recently written epoch checkpoint in ``checkpoint_dir`` (the highest epoch among equally recent
    ones), only among those written at or after the time ``since`` when given; ``None`` when there is none."""
    found = [p for p in Path(checkpoint_dir).glob(EPOCH_CHECKPOINT_GLOB) if since is None or p.stat().st_mtime >= since]
    return str(max(found, key=lambda p: (p.stat().st_mtime_ns, _epoch_of(p)))) if found else None


def describe_run(definition: dict) -> dict:
    """``definition`` (the config values that make a run that run) as JSON-able values: objects such as the
    network become their type and a digest of their ``repr``, which lists every layer and its size."""

    def plain(value):
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return f"{type(value).__name__} {hashlib.sha256(repr(value).encode()).hexdigest()[:12]}"

    return {key: plain(value) for key, value in sorted(definition.items())}


def _read_run(path: Path) -> dict | None:
    try:
        run = torch.load(path, map_location="cpu", weights_only=True).get("run")
    except Exception:  # noqa: BLE001 - an unreadable or foreign file is a checkpoint of no run of ours
        return None
    return run if isinstance(run, dict) and "definition" in run else None


def _mismatch(run: dict | None, definition: dict) -> str:
    if run is None:
        return "unreadable, or written before checkpoints recorded their run"
    keys = sorted(k for k in set(definition) | set(run["definition"]) if run["definition"].get(k) != definition.get(k))
    return "differs in " + ", ".join(
        f"{k} ({run['definition'].get(k)!r} there, {definition.get(k)!r} now)" for k in keys
    )


def find_resume_checkpoint(checkpoint_dir: str | os.PathLike, definition: dict, epochs: int | None = None) -> str:
    """The newest epoch checkpoint in ``checkpoint_dir`` of a run defined as ``definition`` (see
    :func:`describe_run`); the most recently written one when several runs share the definition.

    Raises:
        ResumeError: naming the folder when it holds no checkpoint, else listing each one found and why it does
            not fit; or when the run's checkpoint has trained ``epochs`` epochs already.
    """
    definition = describe_run(definition)
    found = sorted(Path(checkpoint_dir).glob(EPOCH_CHECKPOINT_GLOB), key=lambda p: (p.stat().st_mtime_ns, _epoch_of(p)))
    if not found:
        raise ResumeError(
            f"resume=true but {checkpoint_dir} holds no {EPOCH_CHECKPOINT_GLOB}; "
            f"train without --resume first (a checkpoint is written after every epoch)."
        )
    runs = {path: _read_run(path) for path in found}
    fitting = [path for path, run in runs.items() if run is not None and run["definition"] == definition]
    if fitting:
        path, done = fitting[-1], runs[fitting[-1]]["epoch"]
        if epochs is not None and epochs <= done:
            raise ResumeError(
                f"{path} ends epoch {done} of this run, so --epochs {epochs} leaves nothing to "
                f"train; resume with --epochs above {done}."
            )
        return str(path)
    listed = [f"{path.name}: {_mismatch(run, definition)}" for path, run in list(runs.items())[-5:]]
    raise ResumeError(
        "\n".join(listed) + f"\nresume=true but none of the {len(found)} checkpoint(s) in {checkpoint_dir} "
        f"belongs to a run of this config (above: what differs); train without --resume to start a "
        f"new run, or resume with that run's settings."
    )


class EpochCheckpoints:
    """Ignite handler: save ``objects`` plus the trainer after every epoch, keep the last ``keep_last`` of this
    run, and with ``resume_from`` continue that checkpoint's run.

    Each checkpoint records its run: an id (start time and a random suffix, kept by a resumed run) and
    ``run_definition`` (:func:`describe_run`), so :func:`find_resume_checkpoint` picks a checkpoint of this
    config's run and never one left by another. On resume the trainer continues at the checkpoint's epoch with
    the configured ``epochs`` and learning rate: when they differ from the checkpoint's, the learning-rate
    schedule is recomputed for them at the current epoch (a scheduler without a closed form is refused), and the
    log says what changed. The trainer itself is added at ``attach`` time, which a config cannot do without a
    circular reference. Under ``torch.distributed`` every rank resumes and only rank 0 writes.

    Args:
        checkpoint_dir: folder of the epoch checkpoints (``checkpoint_epoch=<N>.pt``).
        objects: what to save besides the trainer, e.g. ``{"model": ..., "optimizer": ..., "lr_scheduler": ...}``
            (anything with ``state_dict``/``load_state_dict``; ``BestModelSaver`` keeps the best metric this way).
        run_definition: the config values that make the run that run (dataset, network, loss, ...).
        resume_from: the checkpoint to continue (:func:`find_resume_checkpoint`), or None to start a new run.
        keep_last: how many of this run's newest epoch checkpoints to keep (default 2).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        objects: dict,
        run_definition: dict | None = None,
        resume_from: str | None = None,
        keep_last: int = 2,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.objects = dict(objects)
        self.definition = describe_run(run_definition or {})
        self.resume_from = resume_from
        self.keep_last = keep_last
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
        self.written: list[Path] = []
        self.configured: dict = {}

    def attach(self, engine: Engine) -> None:
        self.configured = self._configured(engine)  # before a checkpoint replaces them
        if self.resume_from:
            engine.add_event_handler(Events.STARTED, self._load)
        # every rank loads, only rank 0 writes: under DDP all ranks hold the same weights
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _configured(self, engine: Engine) -> dict:
        optimizer, scheduler = self.objects.get("optimizer"), self.objects.get("lr_scheduler")
        return {
            "epochs": engine.state.max_epochs,
            "learning_rates": [group["lr"] for group in optimizer.param_groups] if optimizer else [],
            "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler else None,
        }

    def _save(self, engine: Engine) -> None:
        checkpoint = {name: obj.state_dict() for name, obj in self.objects.items()}
        checkpoint["trainer"] = engine.state_dict()
        checkpoint["run"] = {
            "id": self.run_id,
            "definition": self.definition,
            "epoch": engine.state.epoch,
            "epochs": engine.state.max_epochs,
            "learning_rates": self.configured["learning_rates"],
        }
        path = self.checkpoint_dir / f"checkpoint_epoch={engine.state.epoch}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)  # a kill mid-write leaves the previous checkpoints whole
        self.written = [p for p in self.written if p != path] + [path]
        for old in self.written[: -self.keep_last]:
            old.unlink(missing_ok=True)
        self.written = self.written[-self.keep_last :]

    def _load(self, engine: Engine) -> None:
        checkpoint = torch.load(self.resume_from, map_location="cpu", weights_only=True)
        for name, obj in self.objects.items():
            obj.load_state_dict(checkpoint[name])
        engine.load_state_dict(checkpoint["trainer"])
        run = checkpoint["run"]
        self.run_id = run["id"]
        self.written = sorted(
            (
                p
                for p in self.checkpoint_dir.glob(EPOCH_CHECKPOINT_GLOB)
                if (_read_run(p) or {}).get("id") == self.run_id
            ),
            key=_epoch_of,
        )
        self._apply_configured(engine, run)
        logging.getLogger(__name__).info(
            f"resuming run {self.run_id} from {self.resume_from} at epoch {engine.state.epoch}"
        )

    def _apply_configured(self, engine: Engine, run: dict) -> None:
        epochs, rates = self.configured["epochs"], self.configured["learning_rates"]
        if epochs <= engine.state.epoch:
            raise ResumeError(
                f"{self.resume_from} ends epoch {engine.state.epoch}, so --epochs {epochs} leaves "
                f"nothing to train; resume with --epochs above {engine.state.epoch}."
            )
        engine.state.max_epochs = epochs
        changes = [f"epochs {epochs} (checkpoint: {run['epochs']})"] if run["epochs"] != epochs else []
        if run["learning_rates"] != rates:
            changes.append(f"learning_rate {rates[0]:g} (checkpoint: {run['learning_rates'][0]:g})")
        if changes:
            self._reschedule()
            logging.getLogger(__name__).warning("resume: this command's " + ", ".join(changes) + " take effect")

    def _reschedule(self) -> None:
        """Set the configured learning rates and schedule length at the loaded epoch."""
        optimizer, scheduler = self.objects.get("optimizer"), self.objects.get("lr_scheduler")
        rates = self.configured["learning_rates"]
        if scheduler is not None:
            if not hasattr(scheduler, "_get_closed_form_lr"):
                raise ResumeError(
                    f"--learning_rate/--epochs differ from {self.resume_from}'s, and the scheduler "
                    f"{type(scheduler).__name__} has no closed form to move to them mid-run; resume "
                    f"with that run's learning_rate and epochs, or train without --resume."
                )
            # torch keeps the closed form private; step() goes on from group["lr"], so setting it is enough
            loaded = scheduler.state_dict()
            scheduler.load_state_dict(
                {
                    **self.configured["scheduler"],
                    "last_epoch": loaded["last_epoch"],
                    "_step_count": loaded["_step_count"],
                }
            )
            rates = scheduler._get_closed_form_lr()
            scheduler._last_lr = list(rates)
        for group, base, rate in zip(optimizer.param_groups, self.configured["learning_rates"], rates):
            group["lr"], group["initial_lr"] = rate, base


class DivergingLossError(BundleError, RuntimeError):
    """Training produced a finite loss far above where it started: the weights are diverging."""


class StopOnNonFiniteLoss:
    """Ignite handler: stop training on the first iteration whose loss is NaN or infinite, or diverging.

    **The divergence rule**: an iteration's loss above ``divergence_factor`` (100) times the larger of the run's
    first loss and 1.0. The first loss is that of the starting weights, before any step; a loss that grows a
    hundredfold beyond it is not noise (the default Dice+CE starts near 3.7 and only falls; ``--learning_rate 20``
    reaches 1.5e6 on its second iteration), and the floor of 1.0 keeps a fine-tuning run that starts at a low loss
    from stopping on an ordinary hard batch. Bounded losses (Dice, Jaccard, Tversky) never reach it. Both stops
    raise before the epoch ends, so before validation could write a model from diverged weights.

    The message names the epoch, the iteration and the last epoch checkpoint written before it, which is the
    one to resume from (``--resume true``), since weights saved before the bad step are still finite.

    Args:
        checkpoint_dir: folder of the epoch checkpoints.
        loss_key: key of the loss in the engine output (default ``"loss"``, MONAI's ``SupervisedTrainer``).
        divergence_factor: the factor of the rule above (default 100); ``None`` turns the rule off.
    """

    def __init__(
        self, checkpoint_dir: str | os.PathLike, loss_key: str = "loss", divergence_factor: float | None = 100.0
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.loss_key = loss_key
        self.divergence_factor = divergence_factor
        self.first_loss: float | None = None
        # checkpoints older than this run are another run's; the second of slack is for file systems whose
        # modification times are coarser than time.time()
        self.since = time.time() - 1.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _loss(self, engine: Engine) -> float:
        output = engine.state.output
        # MONAI's trainer decollates its output into a list of per-sample dicts sharing the batch loss
        first = output[0] if isinstance(output, (list, tuple)) and output else output
        loss = first[self.loss_key] if isinstance(first, dict) else first
        return float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)

    def _last_checkpoint(self, advice: str) -> str:
        last = latest_checkpoint(self.checkpoint_dir, since=self.since)
        if last is None:
            return "Last good checkpoint: none yet (no epoch finished)."
        return f"Last good checkpoint: {last}. {advice}"

    def __call__(self, engine: Engine) -> None:
        value = self._loss(engine)
        where = f"at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} {where}; training stopped. "
                + self._last_checkpoint(
                    "Resume from it with --resume true (after lowering the learning rate or fixing the data)."
                )
            )
        if self.first_loss is None:
            self.first_loss = value
        limit = None if self.divergence_factor is None else self.divergence_factor * max(self.first_loss, 1.0)
        if limit is not None and value > limit:
            raise DivergingLossError(
                f"loss is {value:.3g} {where}, above {self.divergence_factor:g} x the run's first loss "
                f"({self.first_loss:.3g}, at least 1): training diverged and was stopped before writing a model; "
                f"lower --learning_rate. " + self._last_checkpoint("Resume from it with --resume true.")
            )


class BestModelSaver:
    """Ignite handler on the evaluator: write the network's weights to ``model_path`` whenever the key metric
    beats the best of the run, without ever losing weights this run did not write.

    Before its first write in a process, an existing ``model_path`` that this run did not write itself (the
    shipped weights, another run's model) is kept as ``model.<YYYYmmdd-HHMMSS>.pt`` beside it, and the log says
    where; MONAI Label and inference keep finding the newest weights at ``model_path``. Writes go to a temporary
    file renamed over ``model_path``, so the folder always holds a complete model. The best metric, its epoch and
    the digest of the last written model are part of the epoch checkpoints (``state_dict``), so a resumed run
    only replaces the model with a better one, and does not keep its own earlier model aside.

    Args:
        model_path: where the best weights go (``models/model.pt``), as ``{"model": state_dict,
            "network_settings": network_settings}``: the layout MONAI's ``CheckpointLoader`` and MONAI Label read
            with the key ``model``.
        network: the network (a ``DistributedDataParallel`` wrapper is saved without its ``module.`` prefix).
        metric_name: the evaluator metric to maximise (default: the evaluator's key metric).
        network_settings: what the network was trained with (``scripts.network_settings.network_settings``), so
            inference can refuse a config it does not fit; left out of the file when None.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        network: torch.nn.Module,
        metric_name: str | None = None,
        network_settings: dict | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.network = network
        self.network_settings = network_settings
        self.metric_name = metric_name
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.written_digest: str | None = None
        self.kept_previous: Path | None = None
        self.best_metric_name: str | None = metric_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._show_restored_best)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict:
        return {
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "written_digest": self.written_digest,
            "best_metric_name": self.best_metric_name,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.written_digest = state.get("written_digest")
        self.best_metric_name = state.get("best_metric_name") or self.best_metric_name

    def _show_restored_best(self, engine: Engine) -> None:
        # MONAI's evaluator logs its own best metric; after a resume it would otherwise start again at -1
        if self.best_epoch >= 0:
            engine.state.best_metric, engine.state.best_metric_epoch = self.best_metric, self.best_epoch

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or engine.state.key_metric_name
        value = float(engine.state.metrics[name])
        if not value > self.best_metric:  # also refuses NaN
            return
        self.best_metric, self.best_epoch, self.best_metric_name = value, int(engine.state.epoch), name
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            self._write()

    def _write(self) -> None:
        network = self.network.module if hasattr(self.network, "module") else self.network
        self.model_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.model_path.with_name(self.model_path.name + ".tmp")
        checkpoint = {"model": network.state_dict()}
        if self.network_settings is not None:
            checkpoint["network_settings"] = self.network_settings
        torch.save(checkpoint, temporary)
        self._keep_previous()
        os.replace(temporary, self.model_path)
        self.written_digest = _digest(self.model_path)

    def _keep_previous(self) -> None:
        if not self.model_path.is_file() or _digest(self.model_path) == self.written_digest:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = self.model_path.with_name(f"{self.model_path.stem}.{stamp}{self.model_path.suffix}")
        for n in range(1, 1000):
            if not kept.exists():
                break
            kept = self.model_path.with_name(f"{self.model_path.stem}.{stamp}-{n}{self.model_path.suffix}")
        try:  # a second name for the same file: model_path is never missing, not even for a moment
            os.link(self.model_path, kept)
        except OSError:
            shutil.copy2(self.model_path, kept)
        self.kept_previous = kept
        logging.getLogger(__name__).warning(
            f"{self.model_path} was not written by this run: kept it as {kept} before saving the new best model."
        )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class BestModelReport:
    """Trainer handler: when training completes, one log line naming the best model's file, its epoch and score,
    ``best model: models/model.pt (epoch 45, val_mean_dice 0.8123)``, from the ``BestModelSaver`` of the evaluator
    (after a resume, the best of the whole run). When no validation gave a finite score, a warning says that no
    model was written.

    Args:
        saver: the evaluator's ``BestModelSaver``.
        logger_name: logger of the line. Defaults to ``"scripts.training"``.
    """

    def __init__(self, saver: BestModelSaver, logger_name: str = __name__) -> None:
        if not isinstance(saver, BestModelSaver):
            raise ValueError(f"saver must be a BestModelSaver, got {type(saver).__name__}.")
        self.saver = saver
        self.logger = logging.getLogger(logger_name)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def summary(self) -> str:
        path = os.path.normpath(self.saver.model_path)
        name = self.saver.best_metric_name or "key metric"
        if self.saver.best_epoch < 0:
            return f"no best model: no validation gave a finite {name}, so {path} was not written by this run."
        return f"best model: {path} (epoch {self.saver.best_epoch}, {name} {self.saver.best_metric:.4f})"

    def __call__(self, engine: Engine) -> None:
        if self.saver.best_epoch < 0:
            self.logger.warning(self.summary())
        else:
            self.logger.info(self.summary())


class RankZeroLogs:
    """Engine handler for ``torch.distributed`` runs: on ranks other than 0, the engine's logger (Ignite's
    ``Engine run ...``, ``Epoch[N] Complete``, MONAI's ``Got new best metric ...``, ``Current learning rate``) and
    the loggers named in ``logger_names`` show only warnings and errors, so that each line is printed once, by
    rank 0. Without a process group, or on rank 0, it does nothing.

    Args:
        logger_names: further loggers to quiet on the other ranks. Defaults to none.
        level: the level they keep on the other ranks. Defaults to ``logging.WARNING``.
    """

    def __init__(self, logger_names: tuple[str, ...] | list[str] = (), level: int | str = logging.WARNING) -> None:
        self.logger_names = tuple(logger_names)
        self.level = logging.getLevelName(level) if isinstance(level, str) else level
        if not isinstance(self.level, int):
            raise ValueError(f"level must be a logging level such as 'WARNING', got {level!r}.")

    def attach(self, engine: Engine) -> None:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        if torch.distributed.get_rank() == 0:
            return
        engine.logger.setLevel(self.level)
        for name in self.logger_names:
            logging.getLogger(name).setLevel(self.level)


class LossProgressBar:
    """A tqdm progress bar over each epoch's iterations showing the current loss (ignite's ``ProgressBar``).

    Args:
        loss_key: key of the loss in the engine output (default ``"loss"``).
        persist: keep each finished epoch's bar on screen (default True).
    """

    def __init__(self, loss_key: str = "loss", persist: bool = True) -> None:
        self.loss_key = loss_key
        self.persist = persist

    def _loss(self, output) -> dict[str, float]:
        first = output[0] if isinstance(output, (list, tuple)) and output else output
        loss = first[self.loss_key] if isinstance(first, dict) else first
        return {"loss": float(loss)}

    def attach(self, engine: Engine) -> None:
        ProgressBar(persist=self.persist).attach(engine, output_transform=self._loss)


def check_loss_target(target: str) -> str:
    """Check that a loss ``_target_`` string names an importable callable before anything is built.

    Raises:
        ConfigValueError: naming the target and, for ``ctlosses``, the losses it has.
    """
    if not isinstance(target, str) or not target:
        raise ConfigValueError(
            f"the config's loss#_target_ must be a dotted name such as ctlosses.DiceCELoss, got {target!r}."
        )
    module_name, _, attribute = target.rpartition(".")
    if module_name:
        found = optional_import(module_name, name=attribute)[1]
    else:  # a bare name such as "DiceCELoss" is looked up among MONAI's components, as the config parser does
        found = ComponentLocator().get_component_module_name(target) is not None
    if not found:
        import ctlosses as losses

        known = ", ".join(
            f"ctlosses.{cls.__name__}" for cls in sorted(set(losses.LOSSES.values()), key=lambda c: c.__name__)
        )
        raise ConfigValueError(
            f"unknown loss {target!r} in the config's loss#_target_; the losses of this bundle are: {known}."
        )
    return target
