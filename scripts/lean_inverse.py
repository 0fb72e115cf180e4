"""Network-grid probabilities to the label map on the input's own grid, a few channels at a time.

The model zoo's postprocessing ``Activationsd(softmax) -> Invertd(nearest_interp=False) -> AsDiscreted(argmax)``
resamples every probability channel back to the input's full resolution before taking the argmax: 14 channels of
a 512 x 512 x 200 CT are 2.9 GB per float32 copy, and the inverse makes several copies (in float64 too). Keeping
the softmax on the network grid, where it is small, ``InvertArgmaxd`` replaces the last two steps and holds only
``chunk_size`` full-resolution channels at a time (plus the sampling grid that MONAI's inverse builds): for one
chunk of channels at a time, the inverse of the preprocessing by MONAI's own machinery (the ``applied_operations``
that ``Invertd`` reads, undone by the preprocessing's ``inverse``), then a running maximum with its channel index
at full resolution. A channel replaces the running best only where it is strictly greater, so ties go to the
lowest channel, as ``torch.argmax`` does.

Resampling is per channel (interpolation weights do not mix channels), so each channel's inverse is bit for bit
the one ``Invertd`` computes for all channels at once, and the labels are identical
(``tests/infer/test_lean_inverse.py``). Everything runs on the device the probabilities are on.

Config use, in place of ``Invertd`` and ``AsDiscreted``::

    {"_target_": "Activationsd", "keys": "pred", "softmax": true},
    {"_target_": "scripts.lean_inverse.InvertArgmaxd", "keys": "pred", "transform": "@preprocessing",
     "orig_keys": "image", "chunk_size": 4}
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from copy import deepcopy

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.transforms.utils import allow_missing_keys_mode
from monai.utils import ensure_tuple_rep


def invert_channels(channels: torch.Tensor, reference: MetaTensor, transform: InvertibleTransform,
                    orig_key: Hashable) -> MetaTensor:  # fmt: skip
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


def inverted_argmax(scores: torch.Tensor, reference: MetaTensor, transform: InvertibleTransform,
                    orig_key: Hashable = "image", chunk_size: int = 1) -> tuple[torch.Tensor, MetaTensor]:  # fmt: skip
    """Per voxel of the input's grid, the index of the channel of ``scores`` (``C[spatial]``, network grid) that
    is largest after inverting ``transform``; ties go to the lowest channel.

    Returns ``(labels, template)``: ``labels`` a plain ``[spatial]`` integer tensor on the input's grid,
    ``template`` an empty ``MetaTensor`` with the metadata (affine, file name, remaining operations) of the
    inverted chunks.
    """
    best = labels = template = None
    for start in range(0, scores.shape[0], chunk_size):
        chunk = invert_channels(scores[start:start + chunk_size], reference, transform, orig_key)
        template = MetaTensor(torch.empty(0), meta=chunk.meta, applied_operations=chunk.applied_operations)
        inverted = chunk.as_tensor()
        del chunk  # only ``inverted`` keeps the chunk's voxels, and it goes at the end of the iteration
        for offset in range(inverted.shape[0]):
            channel = inverted[offset]
            if best is None:
                best = channel.clone()
                labels = torch.zeros(channel.shape, dtype=label_dtype(scores.shape[0]), device=channel.device)
                continue
            greater = channel > best  # strict: an equal later channel does not take the voxel, as in argmax
            labels.masked_fill_(greater, start + offset)
            torch.maximum(best, channel, out=best)
        del inverted
    return labels, template


class InvertArgmaxd(MapTransform):
    """``Invertd(nearest_interp=False)`` + ``AsDiscreted(argmax=True)`` in one transform that never holds more than
    ``chunk_size`` full-resolution channels (see the module docstring).

    Args:
        keys: the network's probabilities (``C[spatial]`` on the network grid, after ``Activationsd``), replaced by
            the ``1[spatial]`` label map on the input's grid.
        transform: the preprocessing whose spatial transforms are undone (the config's ``@preprocessing``).
        orig_keys: the preprocessed images holding the applied operations, one per key (default: ``keys``).
        chunk_size: channels resampled to full resolution at a time (default 4: one chunk's float64 resampling
            takes no more memory than the sampling grid, and fewer chunks build fewer grids).
        dtype: the label map's type (default float32, that of ``AsDiscreted``'s output).
        allow_missing_keys: do not raise for a missing key.
    """

    def __init__(self, keys: KeysCollection, transform: InvertibleTransform, orig_keys: KeysCollection | None = None,
                 chunk_size: int = 4, dtype: torch.dtype = torch.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(transform, InvertibleTransform):
            raise ValueError(f"transform must be invertible (the preprocessing), got {type(transform).__name__}.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        self.transform, self.chunk_size, self.dtype = transform, chunk_size, dtype
        self.orig_keys = ensure_tuple_rep(orig_keys, len(self.keys)) if orig_keys is not None else self.keys

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, orig_key in self.key_iterator(d, self.orig_keys):
            reference = d.get(orig_key)
            if not isinstance(reference, MetaTensor):
                raise ValueError(f"InvertArgmaxd: '{orig_key}' must be the preprocessed image as a MetaTensor (it "
                                 f"holds the operations to undo), got {type(reference).__name__}.")  # fmt: skip
            d[key] = self.label_map(d[key], reference, orig_key)
        return d

    def label_map(self, probabilities: torch.Tensor, reference: MetaTensor, orig_key: Hashable) -> MetaTensor:
        """``1[spatial]`` labels on the input's grid, with the metadata ``Invertd`` would give them."""
        scores = probabilities.as_tensor() if isinstance(probabilities, MetaTensor) else torch.as_tensor(probabilities)
        scores = scores.detach()
        if not torch.isfinite(scores).all():  # argmax would silently pick a NaN channel
            source = reference.meta.get("filename_or_obj", "an image")
            raise ValueError(f"InvertArgmaxd: the network output for {source} holds NaN or infinite values; check "
                             "the image's intensities and the checkpoint.")
        labels, template = inverted_argmax(scores, reference, self.transform, orig_key, self.chunk_size)
        return MetaTensor(labels[None].to(self.dtype), meta=template.meta,
                          applied_operations=template.applied_operations)
