"""No query string, userinfo, header value or credential reaches a log line, whoever logs it."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import time

import pytest

from proxy.logredact import RedactingFilter, redact, redact_protocol_bytes, safe_url

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLWJ5dGVz"


def test_redacts_headers_and_jwts():
    raw = repr(b"GET / HTTP/1.1\r\nProxy-Authorization: Basic cmVhZGVyOmV5Smg=\r\nCookie: sess=abc\r\n")
    out = redact(raw)
    assert "cmVhZGVy" not in out and "sess=abc" not in out
    assert "Proxy-Authorization: [REDACTED]" in out
    assert JWT not in redact(f"token was {JWT} ok")


# What mitmproxy 11 logs (and answers) for requests it cannot parse, verbatim in shape.
@pytest.mark.parametrize(
    "message, kept",
    [
        (
            "127.0.0.1:41818: Bad HTTP request line: b'GET http://user:SECRET@10.0.0.1:81/items/1?api_key=SECRET&t=SECRET HTTP/1.1'",
            "b'GET http://10.0.0.1:81/items/1?[REDACTED] HTTP/1.1'",
        ),
        ("Bad HTTP request line: b'GET /x?token=SECRET HTTP/1.1 SECRET'", "b'GET /x?[REDACTED] [REDACTED]'"),
        ("Bad HTTP request line: b'SECRET'", "b'[REDACTED]'"),
        ("Invalid header line: b'Broken header SECRET'", "b'[REDACTED]'"),
        (
            "Client closed connection before completing request headers: b'GET http://h/i?k=SECRET HTTP/1.1\\r\\n"
            "Proxy-Authorization: Basic SECRET\\r\\nCookie: s=SECRET\\r\\nX-Custom: SECRET\\r\\nHost: h:80\\r\\n'",
            "b'GET http://h/i?[REDACTED] HTTP/1.1\\r\\nProxy-Authorization: [REDACTED]\\r\\nCookie: [REDACTED]\\r\\n"
            "X-Custom: [REDACTED]\\r\\nHost: h:80\\r\\n'",
        ),
        ("cut off: b'GET /x HTTP/1.1\\r\\nCookie: SECRET", "b'[REDACTED]'"),
        ("b'HTTP/1.1 200 OK\\r\\nSet-Cookie: SECRET\\r\\n\\r\\nSECRET'", "b'HTTP/1.1 200 OK\\r\\nSet-Cookie: [REDACTED]\\r\\n\\r\\n[6 bytes redacted]'"),
    ],
    ids=["request-line-userinfo-query", "extra-tokens", "garbage", "header-line", "hang-up", "truncated", "response"],
)
def test_raw_protocol_bytes_keep_only_their_shape(message, kept):
    out = redact(message)
    assert "SECRET" not in out
    assert kept in out


@pytest.mark.parametrize(
    "line",
    [
        'HTTP Request: GET http://127.0.0.1:5/x?token=SECRET "HTTP/1.1 200 OK"',  # httpx
        '127.0.0.1 [06/Dec/2026] "GET /v1/approvals?agent=SECRET HTTP/1.1" 200 12 "-" "curl"',  # aiohttp access log
        "https://api.example/v1/items#SECRET",
        "postgresql://postgres:SECRET@db:5432/proctor",
        "{'authorization': 'Bearer SECRET', 'x': 1}",
        '{"password": "SECRET", "user": "bob"}',
        "password=SECRET&user=bob",
        "client_secret: SECRET",
        "X-Api-Key=SECRET",
        "quoted in text:\r\nX-Custom: SECRET\r\n",
        "escaped in text: GET /x HTTP/1.1\\r\\nX-Custom: SECRET\\r\\n",
    ],
)
def test_urls_and_secret_values_in_free_text(line):
    assert "SECRET" not in redact(line)


@pytest.mark.parametrize(
    "line",
    [
        "loaded policy revision c3ef3c7697157953 (19 policies)",
        "policy reloaded: now enforcing revision abc (3 policies)",
        "what? nothing to see",
        "refusing a request head over 8192 bytes from ('127.0.0.1', 41910)",
        "token has expired",
        "the proxy username must equal the agent id in the token (subject)",
        "reader-bot may not test.item.delete on Item::\"1\": forbidden by policy no-item-deletes",
        "no connector classifies GET 127.0.0.1:8080/nothing/here; unmapped requests are denied",
        'File "/work/proxy/engine/mitm.py", line 214, in request\n    raise ValueError("boom")\nValueError: boom',
    ],
)
def test_ordinary_messages_are_untouched(line):
    assert redact(line) == line


def test_protocol_bytes_keep_framing_headers_only():
    raw = b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX-Token: t\r\n\r\nabc"
    assert redact_protocol_bytes(raw) == (
        b"POST /a?[REDACTED] HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX-Token: [REDACTED]\r\n\r\n[3 bytes redacted]"
    )


def test_safe_url():
    assert safe_url("https://u:p@h:8443/a/b?k=v#f") == "https://h:8443/a/b"
    assert safe_url(None) == ""


def test_filter_on_a_handler_covers_args_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("redact-test")
    log.addHandler(handler)
    log.propagate = False
    log.warning("buffer: %r", f"Authorization: Bearer {JWT}\r\n")
    log.warning("fetched %s", "http://h/x?api_key=QUERYSECRET")
    log.warning("broken %s %s", "only one")  # a bad format string: never the arguments
    try:
        raise ValueError(f"bad token {JWT} for http://h/x?k=TRACESECRET")
    except ValueError:
        log.exception("failed")
    log.warning("with stack http://h/?k=STACKSECRET", stack_info=True)
    text = stream.getvalue()
    assert JWT not in text and "QUERYSECRET" not in text and "TRACESECRET" not in text
    assert "only one" not in text
    assert "[REDACTED]" in text and "ValueError" in text


def test_proctor_run_logging_setup():
    """`proctor run`'s setup at DEBUG: aiosqlite's SQL parameters are not logged, every
    logger and uncaught exceptions (thread or main) go through the filter."""
    script = """
import logging, threading
from proxy.cli import _setup_logging
_setup_logging("debug")
logging.getLogger("aiosqlite").debug("executing %s with %r", "INSERT", ("PARAMSECRET",))
logging.getLogger("urllib3.connectionpool").debug('"GET /x?token=QUERYSECRET HTTP/1.1" 200 2')
logging.getLogger("some.library").debug("visible debug line")
t = threading.Thread(target=lambda: (_ for _ in ()).throw(RuntimeError("http://h/?k=THREADSECRET")))
t.start(); t.join()
raise RuntimeError("Cookie: sess=MAINSECRET")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    err = out.stderr
    assert "visible debug line" in err and "uncaught exception in thread" in err and "uncaught exception" in err
    for secret in ("PARAMSECRET", "QUERYSECRET", "THREADSECRET", "MAINSECRET"):
        assert secret not in err, err


def test_refusal_detail_is_redacted_in_the_answer_and_the_record():
    """Free text in a refusal (here: an engine message quoting the raw request) never
    carries the request's query or header values to the agent, the record or the trail."""
    import json

    from proxy.audit.ocsf import to_ocsf
    from proxy.core.exchange import Exchange, ResponseSummary
    from proxy.core.model import Refusal
    from proxy.core.problem import jsonrpc_error_response, problem_response
    from proxy.engine.patches import problem_error_response
    from proxy.record.decisions import decision_record

    detail = "bad: b'GET /x?api_key=QSECRET HTTP/1.1\\r\\nX-Key: HSECRET\\r\\n' from http://u:USECRET@h/p?t=QSECRET2"
    outcome = Exchange(None, decision_id="d-1", errors=[detail])
    outcome.refuse(Refusal(400, "Bad request", detail, kind="request"))
    outcome.response = ResponseSummary(400, error=detail)
    _, _, body = problem_response(outcome)
    _, _, rpc = jsonrpc_error_response(outcome)
    rec = decision_record(outcome)
    engine = problem_error_response(400, detail)
    for text in (body.decode(), rpc.decode(), json.dumps(rec), json.dumps(to_ocsf(rec)), engine.decode()):
        for secret in ("QSECRET", "HSECRET", "USECRET"):
            assert secret not in text
        assert "GET /x?[REDACTED]" in text


@pytest.mark.parametrize(
    "text",
    [
        "Bad HTTP request line: b'GET " + "/" * 60_000 + "'x?y HTTP/1.1 z'",
        "x " + "eyJ" * 20_000,
        "a." * 30_000 + "b",
        "/" * 60_000 + "x #" + "/" * 10,
    ],
    ids=["slashes-then-query", "jwt-prefixes", "scheme-chars", "slashes-then-fragment"],
)
def test_redaction_is_linear_on_hostile_text(text):
    """mitmproxy quotes unparsable request lines from unauthenticated clients: a
    pathological line must not stall the event loop (it took 21 s before)."""
    start = time.perf_counter()
    redact(text)
    assert time.perf_counter() - start < 0.5


def test_query_cut_keeps_its_meaning():
    assert redact("GET /a/b?token=s3cret HTTP/1.1") == "GET /a/b?[REDACTED] HTTP/1.1"
    assert redact("see https://h.example/p#frag and /x?") == "see https://h.example/p?[REDACTED] and /x?"
    assert redact("a?b/c?d") == "a?b/c?[REDACTED]"
    assert len(redact("x" * 100_000)) < 33_000
