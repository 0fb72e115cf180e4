"""Trainer-side helpers of the bundle's configs: a stop on a non-finite loss, a progress bar that shows the
loss, resuming from the newest epoch checkpoint, and an up-front check of the configured loss."""

from __future__ import annotations

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


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """The epoch checkpoint with the highest epoch in ``checkpoint_dir``, or ``None`` when there is none."""
    found = list(Path(checkpoint_dir).glob(EPOCH_CHECKPOINT_GLOB))
    if not found:
        return None

    def epoch(path: Path) -> int:
        try:
            return int(path.stem.split("=")[-1])
        except ValueError:
            return -1

    return str(max(found, key=epoch))


def resume_checkpoint(checkpoint_dir: str | os.PathLike) -> str:
    """:func:`latest_checkpoint`, raising a ``ValueError`` that names the folder when there is none."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        raise ValueError(f"resume=true but {checkpoint_dir} holds no {EPOCH_CHECKPOINT_GLOB}; "
                         f"train without --resume first (a checkpoint is written after every epoch).")  # fmt: skip
    return path


class EpochCheckpoints:
    """Ignite handler: save ``objects`` plus the trainer after every epoch and, with ``resume``, load the newest.

    The trainer itself is added at ``attach`` time, which a config cannot do without a circular reference.
    Only the newest epoch checkpoint is kept (``checkpoint_epoch=<N>.pt``), so an interrupted run loses at
    most its current epoch. Under ``torch.distributed`` every rank resumes and only rank 0 writes.

    Args:
        checkpoint_dir: folder of the epoch checkpoints.
        objects: what to save besides the trainer, e.g. ``{"model": ..., "optimizer": ..., "lr_scheduler": ...}``.
        resume: load the newest checkpoint in ``checkpoint_dir`` before training starts (default False);
            a ``ValueError`` names the folder when it holds none.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, objects: dict, resume: bool = False) -> None:
        self.checkpoint_dir = str(checkpoint_dir)
        self.objects = dict(objects)
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        from monai.handlers import CheckpointLoader, CheckpointSaver

        save_dict = {**self.objects, "trainer": engine}
        if self.resume:
            path = resume_checkpoint(self.checkpoint_dir)
            CheckpointLoader(load_path=path, load_dict=save_dict, map_location="cpu").attach(engine)
            print(f"resuming from {path}", flush=True)
        # every rank loads (above), only rank 0 writes: under DDP all ranks hold the same weights
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            CheckpointSaver(self.checkpoint_dir, save_dict, save_interval=1, epoch_level=True, n_saved=1).attach(engine)


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

    def __init__(self, checkpoint_dir: str | os.PathLike, loss_key: str = "loss",
                 divergence_factor: float | None = 100.0) -> None:  # fmt: skip
        self.checkpoint_dir = checkpoint_dir
        self.loss_key = loss_key
        self.divergence_factor = divergence_factor
        self.first_loss: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _loss(self, engine: Engine) -> float:
        output = engine.state.output
        # MONAI's trainer decollates its output into a list of per-sample dicts sharing the batch loss
        first = output[0] if isinstance(output, (list, tuple)) and output else output
        loss = first[self.loss_key] if isinstance(first, dict) else first
        return float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)

    def _last_checkpoint(self, advice: str) -> str:
        last = latest_checkpoint(self.checkpoint_dir)
        if last is None:
            return "Last good checkpoint: none yet (no epoch finished)."
        return f"Last good checkpoint: {last}. {advice}"

    def __call__(self, engine: Engine) -> None:
        value = self._loss(engine)
        where = f"at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} {where}; training stopped. " + self._last_checkpoint(
                "Resume from it with --resume true (after lowering the learning rate or fixing the data)."))
        if self.first_loss is None:
            self.first_loss = value
        limit = None if self.divergence_factor is None else self.divergence_factor * max(self.first_loss, 1.0)
        if limit is not None and value > limit:
            raise DivergingLossError(
                f"loss is {value:.3g} {where}, above {self.divergence_factor:g} x the run's first loss "
                f"({self.first_loss:.3g}, at least 1): training diverged and was stopped before writing a model; "
                f"lower --learning_rate. " + self._last_checkpoint("Resume from it with --resume true."))


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
        model_path: where the best weights go (``models/model.pt``), as a state dict of the network.
        network: the network (a ``DistributedDataParallel`` wrapper is saved without its ``module.`` prefix).
        metric_name: the evaluator metric to maximise (default: the evaluator's key metric).
    """

    def __init__(self, model_path: str | os.PathLike, network: torch.nn.Module, metric_name: str | None = None) -> None:
        self.model_path = Path(model_path)
        self.network = network
        self.metric_name = metric_name
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.written_digest: str | None = None
        self.kept_previous: Path | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._show_restored_best)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch, "written_digest": self.written_digest}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.written_digest = state.get("written_digest")

    def _show_restored_best(self, engine: Engine) -> None:
        # MONAI's evaluator logs its own best metric; after a resume it would otherwise start again at -1
        if self.best_epoch >= 0:
            engine.state.best_metric, engine.state.best_metric_epoch = self.best_metric, self.best_epoch

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or engine.state.key_metric_name
        value = float(engine.state.metrics[name])
        if not value > self.best_metric:  # also refuses NaN
            return
        self.best_metric, self.best_epoch = value, int(engine.state.epoch)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            self._write()

    def _write(self) -> None:
        network = self.network.module if hasattr(self.network, "module") else self.network
        self.model_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.model_path.with_name(self.model_path.name + ".tmp")
        torch.save(network.state_dict(), temporary)
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
            f"{self.model_path} was not written by this run: kept it as {kept} before saving the new best model.")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        ConfigValueError: naming the target and, for ``scripts.losses``, the losses it has.
    """
    if not isinstance(target, str) or not target:
        raise ConfigValueError(f"the config's loss#_target_ must be a dotted name such as scripts.losses.DiceCELoss, "
                         f"got {target!r}.")  # fmt: skip
    module_name, _, attribute = target.rpartition(".")
    if module_name:
        found = optional_import(module_name, name=attribute)[1]
    else:  # a bare name such as "DiceCELoss" is looked up among MONAI's components, as the config parser does
        found = ComponentLocator().get_component_module_name(target) is not None
    if not found:
        from scripts import losses

        known = ", ".join(f"scripts.losses.{cls.__name__}" for cls in sorted(set(losses.LOSSES.values()),
                                                                             key=lambda c: c.__name__))  # fmt: skip
        raise ConfigValueError(f"unknown loss {target!r} in the config's loss#_target_; the losses of this bundle are: "
                         f"{known}.")  # fmt: skip
    return target
