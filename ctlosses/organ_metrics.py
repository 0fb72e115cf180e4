"""Per-organ Dice, IoU, precision and recall for Ignite engines, from one accumulation of TP/FP/FN counts.

Layout, top-down:

- ``overlap_counts``: TP, FP and FN of every class for one image, from one-hot or class-index inputs.
- ``overlap_scores`` / ``reduce_scores``: scores from counts, and MONAI's per-image mean.
- ``OrganCounts``: the accumulator. It holds per-image counts, syncs *counts* (never means) across
  ``torch.distributed`` ranks and turns them into per-organ scores, per image or pooled.
- ``OrganMetric``: an Ignite ``Metric`` reading one score (``dice``, ``iou``, ...) from a shared ``OrganCounts``,
  so ``val_mean_dice`` (key metric) and ``val_mean_iou`` (additional metric) come from one pass over the data.
- ``OrganMetricsWriter``: a handler writing the per-image CSV and the per-organ summary, and logging a table.
- ``log_mean_metrics``: a short epoch line for MONAI's ``StatsHandler`` (the means only, not every organ).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric

__all__ = [
    "OVERLAP_METRICS",
    "overlap_counts",
    "overlap_scores",
    "reduce_scores",
    "read_organ_names",
    "OrganCounts",
    "OrganMetric",
    "OrganMetricsWriter",
    "log_mean_metrics",
]

OVERLAP_METRICS = ("dice", "iou", "precision", "recall")
AGGREGATIONS = ("per_image", "global")


# ----------------------------------------------------------------------------------------------------------------
# Counting


def _as_plain_tensor(x: Any, name: str) -> torch.Tensor:
    # MetaTensor (and other subclasses) would route every elementwise op through __torch_function__.
    if isinstance(x, torch.Tensor):
        return x.as_subclass(torch.Tensor)
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}.") from e


def _index_map(x: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """Validate a ``1[spatial]`` class-index map and return it flattened as int64."""
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} class indices must be integer or float, got dtype {x.dtype}.")
    lo, hi = torch.aminmax(x)
    # written so that NaN fails too
    if not (lo.item() >= 0 and hi.item() <= num_classes - 1):
        raise ValueError(
            f"{name} class indices must lie in 0..{num_classes - 1}, got values in [{lo.item()}, {hi.item()}]."
        )
    if x.is_floating_point() and bool((x != torch.round(x)).any()):
        raise ValueError(f"{name} class indices must be whole numbers, got fractional values.")
    return x.reshape(-1).long()


def _exclusive_one_hot_index(x: torch.Tensor) -> torch.Tensor | None:
    """Class index (as float) of a ``C[spatial]`` one-hot map where every voxel has exactly one 1, else ``None``.

    Per voxel, ``sum_c x_c``, ``sum_c c x_c`` and ``sum_c c^2 x_c`` are 1, ``k`` and ``k^2`` exactly when ``x`` is
    the one-hot vector of ``k`` and non-negative (a distribution over classes with zero variance is a point mass;
    the minimum rules out negative entries, which could match the moments otherwise). Two matrix-vector products,
    a sum and a minimum read the input four times, where channel-by-channel masks read it dozens of times and
    ``argmax`` over the channel axis is slower still.
    """
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        # half/bfloat16 cannot hold c^2 exactly for many classes; integer and bool inputs have no matmul
        flat = flat.float()
    classes = torch.arange(flat.shape[0], dtype=flat.dtype, device=flat.device)
    # one matrix-vector product per moment: a 3-row matrix product is several times slower on CPU
    first, second = torch.mv(flat.T, classes), torch.mv(flat.T, classes * classes)
    total_lo, total_hi = torch.aminmax(flat.sum(0))
    if total_lo.item() != 1 or total_hi.item() != 1 or not torch.equal(second, first * first) or flat.min().item() < 0:
        return None
    return first  # whole numbers below 2**24: exact in float32


def _binary_mask(x: torch.Tensor, name: str, channel: int) -> torch.Tensor:
    mask = x != 0
    if bool((mask & (x != 1)).any()):
        raise ValueError(
            f"{name} channel {channel} must be binary (0/1) one-hot, got other values; "
            "apply AsDiscreted(argmax=True, to_onehot=C) to predictions first."
        )
    return mask


def overlap_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """
    True positives, false positives and false negatives of every class for one image.

    Each input is either a one-hot (or multi-label) map of shape ``C[spatial]`` with binary values, as produced by
    MONAI's ``AsDiscreted(to_onehot=C)``, or a class-index map of shape ``1[spatial]`` (any integer or whole-valued
    float dtype). Index maps are never expanded to one-hot: when both inputs are index maps (or exclusive one-hot
    maps, reduced to indices), the counts come from one ``bincount`` of ``pred * C + label``, the confusion matrix.

    Args:
        pred: prediction of shape ``C[spatial]`` (one-hot) or ``1[spatial]`` (class indices).
        label: ground truth of shape ``C[spatial]`` (one-hot) or ``1[spatial]`` (class indices).
        num_classes: number of classes ``C`` including background, at least 2.

    Returns:
        int64 tensor of shape ``(C, 3)`` holding ``[tp, fp, fn]`` per class, on the inputs' device.

    Raises:
        ValueError: wrong channel count, mismatched spatial shapes, non-binary one-hot values, or class indices
            outside ``0..C-1``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background and one organ), got {num_classes}.")
    pred, label = _as_plain_tensor(pred, "pred"), _as_plain_tensor(label, "label")
    for name, x in (("pred", pred), ("label", label)):
        if x.ndim < 2 or x.shape[0] not in (1, num_classes):
            raise ValueError(
                f"{name} must have shape C[spatial] with C={num_classes} (one-hot) or 1 (class indices), "
                f"got {tuple(x.shape)}."
            )
    if pred.shape[1:] != label.shape[1:]:
        raise ValueError(
            f"pred and label must have the same spatial shape, got {tuple(pred.shape[1:])} and "
            f"{tuple(label.shape[1:])}."
        )
    if label.device != pred.device:
        label = label.to(pred.device)

    def as_index(x: torch.Tensor, name: str) -> torch.Tensor | None:
        return _index_map(x, num_classes, name) if x.shape[0] == 1 else _exclusive_one_hot_index(x)

    pred_index, label_index = as_index(pred, "pred"), as_index(label, "label")
    if pred_index is not None and label_index is not None:
        # float (from one-hot) or int64 (from index maps); codes below C^2 are exact either way
        codes = (pred_index * num_classes + label_index).long()
        confusion = torch.bincount(codes, minlength=num_classes**2)
        confusion = confusion.view(num_classes, num_classes)  # rows: predicted class, columns: true class
        tp = confusion.diagonal()
        predicted, present = confusion.sum(1), confusion.sum(0)
    else:
        # multi-label or partly empty one-hot maps: class by class, one boolean mask at a time
        def mask(x: torch.Tensor, index: torch.Tensor | None, name: str, c: int) -> torch.Tensor:
            if x.shape[0] == 1:
                return index == c  # type: ignore[operator]
            return _binary_mask(x[c].reshape(-1), name, c)

        tp_l, predicted_l, present_l = [], [], []
        for c in range(num_classes):
            p, y = mask(pred, pred_index, "pred", c), mask(label, label_index, "label", c)
            tp_l.append(torch.count_nonzero(p & y))
            predicted_l.append(torch.count_nonzero(p))
            present_l.append(torch.count_nonzero(y))
        tp, predicted, present = torch.stack(tp_l), torch.stack(predicted_l), torch.stack(present_l)
    return torch.stack((tp, predicted - tp, present - tp), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Scores


def overlap_scores(
    counts: torch.Tensor, metric: str = "dice", ignore_empty: bool = True, penalize_false_positives: bool = False
) -> torch.Tensor:
    """
    Overlap score of every class from ``[tp, fp, fn]`` counts, in float64.

    ``dice = 2tp / (2tp + fp + fn)``, ``iou = tp / (tp + fp + fn)``, ``precision = tp / (tp + fp)``,
    ``recall = tp / (tp + fn)``.

    Empty classes follow MONAI's ``DiceMetric``/``MeanIoU``: with ``ignore_empty=True`` a class absent from the
    ground truth scores NaN (and is left out of every mean), whatever was predicted; with ``ignore_empty=False``
    it scores 1 when also absent from the prediction and 0 otherwise. Any other 0/0 (precision of a class never
    predicted) scores NaN.

    Args:
        counts: integer tensor of shape ``(..., C, 3)``.
        metric: one of ``"dice"``, ``"iou"``, ``"precision"``, ``"recall"``. Defaults to ``"dice"``.
        ignore_empty: see above. Defaults to ``True``.
        penalize_false_positives: with ``ignore_empty=True``, exclude only classes absent from both ground truth
            and prediction; a class predicted where the ground truth has none then scores 0 (dice, iou,
            precision) instead of being skipped, so hallucinated organs lower the means. Defaults to ``False``
            (MONAI's behaviour).

    Returns:
        float64 tensor of shape ``(..., C)``.
    """
    if metric not in OVERLAP_METRICS:
        raise ValueError(f"metric must be one of {OVERLAP_METRICS}, got {metric!r}.")
    tp, fp, fn = counts.double().unbind(-1)
    numerator, denominator = {
        "dice": (2 * tp, 2 * tp + fp + fn),
        "iou": (tp, tp + fp + fn),
        "precision": (tp, tp + fp),
        "recall": (tp, tp + fn),
    }[metric]
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=counts.device)
    scores = torch.where(denominator > 0, numerator / denominator.clamp(min=1), nan)
    empty_label = (tp + fn) == 0
    if not ignore_empty:
        # empty label and empty prediction: a perfect answer (dice = iou = 1), as MONAI's ignore_empty=False
        return torch.where(empty_label & (fp == 0), 1.0, scores)
    excluded = empty_label & (fp == 0) if penalize_false_positives else empty_label
    return torch.where(excluded, nan, scores)


def reduce_scores(scores: torch.Tensor) -> tuple[torch.Tensor, float]:
    """
    Per-class means and the overall mean of per-image scores, skipping NaN.

    The overall mean follows MONAI's ``MetricReduction.MEAN`` (what ``MeanDice``'s ``val_mean_dice`` reports):
    the mean over classes within each image, then over the images having at least one valid class; 0.0 when no
    value is valid. Per-class means follow ``MEAN_BATCH`` except that a class valid in no image is NaN (MONAI
    reports 0, which reads as a total miss).

    Args:
        scores: float tensor of shape ``(N, C)`` with NaN for excluded entries.

    Returns:
        ``(per_class, mean)``: tensor of shape ``(C,)`` and a float.
    """
    valid = ~torch.isnan(scores)
    filled = torch.where(valid, scores, torch.zeros_like(scores))
    per_class = filled.sum(0) / valid.sum(0)  # 0/0 -> NaN for classes never valid
    per_image_valid = valid.sum(1)
    image_means = filled.sum(1)[per_image_valid > 0] / per_image_valid[per_image_valid > 0]
    mean = image_means.mean().item() if image_means.numel() else 0.0
    return per_class, mean


def _nan_mean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return valid.mean().item() if valid.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Organ names


def _organ_key(name: str) -> str:
    key = re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")
    if not key:
        raise ValueError(f"organ name {name!r} has no letters or digits to build a metric key from.")
    return key


def read_organ_names(labels: str | os.PathLike | Sequence[str] | Mapping[Any, str]) -> list[str]:
    """
    Class names indexed by class number, background included.

    Args:
        labels: a sequence of names (index = class), a ``channel_def``-style mapping ``{"0": "background", ...}``,
            or the path of a bundle ``metadata.json`` whose ``network_data_format.outputs.pred.channel_def``
            names the classes.
    """
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        try:
            meta = json.loads(path.read_text())
            labels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"labels: expected a metadata.json with network_data_format.outputs.pred.channel_def, "
                f"could not read it from {str(path)!r} ({type(e).__name__}: {e})."
            ) from e
    if isinstance(labels, Mapping):
        try:
            by_index = {int(k): str(v) for k, v in labels.items()}
        except ValueError as e:
            raise ValueError(f"labels: channel_def keys must be class numbers, got {list(labels)}.") from e
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"labels: channel_def must number classes 0..C-1 without gaps, got {sorted(by_index)}.")
        return [by_index[i] for i in range(len(by_index))]
    if isinstance(labels, Sequence):
        return [str(v) for v in labels]
    raise ValueError(f"labels must be names, a channel_def mapping or a metadata.json path, got {type(labels)}.")


# ----------------------------------------------------------------------------------------------------------------
# Accumulator


def _default_output_transform(output: Any) -> tuple[Any, Any]:
    """``(pred, label)`` from a MONAI engine's output: a dict, or a list of dicts after decollation."""
    if isinstance(output, Mapping):
        return output["pred"], output["label"]
    if isinstance(output, Sequence) and all(isinstance(o, Mapping) for o in output):
        return [o["pred"] for o in output], [o["label"] for o in output]
    return output


def _image_names(batch: Any, image_key: str) -> list[str | None]:
    """``filename_or_obj`` of every image in a MONAI batch (a dict, or a list of dicts after decollation)."""
    items = batch if isinstance(batch, Sequence) and not isinstance(batch, Mapping) else [batch]
    names: list[str | None] = []
    for item in items:
        if not isinstance(item, Mapping):
            names.append(None)
            continue
        meta = getattr(item.get(image_key), "meta", None) or item.get(f"{image_key}_meta_dict") or {}
        filename = meta.get("filename_or_obj")
        if isinstance(filename, (list, tuple)):  # a collated batch dict
            names.extend(str(f) for f in filename)
        else:
            names.append(None if filename is None else str(filename))
    return names


def _images_of(x: Any, name: str) -> list[torch.Tensor]:
    """Split a batch ``BC[spatial]`` tensor or a list of ``C[spatial]`` tensors into per-image tensors."""
    if isinstance(x, (list, tuple)):
        return [_as_plain_tensor(i, name) for i in x]
    x = _as_plain_tensor(x, name)
    if x.ndim < 3:
        raise ValueError(f"{name} must be a BC[spatial] batch or a list of C[spatial] images, got {tuple(x.shape)}.")
    return list(x)


class OrganCounts:
    """
    Accumulates per-image, per-class TP/FP/FN counts over an epoch of an Ignite engine, and turns them into
    per-organ scores. One instance is shared by the ``OrganMetric`` views (``val_mean_dice``, ``val_mean_iou``)
    and the ``OrganMetricsWriter`` attached to the same evaluator, so the data are counted once.

    Under ``torch.distributed`` the counts are synchronised, not the scores: per-image counts are gathered from
    every rank (per-image aggregation, CSV rows) and pooled counts are summed with ``all_reduce`` (global
    aggregation), so a multi-process run reports what a single process would on the same images.

    Args:
        labels: class names, background included: a list, a ``channel_def`` mapping, or the path of the bundle's
            ``metadata.json``. Defaults to ``None``: ``class_0``, ``class_1``, ... (then ``num_classes`` is needed).
        num_classes: number of classes including background. Defaults to ``None``: the number of ``labels``.
        include_background: whether class 0 is reported and enters the means. Defaults to ``True`` (MONAI's
            default); bundles usually pass ``False``.
        aggregation: ``"per_image"`` (default, MONAI's convention: score every image, then average) or
            ``"global"`` (pool the voxels of all images, then score).
        ignore_empty: MONAI's ``ignore_empty``: a class absent from an image's ground truth is left out of the
            means for that image. Defaults to ``True``.
        penalize_false_positives: see ``overlap_scores``; with ``True`` only organs absent from both ground
            truth and prediction are left out, and an organ predicted where there is none scores 0.
            Defaults to ``False`` (MONAI's behaviour).
        output_transform: maps ``engine.state.output`` to ``(pred, label)``, each a ``BC[spatial]`` tensor or a
            list of ``C[spatial]`` tensors. Defaults to reading ``"pred"`` and ``"label"`` from MONAI's output.
        image_key: batch key whose metadata ``filename_or_obj`` names each image in the CSV. Defaults to
            ``"image"``; images without a name get their row number.
    """

    def __init__(
        self,
        labels: str | os.PathLike | Sequence[str] | Mapping[Any, str] | None = None,
        num_classes: int | None = None,
        include_background: bool = True,
        aggregation: str = "per_image",
        ignore_empty: bool = True,
        penalize_false_positives: bool = False,
        output_transform: Callable[[Any], Any] = _default_output_transform,
        image_key: str = "image",
    ) -> None:
        if labels is None and num_classes is None:
            raise ValueError("OrganCounts needs labels (organ names) or num_classes, got neither.")
        names = read_organ_names(labels) if labels is not None else [f"class_{i}" for i in range(num_classes or 0)]
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"num_classes={num_classes} but labels name {len(names)} classes: {names}.")
        if len(names) < 2:
            raise ValueError(f"at least 2 classes (background and one organ) are needed, got {names}.")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
        self.class_names = names
        self.num_classes = len(names)
        self.first_class = 0 if include_background else 1
        self.organ_names = names[self.first_class :]
        self.organ_keys = [_organ_key(n) for n in self.organ_names]
        if len(set(self.organ_keys)) != len(self.organ_keys):
            raise ValueError(f"organ names must stay distinct as metric keys, got {self.organ_keys}.")
        self.aggregation = aggregation
        self.ignore_empty = ignore_empty
        self.penalize_false_positives = penalize_false_positives
        self.output_transform = output_transform
        self.image_key = image_key
        self._engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        self.reset()

    # -- accumulation --------------------------------------------------------------------------------------

    def reset(self) -> None:
        self._counts: list[torch.Tensor] = []
        self._names: list[str | None] = []
        self._synced: dict[str, Any] = {}

    @torch.no_grad()
    def update(self, pred: Any, label: Any, names: Sequence[str | None] | None = None) -> None:
        """
        Count one batch.

        Args:
            pred: ``BC[spatial]`` batch or list of ``C[spatial]`` images, one-hot or class indices (C = 1).
            label: same layout as ``pred`` (one-hot and index may be mixed).
            names: one name per image for the CSV, or ``None``.
        """
        preds, labels = _images_of(pred, "pred"), _images_of(label, "label")
        if len(preds) != len(labels):
            raise ValueError(f"pred and label must hold the same number of images, got {len(preds)} and {len(labels)}.")
        counts = [overlap_counts(p, y, self.num_classes).cpu() for p, y in zip(preds, labels)]
        if names is None or len(names) != len(counts):
            names = [None] * len(counts)
        self._counts.extend(counts)
        self._names.extend(names)
        self._synced = {}

    def attach(self, engine: Engine) -> None:
        """Count every iteration of ``engine``, restarting each epoch. Attaching twice is a no-op."""
        if engine in self._engines:
            return
        self._engines.add(engine)
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update_from_engine)

    def _update_from_engine(self, engine: Engine) -> None:
        pred, label = self.output_transform(engine.state.output)
        self.update(pred, label, names=_image_names(engine.state.batch, self.image_key))

    # -- synchronised results (collective calls: every rank must make them, in the same order) -----------------

    def image_counts(self) -> tuple[torch.Tensor, list[str]]:
        """Counts ``(N, C, 3)`` of the images of all ranks, rank by rank, and their names."""
        if "images" not in self._synced:
            local = torch.stack(self._counts) if self._counts else torch.zeros(0, self.num_classes, 3, dtype=torch.long)
            names = list(self._names)
            if idist.get_world_size() > 1:
                device = idist.device()  # nccl gathers CUDA tensors only
                sizes = idist.all_gather(torch.tensor([len(local)], device=device)).tolist()
                padded = torch.zeros(max(sizes), self.num_classes, 3, dtype=torch.long, device=device)
                padded[: len(local)] = local.to(device)
                gathered = idist.all_gather(padded).view(len(sizes), max(sizes), self.num_classes, 3).cpu()
                local = torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])
                names = [n for rank_names in idist.all_gather(names) for n in rank_names]
            names = [n if n is not None else f"image_{i}" for i, n in enumerate(names)]
            self._synced["images"] = (local, names)
        return self._synced["images"]

    def total_counts(self) -> tuple[torch.Tensor, int]:
        """Counts ``(C, 3)`` pooled over the images of all ranks (an ``all_reduce`` sum), and the image count."""
        if "total" not in self._synced:
            local = sum(self._counts, torch.zeros(self.num_classes, 3, dtype=torch.long))
            n_images = torch.tensor([len(self._counts)], dtype=torch.long)
            if idist.get_world_size() > 1:
                both = idist.all_reduce(torch.cat([local.view(-1), n_images]).to(idist.device())).cpu()
                local, n_images = both[:-1].view(self.num_classes, 3), both[-1:]
            self._synced["total"] = (local, int(n_images.item()))
        return self._synced["total"]

    def organ_scores(self, metric: str = "dice") -> tuple[torch.Tensor, float]:
        """
        Per-organ scores ``(C',)`` and their mean, following ``aggregation`` (``C'`` drops the background when
        ``include_background=False``).

        Raises:
            NotComputableError: no image was counted on any rank.
        """
        if self.aggregation == "global":
            total, n_images = self.total_counts()
            if n_images == 0:
                raise NotComputableError("OrganCounts: no image was counted before computing scores.")
            per_organ = self._scores(total[self.first_class :], metric)
            return per_organ, _nan_mean(per_organ)
        scores = self.image_scores(metric)
        if len(scores) == 0:
            raise NotComputableError("OrganCounts: no image was counted before computing scores.")
        return reduce_scores(scores)

    def image_scores(self, metric: str = "dice") -> torch.Tensor:
        """Scores ``(N, C')`` of every image of all ranks, NaN where a class is excluded."""
        counts, _ = self.image_counts()
        return self._scores(counts[:, self.first_class :], metric)

    def _scores(self, counts: torch.Tensor, metric: str) -> torch.Tensor:
        return overlap_scores(counts, metric, self.ignore_empty, self.penalize_false_positives)


# ----------------------------------------------------------------------------------------------------------------
# Ignite views


class OrganMetric(Metric):
    """
    Ignite metric reporting one overlap score of a shared ``OrganCounts``: its mean under the attached name
    (e.g. ``val_mean_dice``) and every organ's value under ``"<name>/<organ>"`` (e.g. ``val_mean_dice/spleen``),
    which MONAI's ``StatsHandler`` and ``TensorBoardStatsHandler`` then log each validation. Several views of one
    ``OrganCounts`` count the data once: the counts attach to the engine with the first view.

    Args:
        counts: the shared accumulator.
        metric: one of ``"dice"``, ``"iou"``, ``"precision"``, ``"recall"``. Defaults to ``"dice"``.
        per_organ: whether to add the per-organ entries to ``engine.state.metrics``. Defaults to ``True``.
        save_details: whether to store the per-image scores ``(N, C')`` in ``engine.state.metric_details[name]``
            as MONAI's metric handlers do (read by ``MetricsSaver``). Defaults to ``True``.
    """

    def __init__(self, counts: OrganCounts, metric: str = "dice", per_organ: bool = True, save_details: bool = True):
        if not isinstance(counts, OrganCounts):
            raise ValueError(f"counts must be an OrganCounts, got {type(counts).__name__}.")
        if metric not in OVERLAP_METRICS:
            raise ValueError(f"metric must be one of {OVERLAP_METRICS}, got {metric!r}.")
        self.counts = counts
        self.metric = metric
        self.per_organ = per_organ
        self.save_details = save_details
        super().__init__()

    # the shared OrganCounts does the counting; a view only reads
    def reset(self) -> None:
        pass

    def update(self, output: Any) -> None:
        pass

    def iteration_completed(self, engine: Engine) -> None:
        pass

    def compute(self) -> float:
        return self.counts.organ_scores(self.metric)[1]

    def attach(self, engine: Engine, name: str, usage: Any = "epoch_wise") -> None:
        self.counts.attach(engine)
        super().attach(engine, name, usage)

    def completed(self, engine: Engine, name: str) -> None:
        per_organ, mean = self.counts.organ_scores(self.metric)
        engine.state.metrics[name] = mean
        if self.per_organ:
            for key, value in zip(self.counts.organ_keys, per_organ.tolist()):
                engine.state.metrics[f"{name}/{key}"] = value
        if self.save_details:
            if not hasattr(engine.state, "metric_details"):
                engine.state.metric_details = {}  # type: ignore[attr-defined]
            engine.state.metric_details[name] = self.counts.image_scores(self.metric).float()  # type: ignore


# ----------------------------------------------------------------------------------------------------------------
# Report


class OrganMetricsWriter:
    """
    Handler that, at the end of each run of an evaluator, logs a per-organ table and writes two CSV files:

    - ``<output_dir>/<filename>``: one row per image (column ``image``), one column per metric and organ
      (``dice_spleen``, ..., ``iou_spleen``, ...), NaN where the organ is excluded for that image;
    - ``<output_dir>/<summary_filename>``: one row per organ (per-organ values under the ``OrganCounts``
      aggregation, and how many images scored it) and a last row ``mean``.

    Under ``torch.distributed`` every rank takes part in gathering the counts; rank 0 logs and writes.

    Args:
        counts: the ``OrganCounts`` shared with the evaluator's ``OrganMetric`` views.
        output_dir: folder of the CSV files; created if missing. Defaults to ``None``: log the table only.
        metrics: scores to report. Defaults to ``("dice", "iou")``.
        filename: per-image CSV name. Defaults to ``"organ_metrics.csv"``.
        summary_filename: per-organ CSV name. Defaults to ``"organ_metrics_summary.csv"``.
        logger_name: logger of the table. Defaults to ``"ctlosses.organ_metrics"``; set ``None`` to log nothing.
        show_epoch: name the engine's epoch in the table's title (``epoch 5: per-organ scores ...``), for a
            validation run during training, whose evaluator counts the trainer's epochs. Defaults to ``False``.
    """

    def __init__(
        self,
        counts: OrganCounts,
        output_dir: str | os.PathLike | None = None,
        metrics: Sequence[str] = ("dice", "iou"),
        filename: str = "organ_metrics.csv",
        summary_filename: str = "organ_metrics_summary.csv",
        logger_name: str | None = "ctlosses.organ_metrics",
        show_epoch: bool = False,
    ) -> None:
        unknown = [m for m in metrics if m not in OVERLAP_METRICS]
        if unknown or not metrics:
            raise ValueError(f"metrics must be a non-empty subset of {OVERLAP_METRICS}, got {list(metrics)}.")
        self.counts = counts
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.metrics = tuple(metrics)
        self.filename = filename
        self.summary_filename = summary_filename
        self.logger = None if logger_name is None else logging.getLogger(logger_name)
        self.show_epoch = show_epoch

    def attach(self, engine: Engine) -> None:
        self.counts.attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        _, names = self.counts.image_counts()
        if not names:
            return
        image_scores = {m: self.counts.image_scores(m) for m in self.metrics}
        organ_scores = {m: self.counts.organ_scores(m) for m in self.metrics}
        if idist.get_rank() != 0:
            return
        if self.logger is not None:
            title = f"epoch {engine.state.epoch}: " if self.show_epoch and engine is not None else ""
            self.logger.info(title + self._table(organ_scores, len(names)))
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._write_images(names, image_scores)
            self._write_summary(image_scores, organ_scores)

    def _table(self, organ_scores: Mapping[str, tuple[torch.Tensor, float]], n_images: int) -> str:
        width = max(len(n) for n in [*self.counts.organ_names, "organ"])
        lines = [f"per-organ scores over {n_images} images ({self.counts.aggregation} aggregation)"]
        lines.append(f"{'organ':<{width}}  " + "  ".join(f"{m:>9}" for m in self.metrics))
        for i, organ in enumerate(self.counts.organ_names):
            values = (organ_scores[m][0][i].item() for m in self.metrics)
            lines.append(f"{organ:<{width}}  " + "  ".join(f"{v:9.4f}" for v in values))
        lines.append(f"{'mean':<{width}}  " + "  ".join(f"{organ_scores[m][1]:9.4f}" for m in self.metrics))
        return "\n".join(lines)

    def _write_images(self, names: Sequence[str], image_scores: Mapping[str, torch.Tensor]) -> None:
        header = ["image"] + [f"{m}_{k}" for m in self.metrics for k in self.counts.organ_keys]
        columns = torch.cat([image_scores[m] for m in self.metrics], dim=1).tolist()
        with open(self.output_dir / self.filename, "w", newline="") as f:  # type: ignore[operator]
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([name, *(_format(v) for v in row)] for name, row in zip(names, columns))

    def _write_summary(
        self, image_scores: Mapping[str, torch.Tensor], organ_scores: Mapping[str, tuple[torch.Tensor, float]]
    ) -> None:
        first = image_scores[self.metrics[0]]
        n_valid = (~torch.isnan(first)).sum(0).tolist()
        with open(self.output_dir / self.summary_filename, "w", newline="") as f:  # type: ignore[operator]
            writer = csv.writer(f)
            writer.writerow(["organ", *self.metrics, "images_scored"])
            for i, organ in enumerate(self.counts.organ_names):
                writer.writerow([organ, *(_format(organ_scores[m][0][i].item()) for m in self.metrics), n_valid[i]])
            writer.writerow(["mean", *(_format(organ_scores[m][1]) for m in self.metrics), len(first)])


def _format(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6f}"


def log_mean_metrics(engine: Engine, logger_name: str = "monai.handlers.StatsHandler") -> None:
    """
    An ``epoch_print_logger`` for MONAI's ``StatsHandler`` on an evaluator that has ``OrganMetric`` views: one line
    with the means (``val_mean_dice: 0.8123 val_mean_iou: 0.7012``), leaving out the ``"<name>/<organ>"`` entries
    that ``OrganMetricsWriter`` shows as a table, then the key metric's best value and its epoch.

    Args:
        engine: the evaluator, after its epoch.
        logger_name: logger of the two lines. Defaults to the ``StatsHandler``'s.
    """
    logger = logging.getLogger(logger_name)
    means = {k: v for k, v in engine.state.metrics.items() if "/" not in k and isinstance(v, (int, float))}
    if means:
        values = " ".join(f"{name}: {float(means[name]):.4f}" for name in sorted(means))
        logger.info(f"Epoch[{engine.state.epoch}] Metrics -- {values}")
    key = getattr(engine.state, "key_metric_name", None)
    if key is not None and hasattr(engine.state, "best_metric"):
        best, epoch = engine.state.best_metric, getattr(engine.state, "best_metric_epoch", -1)
        logger.info(f"Key metric: {key} best value: {float(best):.4f} at epoch: {epoch}")
