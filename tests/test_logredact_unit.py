"""No credential reaches a log line, whoever logs it."""

from __future__ import annotations

import io
import logging

from proxy.logredact import RedactingFilter, redact

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLWJ5dGVz"


def test_redacts_headers_and_jwts():
    raw = repr(b"GET / HTTP/1.1\r\nProxy-Authorization: Basic cmVhZGVyOmV5Smg=\r\nCookie: sess=abc\r\n")
    out = redact(raw)
    assert "cmVhZGVy" not in out and "sess=abc" not in out
    assert "Proxy-Authorization: [REDACTED]" in out
    assert JWT not in redact(f"token was {JWT} ok")


def test_filter_on_a_handler_covers_args_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("redact-test")
    log.addHandler(handler)
    log.propagate = False
    log.warning("buffer: %r", f"Authorization: Bearer {JWT}\r\n")
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        log.exception("failed")
    text = stream.getvalue()
    assert JWT not in text
    assert "[REDACTED]" in text and "ValueError" in text
