"""Trainer-side helpers of the bundle's configs: a stop on a non-finite loss, a progress bar that shows the
loss, resuming from the newest epoch checkpoint, and an up-front check of the configured loss."""

from __future__ import annotations

import math
import os
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


class StopOnNonFiniteLoss:
    """Ignite handler: raise :class:`NonFiniteLossError` on the first iteration whose loss is NaN or infinite.

    The message names the epoch, the iteration and the last epoch checkpoint written before it, which is the
    one to resume from (``--resume true``), since weights saved before the bad step are still finite.

    Args:
        checkpoint_dir: folder of the epoch checkpoints (``CheckpointSaver`` with ``save_interval``).
        loss_key: key of the loss in the engine output (default ``"loss"``, MONAI's ``SupervisedTrainer``).
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, loss_key: str = "loss") -> None:
        self.checkpoint_dir = checkpoint_dir
        self.loss_key = loss_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        # MONAI's trainer decollates its output into a list of per-sample dicts sharing the batch loss
        first = output[0] if isinstance(output, (list, tuple)) and output else output
        loss = first[self.loss_key] if isinstance(first, dict) else first
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        if math.isfinite(value):
            return
        last = latest_checkpoint(self.checkpoint_dir)
        raise NonFiniteLossError(
            f"loss is {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; training stopped. "
            f"Last good checkpoint: {last or 'none yet (no epoch finished)'}"
            + (". Resume from it with --resume true (after lowering the learning rate or fixing the data)."
               if last else ".")  # fmt: skip
        )


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
