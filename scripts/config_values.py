"""Config values as users type them: ``monai.bundle run`` passes command-line values through ``fire``, so
``--resume false`` arrives as the string ``'false'`` (truthy) while ``--resume False`` arrives as a bool, and a
number from an args file or a quoted override may be a string. ``configs/train.json`` reads every such setting
once, through :func:`read_settings`, and the rest of the config uses the typed result (``@settings``).
"""

from __future__ import annotations

import math

from scripts.errors import BundleError

TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")


class ConfigValueError(BundleError, ValueError):
    """A config value of the wrong kind; the message names the key and what it accepts."""


def _refuse(key: str, expected: str, value) -> ConfigValueError:
    return ConfigValueError(f"config key '{key}' (--{key}): expected {expected}, got {value!r}.")


def read_bool(value, key: str) -> bool:
    """``value`` as a bool: a bool, 0/1, or true/false, yes/no, 1/0 in any case; anything else names ``key``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise _refuse(key, "true or false (also yes/no, 1/0, any case)", value)


def _as_number(value, key: str, expected: str) -> float:
    if isinstance(value, bool):  # True is an int to Python, but never a count or a rate to a user
        raise _refuse(key, expected, value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _refuse(key, expected, value)


def read_int(value, key: str, minimum: int = 0) -> int:
    """``value`` as a whole number >= ``minimum``: an int, a whole float (``5.0``) or a string of one."""
    expected = f"a whole number >= {minimum}"
    number = _as_number(value, key, expected)
    if not math.isfinite(number) or number != round(number) or number < minimum:
        raise _refuse(key, expected, value)
    return int(number)


def read_positive_float(value, key: str) -> float:
    """``value`` as a finite number > 0 (a learning rate): an int, a float or a string of one (``'1e-3'``)."""
    expected = "a finite number > 0"
    number = _as_number(value, key, expected)
    if not math.isfinite(number) or number <= 0:
        raise _refuse(key, expected, value)
    return number


# every setting of train.json a user is expected to type, and how it is read
READERS = {
    "resume": read_bool,
    "generate_phantom": read_bool,
    "amp": read_bool,
    "epochs": lambda v, k: read_int(v, k, minimum=1),
    "val_interval": lambda v, k: read_int(v, k, minimum=1),
    "batch_size": lambda v, k: read_int(v, k, minimum=1),
    "num_samples": lambda v, k: read_int(v, k, minimum=1),
    "num_workers": lambda v, k: read_int(v, k, minimum=0),
    "num_classes": lambda v, k: read_int(v, k, minimum=2),
    "keep_epoch_checkpoints": lambda v, k: read_int(v, k, minimum=1),
    "learning_rate": read_positive_float,
}


def read_settings(**values) -> dict:
    """Each keyword read with its reader in :data:`READERS` (keyed by the config key it came from).

    Raises:
        ConfigValueError: for the first value that is not of its kind, naming its key.
    """
    unknown = sorted(set(values) - set(READERS))
    if unknown:  # a config calling this with a setting nobody taught us to read is our mistake, not the user's
        raise TypeError(f"read_settings: no reader for {unknown}; known: {sorted(READERS)}")
    return {key: READERS[key](value, key) for key, value in values.items()}
