"""Structured logs: one event per line, ``key=value`` pairs (logfmt), quiet at INFO.

Every record carries what it is about when the caller knows it: ``function``, ``pe``, ``client``
(peer pid) and ``uid``, passed with ``extra=`` or through a ``LoggerAdapter``. journald and any
log shipper can split the fields without a regular expression per message.
"""

from __future__ import annotations

import logging
import time

CONTEXT_KEYS = ("function", "pe", "client", "uid", "phb")


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = [
            f"ts={stamp}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
        ]
        for key in CONTEXT_KEYS:
            value = record.__dict__.get(key)
            if value is not None:
                fields.append(f"{key}={_quote(value)}")
        fields.append(f"msg={_quote(record.getMessage())}")
        if record.exc_info:
            fields.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(fields)


def setup(level: str = "INFO", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler()
    if fmt == "logfmt":
        handler.setFormatter(LogfmtFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
