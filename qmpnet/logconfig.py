"""Logging of the entry points: one handler on stderr, and the libraries' loggers quiet unless asked for.

qemu.qmp logs an ERROR for every connection attempt that fails and paho (under aiomqtt) logs its socket errors,
but qmpnet reports those failures itself: the command line as its one ``error: <code>: <message>`` line,
``qmpnet serve`` in its own log. So the libraries' loggers are silent unless the level is DEBUG (``--verbose``),
where everything shows. Silent includes qemu.qmp's CRITICAL "bug in the QMP library" report: it also comes when
a connection attempt is cancelled during its clean-up (``qmpnet serve`` stopping), and a real failure reaches
qmpnet as the exception anyway.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Final, Literal

__all__ = ["LIBRARY_LOGGERS", "JsonFormatter", "LogStyle", "configure"]

#: The loggers of the libraries under qmpnet's adapters: qemu.qmp, aiomqtt's default, and the one the bus hands
#: to aiomqtt for paho.
LIBRARY_LOGGERS: Final = ("qemu", "mqtt", "qmpnet.adapters.mqtt.paho")

#: ``cli``: ``warning: <message>``, the command line's own style; ``text``: time, level, logger and message;
#: ``json``: one JSON object per line.
LogStyle = Literal["cli", "text", "json"]

_CONTEXT: Final = ("guest", "transaction")
_SILENT: Final = logging.CRITICAL + 1


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the guest and transaction when known."""

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as a JSON line."""
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _CliFormatter(logging.Formatter):
    """``warning: <message>`` on one line, next to the command line's ``error: <code>: <message>``."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {' '.join(record.getMessage().splitlines())}"


def configure(level: int | str, style: LogStyle = "text") -> None:
    """Log to stderr from ``level`` up, in ``style``; the library loggers stay quiet unless ``level`` is DEBUG.

    Replaces the root logger's handlers, so calling it again (a second command in one process) does not double
    the lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    if style == "json":
        handler.setFormatter(JsonFormatter())
    elif style == "cli":
        handler.setFormatter(_CliFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    verbose = root.level <= logging.DEBUG
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else _SILENT)
