"""Network-grid probabilities to the label map on the input's own grid, a slab and a chunk of channels at a time.

The model zoo's postprocessing ``Activationsd(softmax) -> Invertd(nearest_interp=False) -> AsDiscreted(argmax)``
resamples every probability channel back to the input's full resolution before taking the argmax: 14 channels of
a 512 x 512 x 200 CT are 2.9 GB per float32 copy, and MONAI's inverse makes several copies, in float64 too
(``Spacingd``'s default dtype), plus a float64 sampling grid of the whole volume. Keeping the softmax on the network
grid, where it is small, ``InvertArgmaxd`` replaces the last two steps with MONAI's own inverse machinery (the
``applied_operations`` that ``Invertd`` reads, each undone by the preprocessing transform that recorded it):

1. operations recorded after the last resampling (crops, pads) are undone on the network grid, all channels;
2. the resampling (``Spacingd``) is undone for a slab of output slices and ``chunk_size`` channels at a time:
   the same inverse, asked for a grid of those slices only (its recorded output size and affine narrowed to the
   slab), folded into a running maximum and its channel index. A channel replaces the running best only where it
   is strictly greater, so ties go to the lowest channel, as ``torch.argmax`` does. A channel whose probability
   stays below ``1/C`` on every network-grid voxel a slab is resampled from cannot win in that slab (a resampled
   value is a weighted mean of those voxels, and the winner of ``C`` probabilities is at least ``1/C``) and is
   not resampled there. ``Spacingd`` keeps each axis's direction, so on an axis-aligned scan its inverse maps
   axis to axis, and a slab is resampled with the same trilinear weights as three small matrix products, one
   per axis (``separable_resample``, several times faster than ``grid_sample`` over a full-size grid); an
   oblique scan takes MONAI's inverse;
3. operations recorded before it, voxel permutations only (``Orientationd``), are undone on the label map.

Preprocessing of another shape (an interpolating step before the last resampling) is undone on whole volumes,
``chunk_size`` channels at a time. Interpolation weights do not mix channels, and a slab's voxels are sampled at
the same positions as in the whole grid, so the labels equal ``Invertd``'s, voxel for voxel
(``tests/infer/test_lean_inverse.py``; the separable path is at most one float32 rounding step from
``grid_sample``'s float64 values, which can only change a label where two channels are that close). Everything runs on the device the probabilities are on.

Config use, in place of ``Invertd`` and ``AsDiscreted``::

    {"_target_": "Activationsd", "keys": "pred", "softmax": true},
    {"_target_": "scripts.lean_inverse.InvertArgmaxd", "keys": "pred", "transform": "@preprocessing",
     "orig_keys": "image", "chunk_size": 14, "slab_voxels": 2097152}
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from copy import deepcopy
from dataclasses import dataclass

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.transforms.utils import allow_missing_keys_mode
from monai.utils import ensure_tuple_rep


def invert_channels(
    channels: torch.Tensor, reference: MetaTensor, transform: InvertibleTransform, orig_key: Hashable
) -> MetaTensor:
    """The inverse of ``transform`` applied to ``channels`` (``C[spatial]`` on the network grid), using the
    operations that ``transform`` recorded on ``reference`` (the preprocessed image), as ``Invertd`` does.

    The chunked path calls this once per chunk; it is the one place full-resolution channels are made."""
    chunk = MetaTensor(channels)
    chunk.applied_operations = deepcopy(reference.applied_operations)  # the inverse pops them as it goes
    chunk.meta = deepcopy(reference.meta)
    with allow_missing_keys_mode(transform):  # the preprocessing names keys (image_path...) this dict lacks
        return transform.inverse({orig_key: chunk})[orig_key]


def label_dtype(num_channels: int) -> torch.dtype:
    """The smallest integer type that holds every channel index."""
    return torch.uint8 if num_channels <= 256 else torch.int32


def running_argmax(
    inverted: torch.Tensor, channels: torch.Tensor, best: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Fold the channels ``inverted`` (``k[spatial]``, channel numbers ``channels``, increasing) into the running
    maximum ``best`` (None before the first chunk) and its channel number ``labels`` (updated in place); returns
    ``best``. Within the chunk ``max`` gives the first of equal maxima, as ``argmax`` does; a later chunk takes a
    voxel only where it is strictly greater, so ties keep the lowest channel throughout."""
    values, indices = inverted.max(dim=0)
    numbers = channels.to(indices.device)[indices]
    if best is None:
        labels.copy_(numbers)
        return values
    greater = values > best
    labels.copy_(torch.where(greater, numbers, labels))
    torch.maximum(best, values, out=best)
    return best


def inverted_argmax(
    scores: torch.Tensor,
    reference: MetaTensor,
    transform: InvertibleTransform,
    orig_key: Hashable = "image",
    chunk_size: int = 1,
) -> tuple[torch.Tensor, MetaTensor]:
    """Per voxel of the input's grid, the index of the channel of ``scores`` (``C[spatial]``, network grid) that
    is largest after inverting ``transform`` on the whole volume, ``chunk_size`` channels at a time.

    Returns ``(labels, template)``: ``labels`` a plain ``[spatial]`` integer tensor on the input's grid,
    ``template`` an empty ``MetaTensor`` with the metadata (affine, file name, remaining operations) of the
    inverted chunks.
    """
    best = labels = template = None
    for start in range(0, scores.shape[0], chunk_size):
        chunk = invert_channels(scores[start : start + chunk_size], reference, transform, orig_key)
        template = MetaTensor(torch.empty(0), meta=chunk.meta, applied_operations=chunk.applied_operations)
        inverted = chunk.as_tensor()
        del chunk  # only ``inverted`` keeps the chunk's voxels, and it goes at the end of the iteration
        if labels is None:
            labels = torch.empty(inverted.shape[1:], dtype=label_dtype(scores.shape[0]), device=inverted.device)
        best = running_argmax(inverted, torch.arange(start, start + inverted.shape[0]), best, labels)
        del inverted
    return labels, template


# ------------------------------------------------------------------------------------------------ slab path

#: operations whose inverse only moves voxels (no interpolation), so they can be undone on the label map itself
VOXEL_PERMUTATIONS = {"Orientation", "Flip"}
RESAMPLE = "SpatialResample"


@dataclass
class InverseStages:
    """The preprocessing's invertible transforms split around its last resampling (``Spacingd``): ``after`` are
    undone on the network grid, ``resample`` slab by slab, ``before`` on the label map (voxel permutations only)."""

    before: list[InvertibleTransform]
    resample: InvertibleTransform
    after: list[InvertibleTransform]


def inverse_stages(transform: InvertibleTransform, reference: MetaTensor, orig_key: Hashable) -> InverseStages | None:
    """The stages for ``reference``'s recorded operations, or None when the slab path does not apply (no
    resampling, an interpolating operation before it, or operations that do not pair with the transforms)."""
    steps = getattr(transform, "transforms", [transform])
    invertible = [t for t in steps if isinstance(t, InvertibleTransform) and orig_key in getattr(t, "keys", ())]
    classes = [op["class"] for op in reference.applied_operations]
    if len(invertible) != len(classes) or RESAMPLE not in classes:
        return None
    last = len(classes) - 1 - classes[::-1].index(RESAMPLE)
    if not set(classes[:last]) <= VOXEL_PERMUTATIONS:
        return None
    return InverseStages(invertible[:last], invertible[last], invertible[last + 1 :])


def undo(steps: list[InvertibleTransform], image: MetaTensor, orig_key: Hashable) -> MetaTensor:
    """``steps``' inverses, last step first, each popping its own operation from ``image``."""
    for step in reversed(steps):
        with allow_missing_keys_mode(step):  # a step may also name keys (label) this dict lacks
            image = step.inverse({orig_key: image})[orig_key]
    return image


def axis_aligned(xform: torch.Tensor, out_shape: tuple[int, ...], tolerance: float = 1e-9) -> bool:
    """True when the voxel map ``xform`` (4 x 4) scales and shifts each axis on its own, to within ``tolerance``
    voxels over a grid of ``out_shape``: then the result cannot differ from the full trilinear one by more than
    float rounding. ``Spacingd`` keeps the direction of every axis, so this holds for axis-aligned scans; an oblique
    affine stored in float32 (a NIfTI sform) leaves cross terms of about 1e-8 and goes to MONAI's inverse."""
    linear = xform[:3, :3]
    cross = (linear - torch.diag(torch.diagonal(linear))).abs()
    extent = torch.tensor([max(n - 1, 0) for n in out_shape], dtype=cross.dtype)
    return bool((cross @ extent).max() <= tolerance)


def interpolation_matrix(positions: torch.Tensor, size: int, padding_mode: str, dtype: torch.dtype) -> torch.Tensor:
    """The ``len(positions) x size`` matrix of 1D linear interpolation at the (fractional) voxel ``positions``:
    two weights per row, outside the grid as ``grid_sample``'s ``padding_mode`` ("border": the edge voxel,
    "zeros": 0 for taps outside)."""
    if padding_mode == "border":
        positions = positions.clamp(0, size - 1)
    low = positions.floor()
    upper_weight = positions - low
    rows = torch.arange(len(positions), device=positions.device)
    matrix = torch.zeros(len(positions), size, dtype=dtype, device=positions.device)
    for weight, tap in ((1 - upper_weight, low.long()), (upper_weight, low.long() + 1)):
        inside = (tap >= 0) & (tap < size)  # under "border" a tap outside has weight 0
        matrix.index_put_((rows[inside], tap[inside]), weight[inside].to(dtype), accumulate=True)
    return matrix


def separable_resample(
    channels: torch.Tensor, xform: torch.Tensor, out_shape: tuple[int, ...], padding_mode: str, dtype: torch.dtype
) -> torch.Tensor:
    """Trilinear resampling of ``channels`` (``C[spatial]``) onto ``out_shape``, output voxel ``j`` taking the value
    at input voxel ``xform @ j`` (axis-aligned): the weights of ``grid_sample``'s eight taps, applied as one
    matrix product per axis, without its full-size sampling grid. The slab's short last axis goes first."""
    values = channels.to(dtype)
    device = values.device

    def matrix(axis: int) -> torch.Tensor:
        index = torch.arange(out_shape[axis], dtype=torch.float64, device=device)
        positions = xform[axis, axis].to(device) * index + xform[axis, 3].to(device)
        return interpolation_matrix(positions, values.shape[axis + 1], padding_mode, dtype)

    # the two inner axes as plain 2D products on the small network grid (an operand of size-1 axes could
    # otherwise be taken as a batch and the matrix broadcast over it), then the outer axis, batched over channels
    c, n0, n1, n2 = values.shape
    d = out_shape[2]
    values = (values.reshape(-1, n2) @ matrix(2).T).reshape(c, n0, n1, d)
    values = (values.transpose(2, 3).reshape(-1, n1) @ matrix(1).T).reshape(c, n0, d, out_shape[1])
    values = matrix(0) @ values.transpose(2, 3).reshape(c, n0, -1)
    values = values.reshape(c, *out_shape)
    return values.to(torch.float32)  # the type MONAI's resampling returns


def resample_slab(
    channels: torch.Tensor,
    network_grid: MetaTensor,
    resample: InvertibleTransform,
    orig_key: Hashable,
    start: int,
    stop: int,
) -> torch.Tensor:
    """Slices ``start:stop`` (last axis) of the resampling's inverse of ``channels`` (on ``network_grid``, whose
    last recorded operation is the resampling): the same inverse, asked for a grid of those slices only, whose
    affine is the full grid's moved by ``start`` voxels along that axis. Bilinear resampling between
    axis-aligned grids (``Spacingd``'s) takes ``separable_resample``; anything else MONAI's own inverse."""
    record = network_grid.applied_operations[-1]
    shift = torch.eye(4, dtype=torch.float64)
    shift[2, 3] = start
    slab_affine = torch.as_tensor(record["extra_info"]["src_affine"], dtype=torch.float64) @ shift
    slab_shape = (*record["orig_size"][:-1], stop - start)
    info = record["extra_info"]
    network_affine = torch.as_tensor(network_grid.affine.numpy(force=True), dtype=torch.float64)  # a plain tensor
    xform = torch.linalg.solve(network_affine, torch.as_tensor(slab_affine.numpy(force=True)))
    if (
        info.get("mode") == "bilinear"
        and info.get("padding_mode") in ("border", "zeros")
        and axis_aligned(xform, slab_shape)
    ):
        dtype = getattr(torch, str(info.get("dtype", "float32")))
        return separable_resample(channels, xform, slab_shape, info["padding_mode"], dtype)
    slab = MetaTensor(
        channels, meta=deepcopy(network_grid.meta), applied_operations=deepcopy(network_grid.applied_operations)
    )  # the inverse edits its record
    slab.applied_operations[-1]["orig_size"] = slab_shape
    slab.applied_operations[-1]["extra_info"]["src_affine"] = slab_affine
    return undo([resample], slab, orig_key).as_tensor()


def is_probability(scores: torch.Tensor) -> bool:
    """Non-negative channels summing to 1 at every voxel (a softmax), to within float32 rounding."""
    return bool(scores.min() >= 0) and bool((scores.sum(dim=0) - 1).abs().max() < 1e-5)


def slab_support(
    network_grid: MetaTensor, full_affine: torch.Tensor, full_shape: tuple[int, ...], start: int, stop: int
) -> tuple[slice, ...]:
    """The network-grid voxels that can contribute to output slices ``start:stop``: the box around where the
    slab's corners land, widened by two voxels for the interpolation's neighbours and half-voxel conventions."""
    corners = torch.tensor(
        [[i, j, k, 1.0] for i in (0, full_shape[0] - 1) for j in (0, full_shape[1] - 1) for k in (start, stop - 1)],
        dtype=torch.float64,
    )
    to_network = torch.linalg.inv(torch.as_tensor(network_grid.affine, dtype=torch.float64)) @ full_affine.double()
    landed = (to_network @ corners.T)[:3]
    size = network_grid.shape[1:]
    low = [max(int(math.floor(v)) - 2, 0) for v in landed.min(dim=1).values]
    high = [min(int(math.ceil(v)) + 3, n) for v, n in zip(landed.max(dim=1).values, size)]
    return tuple(slice(lo, max(hi, lo + 1)) for lo, hi in zip(low, high))


def contending_channels(probabilities: torch.Tensor, support: tuple[slice, ...]) -> torch.Tensor:
    """The channels that can win somewhere in a slab: every resampled value is a weighted mean of network-grid
    values (weights summing to 1, or less where zero padding enters), so channel ``j`` stays below its maximum
    ``M_j`` over the slab's support, while the winner, the largest of channels that sum to 1, is at least ``1/C``
    (both times the same sum of weights). A channel with ``M_j < 1/C`` can never win; channel 0 is always kept,
    as it takes the voxels where every channel is 0 (outside a crop)."""
    peaks = probabilities[(slice(None), *support)].amax(dim=(1, 2, 3))
    contending = peaks >= (1 - 1e-4) / probabilities.shape[0]  # margin far above float64 and float32 rounding
    contending[0] = True
    return torch.nonzero(contending).flatten().cpu()


def slab_argmax(
    scores: torch.Tensor,
    reference: MetaTensor,
    stages: InverseStages,
    orig_key: Hashable,
    chunk_size: int,
    slab_voxels: int,
) -> MetaTensor:
    """The label map with the resampling undone a slab of output slices and a chunk of channels at a time,
    skipping in each slab the channels that cannot win there (``contending_channels``) when ``scores`` are
    probabilities."""
    network_grid = MetaTensor(
        scores, meta=deepcopy(reference.meta), applied_operations=deepcopy(reference.applied_operations)
    )
    network_grid = undo(stages.after, network_grid, orig_key)  # crops and pads, on the small grid
    full_shape = tuple(network_grid.applied_operations[-1]["orig_size"])
    full_affine = torch.as_tensor(network_grid.applied_operations[-1]["extra_info"]["src_affine"])
    labels = torch.zeros(full_shape, dtype=label_dtype(scores.shape[0]), device=scores.device)
    depth = max(1, slab_voxels // math.prod(full_shape[:-1]))
    probabilities = is_probability(network_grid.as_tensor())
    for start in range(0, full_shape[-1], depth):
        stop = min(start + depth, full_shape[-1])
        channels = torch.arange(scores.shape[0])
        if probabilities:
            support = slab_support(network_grid, full_affine, full_shape, start, stop)
            channels = contending_channels(network_grid.as_tensor(), support)
        best = None
        for first in range(0, len(channels), chunk_size):
            numbers = channels[first : first + chunk_size]
            chunk = network_grid.as_tensor()[numbers.to(scores.device)]
            inverted = resample_slab(chunk, network_grid, stages.resample, orig_key, start, stop)
            best = running_argmax(inverted, numbers, best, labels[..., start:stop])
    on_resampled_grid = MetaTensor(
        labels[None],
        meta={**deepcopy(network_grid.meta), "affine": full_affine},
        applied_operations=network_grid.applied_operations[:-1],
    )
    return undo(stages.before, on_resampled_grid, orig_key)


class InvertArgmaxd(MapTransform):
    """``Invertd(nearest_interp=False)`` + ``AsDiscreted(argmax=True)`` in one transform that never holds the
    probabilities of the whole volume at full resolution (see the module docstring).

    Args:
        keys: the network's probabilities (``C[spatial]`` on the network grid, after ``Activationsd``), replaced by
            the ``1[spatial]`` label map on the input's grid.
        transform: the preprocessing whose spatial transforms are undone (the config's ``@preprocessing``).
        orig_keys: the preprocessed images holding the applied operations, one per key (default: ``keys``).
        chunk_size: channels resampled at a time (default 1).
        slab_voxels: full-resolution voxels resampled at a time, in slabs of whole slices (default 2**21, 8 MiB
            per float32 channel); None resamples whole volumes. Preprocessing with an interpolating step before its
            last resampling always takes whole volumes.
        dtype: the label map's type (default float32, that of ``AsDiscreted``'s output).
        allow_missing_keys: do not raise for a missing key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        transform: InvertibleTransform,
        orig_keys: KeysCollection | None = None,
        chunk_size: int = 1,
        slab_voxels: int | None = 2**21,
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(transform, InvertibleTransform):
            raise ValueError(f"transform must be invertible (the preprocessing), got {type(transform).__name__}.")
        if chunk_size < 1 or (slab_voxels is not None and slab_voxels < 1):
            raise ValueError(f"chunk_size and slab_voxels must be >= 1, got {chunk_size} and {slab_voxels}.")
        self.transform, self.chunk_size, self.slab_voxels, self.dtype = transform, chunk_size, slab_voxels, dtype
        self.orig_keys = ensure_tuple_rep(orig_keys, len(self.keys)) if orig_keys is not None else self.keys

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, orig_key in self.key_iterator(d, self.orig_keys):
            reference = d.get(orig_key)
            if not isinstance(reference, MetaTensor):
                raise ValueError(
                    f"InvertArgmaxd: '{orig_key}' must be the preprocessed image as a MetaTensor (it "
                    f"holds the operations to undo), got {type(reference).__name__}."
                )
            d[key] = self.label_map(d[key], reference, orig_key)
        return d

    def label_map(self, probabilities: torch.Tensor, reference: MetaTensor, orig_key: Hashable) -> MetaTensor:
        """``1[spatial]`` labels on the input's grid, with the metadata ``Invertd`` would give them."""
        scores = probabilities.as_tensor() if isinstance(probabilities, MetaTensor) else torch.as_tensor(probabilities)
        scores = scores.detach()
        if not torch.isfinite(scores).all():  # argmax would silently pick a NaN channel
            source = reference.meta.get("filename_or_obj", "an image")
            raise ValueError(
                f"InvertArgmaxd: the network output for {source} holds NaN or infinite values; check "
                "the image's intensities and the checkpoint."
            )
        stages = inverse_stages(self.transform, reference, orig_key) if self.slab_voxels else None
        if stages is not None:
            labels = slab_argmax(scores, reference, stages, orig_key, self.chunk_size, self.slab_voxels)
            return MetaTensor(
                labels.as_tensor().to(self.dtype), meta=labels.meta, applied_operations=labels.applied_operations
            )
        labels, template = inverted_argmax(scores, reference, self.transform, orig_key, self.chunk_size)
        return MetaTensor(
            labels[None].to(self.dtype), meta=template.meta, applied_operations=template.applied_operations
        )
