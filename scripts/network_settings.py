"""What a checkpoint was trained with, and the refusal of one that does not fit the config it is used with.

``BestModelSaver`` writes ``models/model.pt`` as ``{"model": state_dict, "network_settings": ...}`` with the
settings of :func:`network_settings`: the preset's name, the network's arguments, ``pixdim``, ``patch_size`` and
``num_classes``. A network trained with ``configs/gpu.json`` (1.5 mm voxels, 96^3 patches, a wider UNet) and used
without it either fails deep inside ``load_state_dict`` or, when only the spacing differs, segments every image at
the wrong scale without a word. :func:`check_checkpoint_fits`, called by ``inference.json``, ``evaluate.json`` and
``scripts.infer`` before any image is read, compares the recorded settings with the config's and names the config
files that fit. A checkpoint written before settings were recorded (a plain state dict) has nothing to compare and
is accepted.
"""

from __future__ import annotations

import inspect
import os

from scripts.checks import CheckpointError
from scripts.training import describe_run

DEFAULT_PRESET = "default"  # train.json and inference.json alone; any other preset is configs/<preset>.json
COMPARED = ("pixdim", "patch_size", "num_classes", "network_def")

# constructor arguments a network keeps under another attribute name (MONAI's UNet: spatial_dims -> dimensions)
ARGUMENT_ATTRIBUTES = {"spatial_dims": "dimensions"}


class CheckpointMismatchError(CheckpointError):
    """A checkpoint trained with other settings than the config's; the message says which files fit."""


def network_arguments(network) -> dict:
    """The network's class and the constructor arguments it keeps as attributes, as plain JSON values.

    Read from the instance rather than the config, so the training and the inference side describe their networks
    the same way whatever the config files were (a ``DistributedDataParallel`` wrapper is looked through).
    """
    network = getattr(network, "module", network)
    parameters = inspect.signature(type(network).__init__).parameters
    arguments = {"_target_": type(network).__name__}
    for name, parameter in parameters.items():
        attribute = ARGUMENT_ATTRIBUTES.get(name, name)
        if name != "self" and parameter.kind is parameter.POSITIONAL_OR_KEYWORD and hasattr(network, attribute):
            arguments[name] = getattr(network, attribute)
    return describe_run(arguments)


def network_settings(preset: str, network, pixdim, patch_size, num_classes: int) -> dict:
    """The settings a checkpoint must share with the config that uses it, plus the preset's name for messages."""
    settings = {"pixdim": pixdim, "patch_size": patch_size, "num_classes": num_classes}
    return {"preset": str(preset), **describe_run(settings), "network_def": network_arguments(network)}


def _differences(recorded: dict, expected: dict) -> list[str]:
    found = []
    for key in COMPARED:
        there, here = recorded.get(key), expected.get(key)
        if key == "network_def" and isinstance(there, dict) and isinstance(here, dict):
            names = [n for n in {**there, **here} if there.get(n) != here.get(n)]
            found += [f"network_def#{n} {there.get(n)} vs {here.get(n)}" for n in names]
        elif there != here:
            found.append(f"{key} {there} vs {here}")
    return found


def _config_files(base_files, preset: str) -> list[str]:
    return [*base_files, *([f"configs/{preset}.json"] if preset != DEFAULT_PRESET else [])]


def _how_to_fit(trained: str, current: str, base_files, option: str) -> str:
    if trained == current:
        return f"run with the values it was trained with (the {trained} preset and the same command-line overrides)"
    files = _config_files(base_files, trained)
    if option == "--config_file":
        given = '--config_file "[' + ",".join(f"'{f}'" for f in files) + ']"'
    else:
        given = f"{option} {' '.join(files)}"
    if trained == DEFAULT_PRESET:
        return f"it was trained without configs/{current}.json: drop it, {given}"
    return f"add configs/{trained}.json: {given}"


def recorded_settings(checkpoint) -> dict | None:
    """The settings in a loaded checkpoint; None for a plain state dict (written before they were recorded)."""
    settings = checkpoint.get("network_settings") if isinstance(checkpoint, dict) else None
    return settings if isinstance(settings, dict) else None


def check_settings_fit(
    path: str | os.PathLike,
    recorded: dict | None,
    expected: dict,
    base_files=("configs/inference.json",),
    option: str = "--config_file",
) -> bool:
    """Refuse checkpoint ``path`` when its ``recorded`` settings differ from ``expected`` (:func:`network_settings`
    of the config); True otherwise, also for a checkpoint without settings. ``base_files`` and ``option`` spell the
    command-line fix: the config files the user gave, without a preset, and the option that takes them
    (``--config_file`` of ``monai.bundle run``, ``--config`` of ``scripts.infer``).

    Raises:
        CheckpointMismatchError: one line naming the checkpoint, its preset, what differs (checkpoint vs config)
            and the config files that fit.
    """
    differences = _differences(recorded, expected) if recorded is not None else []
    if not differences:
        return True
    trained, current = str(recorded.get("preset", DEFAULT_PRESET)), str(expected.get("preset", DEFAULT_PRESET))
    raise CheckpointMismatchError(
        f"checkpoint {path} was trained with the {trained} preset and does not fit this config ({current} preset): "
        f"{', '.join(differences)} (checkpoint vs config); {_how_to_fit(trained, current, base_files, option)}"
    )


def check_checkpoint_fits(
    path: str | os.PathLike,
    expected: dict,
    base_files=("configs/inference.json",),
    option: str = "--config_file",
) -> bool:
    """:func:`check_settings_fit` for the checkpoint file ``path``, read before the loader reads it; a file that
    does not exist yet is left to the loader to report."""
    import torch

    if not os.path.isfile(path):
        return True
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unpickling error is no OSError; say which file it was
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint: {error}") from None
    return check_settings_fit(path, recorded_settings(checkpoint), expected, base_files, option)


class CheckpointFits:
    """Ignite handler: :func:`check_checkpoint_fits` when the evaluator starts, listed before its ``CheckpointLoader``.
    ``evaluate.json`` checks there rather than in ``initialize`` so that a bad validation image, found when the
    datalist is built, is reported first: the user has to fix it whatever the model."""

    def __init__(self, path: str, expected: dict, base_files=("configs/inference.json",)) -> None:
        self.path, self.expected, self.base_files = path, expected, tuple(base_files)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        check_checkpoint_fits(self.path, self.expected, self.base_files)
