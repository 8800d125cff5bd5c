"""Library chatter goes to the run's log, not the terminal.

During a training run transformers, PEFT, bitsandbytes, accelerate, datasets and torch print
notices that ask nothing of the user (bitsandbytes' "Failed to load CPU gemm_4bit_forward from
kernels-community" at import time, transformers' FutureWarnings about its own API). While
`library_output_to_log()` is active, their log records and the warnings raised in their code are
kept and written to logs/training.log as soon as `relay_into(handler)` names its file handler
(records from before that, such as bitsandbytes' import-time notice, are written first, with their
own time). Records at ERROR or above still show on the terminal as well, and exceptions are never
touched: a real failure is seen where it happens. Our own logger ("llm_finetune") is left alone.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

# Libraries whose log records are routed; child loggers ("bitsandbytes.backends.cpu.ops") propagate to these.
LIBRARIES = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "torch", "huggingface_hub", "trl",
             "kernels", "safetensors", "tokenizers")
# These attach their own stderr handler when imported; importing their logging module first lets it be removed.
_SELF_CONFIGURING = ("transformers.utils.logging", "datasets.utils.logging", "huggingface_hub.utils.logging")
_BUFFER_LIMIT = 10_000


class _Relay(logging.Handler):
    """Holds library records until the run's log file exists, then writes them (and later ones) there."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.target: logging.Handler | None = None
        self.pending: list[logging.LogRecord] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        tagged = copy.copy(record)
        tagged.msg, tagged.args = f"[{record.name}] {record.getMessage()}", None
        if record.levelno >= logging.ERROR:  # a library's error still reaches the user
            print(tagged.msg, file=sys.stderr)
        if self._target_alive():
            self.target.handle(tagged)
        elif len(self.pending) < _BUFFER_LIMIT:
            self.pending.append(tagged)
        else:
            self.dropped += 1

    def _target_alive(self) -> bool:
        """The target counts only while it is still attached to our logger (a later run replaces it)."""
        return self.target is not None and self.target in logging.getLogger("llm_finetune").handlers

    def flush_into(self, handler: logging.Handler) -> None:
        self.target = handler
        for record in self.pending:
            handler.handle(record)
        if self.dropped:
            handler.handle(logging.makeLogRecord({"msg": f"[llm_finetune] {self.dropped} earlier library messages "
                                                         "were not kept", "levelno": logging.WARNING,
                                                  "levelname": "WARNING"}))
        self.pending, self.dropped = [], 0


_active: _Relay | None = None  # the routing in force, if any
_removed_handlers: list[tuple[logging.Logger, logging.Handler]] = []  # libraries' terminal handlers, to restore


def relay_into(handler: logging.Handler) -> None:
    """Send library records to this (the run's log file) handler, earlier ones first; no-op when not routing."""
    if _active is not None:
        _strip_terminal_handlers(_removed_handlers)
        _active.flush_into(handler)


def _is_library_code(filename: str | None, module: str | None) -> bool:
    """Raised by an installed library: by its module name, or by a file under site-packages."""
    top = (module or "").split(".")[0]
    if top == "llm_finetune":
        return False
    if top in LIBRARIES:
        return True
    parts = os.path.normpath(filename or "").split(os.sep)
    return any(p in ("site-packages", "dist-packages") for p in parts)


def _warning_caller_module() -> str | None:
    """The module that called warnings.warn: the first frame outside the warnings machinery and this module."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in ("warnings", __name__):
        frame = frame.f_back
    return frame.f_globals.get("__name__") if frame is not None else None


def _warning_router(shown):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _active is None or not _is_library_code(filename, _warning_caller_module()):
            return shown(message, category, filename, lineno, file, line)
        record = logging.makeLogRecord({
            "name": "warnings", "levelno": logging.WARNING, "levelname": "WARNING", "pathname": filename,
            "lineno": lineno, "msg": f"{category.__name__}: {message} ({filename}:{lineno})"})
        _active.handle(record)

    return showwarning


def _strip_terminal_handlers(removed: list[tuple[logging.Logger, logging.Handler]]) -> None:
    """Remove the terminal handlers libraries attach to their own root logger (remembered for restoring).

    Only plain StreamHandlers: a FileHandler (a subclass) someone configured keeps working.
    """
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler:
                logger.removeHandler(h)
                removed.append((logger, h))


@contextmanager
def library_output_to_log(quiet_errors: tuple[type[BaseException], ...] = ()) -> Iterator[_Relay]:
    """Route library log records and warnings to the run's log for the duration; restore everything after.

    If the block fails with an exception not in `quiet_errors` before the log file existed, the held
    library messages are printed to stderr, since they may explain the failure.
    """
    global _active
    if _active is not None:  # nested: the outer routing stays in charge
        yield _active
        return
    for module in _SELF_CONFIGURING:  # their import-time setup done now, so it can be undone below
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    relay = _Relay()
    previous_showwarning = warnings.showwarning
    propagate = {name: logging.getLogger(name).propagate for name in LIBRARIES}
    try:
        _active = relay
        warnings.showwarning = _warning_router(previous_showwarning)
        for name in LIBRARIES:
            logging.getLogger(name).addHandler(relay)
            logging.getLogger(name).propagate = False
        _removed_handlers.clear()
        _strip_terminal_handlers(_removed_handlers)
        yield relay
    except Exception as e:
        if relay.target is None and relay.pending and not isinstance(e, quiet_errors):
            print("library messages before the failure:", file=sys.stderr)
            for record in relay.pending:
                print(f"  {record.levelname} {record.getMessage()}", file=sys.stderr)
        raise
    finally:
        _active = None
        warnings.showwarning = previous_showwarning
        for name, was in propagate.items():
            logging.getLogger(name).removeHandler(relay)
            logging.getLogger(name).propagate = was
        for logger, handler in _removed_handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        _removed_handlers.clear()
