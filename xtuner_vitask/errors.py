"""One exception type for every user-facing mistake (bad file, key, config).

The CLI prints it as a single ``error: ...`` message and exits 2. In XTuner's train tool, where no
code of ours is on top of the stack, :func:`install_excepthook` (installed when mmengine is imported,
by install.sh's import hook, and when the project's datasets or models are imported) prints an uncaught VITaskError the same way, without the
traceback; the exit status stays 1. ``VITASK_TRACEBACK=1`` shows the traceback again.
Messages name the thing and the fix.

The class is defined in ``ep/exemplar_errors.py`` (EP exports carry a verbatim copy of ``ep/``).
"""
import os
import sys

from .ep.exemplar_errors import VITaskError  # beside the EP code, so that EP exports raise it too

__all__ = ["VITaskError", "install_excepthook", "user_message"]


_WORKER_PREFIX = "Caught VITaskError in DataLoader worker"


def user_message(exc: BaseException) -> str:
    """The message of a VITaskError, also when torch's DataLoader re-raised it from a worker process
    (its text then holds the worker's traceback, ending in ``...VITaskError: <message>``)."""
    text = str(exc)
    if text.startswith(_WORKER_PREFIX) and "VITaskError: " in text:
        text = text.rsplit("VITaskError: ", 1)[1].rstrip()
    return text


class _ExceptHook:
    """``sys.excepthook`` that prints VITaskErrors as one message and hands everything else on."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, exc_type, exc, tb):
        if issubclass(exc_type, VITaskError) and not os.environ.get("VITASK_TRACEBACK"):
            print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
            return
        self.previous(exc_type, exc, tb)


def install_excepthook() -> None:
    """Print uncaught VITaskErrors as ``error: <message>`` (no traceback); other exceptions as before."""
    if not isinstance(sys.excepthook, _ExceptHook):
        sys.excepthook = _ExceptHook(sys.excepthook)
