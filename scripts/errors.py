"""One message per bad input: the bundle's own errors end the process with a short report, not a traceback.

``python -m monai.bundle run`` lets every exception escape as a traceback of 50-270 lines, with the clear
message buried inside MONAI's ``Failed to evaluate ConfigExpression`` chain and, during a run, printed again
by Ignite's engine logger and by every ``StatsHandler``. :func:`report_errors_briefly` (the first step of
``initialize`` in ``configs/train.json``) replaces ``sys.excepthook`` so that an exception caused by a
:class:`BundleError` prints only that error's message, whose last line names the file or key and the problem.
Anything else is a bug of ours or of a library and keeps its full traceback. ``BUNDLE_DEBUG=1`` (or ``--debug
true`` on the command line) shows the traceback of bundle errors as well.
"""

from __future__ import annotations

import logging
import os
import sys

DEBUG_VARIABLE = "BUNDLE_DEBUG"


class BundleError(Exception):
    """An error the user can fix (bad data, a bad config value, a diverged run): its message is the whole report.

    Messages may span several lines of detail; the last line says which file or key is wrong and what to do.
    """


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [BundleError]
    try:  # the loss constructors' and forwards' input errors (ctlosses belongs to the loss library)
        from ctlosses.core import LossInputError

        types.append(LossInputError)
    except ImportError:
        pass
    return tuple(types)


def find_user_error(error: BaseException | None) -> BaseException | None:
    """The first :class:`BundleError` (or loss input error) in ``error``'s chain of causes and contexts."""
    seen = set()
    user_types = _user_error_types()
    while error is not None and id(error) not in seen:
        if isinstance(error, user_types):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def debug_requested() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def brief_report(error: BaseException) -> str:
    """What the user sees for ``error``: the bundle error's message, with a pointer to the traceback first."""
    found = find_user_error(error)
    message = str(found).strip() or type(found).__name__
    return f"bundle stopped ({DEBUG_VARIABLE}=1 shows the traceback):\n{message}"


def _excepthook(exc_type, error, tb, previous=sys.excepthook) -> None:
    if find_user_error(error) is None or debug_requested():
        previous(exc_type, error, tb)
        return
    _clear_progress_bars()
    sys.stdout.flush()
    print(brief_report(error), file=sys.stderr, flush=True)


def _clear_progress_bars() -> None:
    """An unfinished tqdm bar would be redrawn when the interpreter exits, after the report, as its last line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


def report_errors_briefly(debug: bool | str = False) -> bool:
    """Install the brief report for bundle errors in this process (idempotent); ``debug`` keeps tracebacks.

    Returns True, so a config can list the call among its ``initialize`` expressions.
    """
    from scripts.config_values import read_bool

    if getattr(sys.excepthook, "__name__", "") != _excepthook.__name__:
        previous = sys.excepthook

        def hook(exc_type, error, tb):
            _excepthook(exc_type, error, tb, previous)

        hook.__name__ = _excepthook.__name__
        sys.excepthook = hook
    if read_bool(debug, "debug"):  # after the hook, so that a bad --debug value is reported briefly too
        os.environ[DEBUG_VARIABLE] = "1"
    return True


class _DropEngineErrorEcho(logging.Filter):
    """Ignite logs every exception that ends a run ("... terminating due to exception: <message>") before it
    re-raises it; the exception is reported once when it leaves the process, so the echo is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "terminating due to exception" not in record.getMessage()


class ReportOnce:
    """Ignite handler: an exception inside the engine is re-raised as is, without further logging.

    MONAI's ``StatsHandler`` logs every exception with its traceback on ``EXCEPTION_RAISED`` and Ignite logs it
    once more, on the evaluator and again on the trainer: a non-finite loss used to print three times in up to
    270 lines. Attached before the ``StatsHandler`` (first in the handler lists), this handler raises the
    exception before the ``StatsHandler`` sees it, and silences Ignite's echo; the process then reports it
    once (briefly for a bundle error, with the traceback otherwise).
    """

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if not any(isinstance(f, _DropEngineErrorEcho) for f in engine.logger.filters):
            engine.logger.addFilter(_DropEngineErrorEcho())
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine, error: BaseException) -> None:
        raise error
