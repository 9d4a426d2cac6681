"""The process's log: text or one JSON object per line, and the libraries kept quiet.

`configure` sets the root handler once, in `main`. JSON lines carry `time`, `level`, `logger`,
`message` and any fields a call passed as `extra={"fields": {...}}` (the access log's tenant,
adapter, tokens and timings), which text lines append as `key=value`. Unless stderr is a
terminal, the libraries' progress bars (transformers, huggingface_hub, tqdm) are turned off and
their warnings kept below ERROR, so a collected log holds loraserve's lines only.

Knows nothing about what is logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARIES = ("transformers", "huggingface_hub", "accelerate", "bitsandbytes", "peft", "httpx")


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{key}={value}" for key, value in fields_of(record).items())
        return f"{text} {extra}" if extra else text


def configure(log_format: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log line to `stream` (stderr) as `log_format` ("text" or "json")."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    quiet_libraries(interactive=stream.isatty())


def quiet_libraries(interactive: bool) -> None:
    """Progress bars and library warnings only on a terminal; set before the libraries load
    (they read the environment at import)."""
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    if interactive:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.captureWarnings(True)  # `warnings.warn` from the libraries, as log records
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
