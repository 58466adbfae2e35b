"""A logging filter that redacts credentials from every log line.

mitmproxy logs raw protocol buffers at INFO/DEBUG in some situations (e.g. a
client that disconnects mid-headers: the partial request, including
Proxy-Authorization and, inside a tunnel, decrypted Authorization and Cookie
headers). Proctor never logs credentials itself; this filter makes sure no
library does either, whatever the log level.
"""

from __future__ import annotations

import logging
import re

_SECRET_HEADER = re.compile(
    r"(?i)((?:proxy-)?authorization|cookie|x-api-key)(\s*[:=]\s*)([^\r\n\\'\"]+)"
)
# A JWT anywhere (three base64url segments, the first starting like a JSON header).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    text = _SECRET_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _JWT.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # tracebacks are formatted later from exc_info; pre-format and redact them now
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        return True


def install(handler: logging.Handler) -> None:
    handler.addFilter(RedactingFilter())
