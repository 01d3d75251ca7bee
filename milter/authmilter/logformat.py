"""``[log] format = "json"``: each log record as one JSON object on one line.

Every record has ``time`` (UTC, RFC 3339), ``level``, ``logger``, ``pid`` and ``message`` (the
same text as the text format). A record logged with ``extra={"fields": {...}}`` (the per-message
line of milter_app.py) carries those fields at the top level too, so a log shipper reads the
queue id, the results and the timings without parsing the message. JSON escapes every control
character and, with ``ensure_ascii``, everything outside ASCII: a value from the network cannot
break the line or the object; the caller still bounds its length (milter_app's ``_log_value``).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# The attribute a record's structured fields come in (``extra={FIELDS: {...}}``).
FIELDS = "fields"
# Keys every object has; a structured field of the same name does not replace them.
_BASE_KEYS = ("time", "level", "logger", "pid", "message")


class JsonFormatter(logging.Formatter):
    """One JSON object per record.

    Args:
        syslog_tag: start the line with ``authmilter[PID]: `` (syslog's tag, which syslog
            daemons need to file the line), as the text format does.
    """

    def __init__(self, syslog_tag: bool = False) -> None:
        super().__init__()
        self._syslog_tag = syslog_tag

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            entry.update((k, v) for k, v in fields.items() if k not in _BASE_KEYS)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=True, separators=(",", ":"), default=str)
        return f"authmilter[{record.process}]: {line}" if self._syslog_tag else line
