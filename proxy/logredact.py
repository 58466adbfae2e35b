"""Redaction of free text: every log line, engine error messages, refusal details.

Proctor's own messages never quote a request's query string, URL userinfo or
header values, but libraries do, at some level:

- mitmproxy logs (and puts into its error answer) the raw bytes of a request it
  cannot parse: "Bad HTTP request line: b'GET /x?token=… HTTP/1.1'", "Invalid
  header line: b'…'", and the partial request of a client that hangs up
  mid-headers, with Proxy-Authorization, Cookie and, inside a tunnel, decrypted
  Authorization headers;
- HTTP clients and servers log URLs with their query string (httpx, urllib3,
  aiohttp's access log);
- aiosqlite logs every SQL statement with its parameters at DEBUG (a held
  request's preview, approval notes): `proctor run` keeps it at WARNING.

`redact` removes from any text:

- raw protocol data, i.e. a bytes literal as Python prints it: the request line
  keeps its method, path and version, each header line its name (and the value
  of a few framing headers), anything else is replaced;
- URL userinfo (`scheme://user:password@host`) and query strings (`/path?…`);
- credential headers and secret-looking keys (`Authorization: …`,
  `"password": "…"`, `token=…`), and header lines after a CRLF;
- anything shaped like a JWT.

`RedactingFilter` applies it to every record a logging handler emits (message,
arguments, traceback): on the handler, so it covers every logger, and only for
records that are actually emitted, so it costs nothing on the request path at
the usual log levels.
"""

from __future__ import annotations

import ast
import logging
import re
from urllib.parse import urlsplit, urlunsplit

REDACTED = "[REDACTED]"
_REDACTED_B = REDACTED.encode()

# Header values that carry framing, not secrets: kept in raw protocol data so a
# protocol error stays debuggable.
_FRAMING_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding", b"content-type", b"connection"})

# A Python bytes literal (what mitmproxy and h11 put into their messages), not
# preceded by a word character (so "web'…'" is not one).
_BYTES_LITERAL = re.compile(r"""(?<![\w'"])b(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")""")
# ...and one cut off before its closing quote (a truncated message).
_BYTES_UNTERMINATED = re.compile(r"""(?<![\w'"])b(?:'(?:[^'\\\n]|\\.)*|"(?:[^"\\\n]|\\.)*)$""", re.MULTILINE)

_REQUEST_LINE = re.compile(rb"^([A-Z][A-Z_-]{0,31}) (\S+)(.*)$")
_VERSION = re.compile(rb"^ HTTP/\d(?:\.\d)?$")
_STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)? \d{3}(?: [\x20-\x7e]*)?$")
_HEADER_LINE = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*:")

# Every pattern here runs on text an unauthenticated client controls (mitmproxy
# quotes unparsable request lines), so each must be linear: a match may only start
# where the previous character cannot continue it (no rescan from every position).

# `scheme://userinfo@` anywhere.
_USERINFO = re.compile(r"(?<![a-zA-Z0-9+.-])([a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/?#@'\"<>\\]*@")
# A token (up to whitespace or a quote) in which a query string or fragment follows a path.
_TOKEN = re.compile(r"[^\s'\"<>\\]+")
_QUERY_START = re.compile(r"[?#]")
# Text longer than this is cut before redaction (a backstop on the cost per line).
MAX_REDACT_CHARS = 32 * 1024
# Headers whose whole value is a credential, in "Name: value" or "name=value" form,
# quoted or not (a dict's repr, JSON, a header line).
_SECRET_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization|(?:set-)?cookie|x-api-key|api-key|x-auth-token)(['\"]?\s*[:=]\s*)"
    r"(?:(['\"])(?:(?!\3)[^\\\r\n]|\\.)*\3|[^\r\n\\'\"]+)"
)
# Secret-looking keys with a one-word value: `password=…`, `"token": "…"`.
_SECRET_KEY = re.compile(
    r"(?i)\b((?:client[-_]?)?secret|passw(?:or)?d|(?:access[-_]|refresh[-_]|id[-_])?token|api[-_]?key|apikey)"
    r"(['\"]?\s*[:=]\s*)(?:(['\"])(?:(?!\3)[^\\\r\n]|\\.)*\3|[^\s\\'\",;&)}\]]+)"
)
# A header line after a CRLF, real or escaped (text that quotes raw protocol data).
_CRLF_HEADER = re.compile(r"(\r\n|\\r\\n)([!#$%&'*+.^_`|~0-9A-Za-z-]+)([ \t]*:[ \t]*)((?:(?!\\r|\\n)[^\r\n'\"])*)")
# A JWT anywhere (three base64url segments, the first starting like a JSON header).
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")


def _cut_query(m: re.Match) -> str:
    token = m.group(0)
    slash = token.find("/")
    if slash < 0:
        return token
    q = _QUERY_START.search(token, slash)
    if q is None or q.end() == len(token):
        return token
    return token[: q.start()] + "?" + REDACTED


def redact(text: str) -> str:
    """`text` without query strings, URL userinfo, header values, credentials or JWTs."""
    if len(text) > MAX_REDACT_CHARS:
        text = f"{text[:MAX_REDACT_CHARS]}…[{len(text) - MAX_REDACT_CHARS} more characters cut]"
    if "b'" in text or 'b"' in text:
        text = _BYTES_LITERAL.sub(_redact_bytes_literal, text)
        text = _BYTES_UNTERMINATED.sub("b'" + REDACTED + "'", text)
    if "://" in text:
        text = _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    if "?" in text or "#" in text:
        text = _TOKEN.sub(_cut_query, text)
    text = _SECRET_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _SECRET_KEY.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    if "\n" in text or "\\n" in text:  # a real or an escaped line break
        text = _CRLF_HEADER.sub(_redact_crlf_header, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    return text


def safe_url(url: object) -> str:
    """A URL reduced to scheme, host, port and path: no userinfo, query or fragment."""
    if not isinstance(url, str) or not url:
        return ""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return REDACTED


_QUERY_NAME = re.compile(r"^[A-Za-z0-9_.$:\[\]-]{1,64}$")


def url_with_query_names(url: object) -> str:
    """A URL for people to read: no userinfo or fragment, and each query parameter
    named but with its value redacted (`?id=[REDACTED]&api_key=[REDACTED]`)."""
    base = safe_url(url)
    if not base or not isinstance(url, str):
        return base
    query = urlsplit(url).query if base != REDACTED else ""
    if not query:
        return base
    params = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        # a part without "=" may be a bare value (`?<token>`): redacted whole, like a strange name
        params.append(f"{name}={REDACTED}" if eq and _QUERY_NAME.match(name) else REDACTED)
    return base + "?" + "&".join(params)


def redact_target(target: bytes) -> bytes:
    """A request target (origin or absolute form) without userinfo, query or fragment."""
    if b"://" in target:
        scheme, _, rest = target.partition(b"://")
        authority, slash, path = rest.partition(b"/")
        authority = authority.rpartition(b"@")[2]
        target = scheme + b"://" + authority + slash + path
    for sep in (b"?", b"#"):
        if sep in target:
            target = target.split(sep, 1)[0] + sep + _REDACTED_B
            break
    return target


def redact_protocol_bytes(data: bytes) -> bytes:
    """Raw HTTP/1 bytes: the request (or status) line without query or userinfo, header
    names without their values (except framing headers), no body, nothing else."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = re.split(rb"\r?\n", head)
    out = []
    for i, line in enumerate(lines):
        if not line:
            out.append(line)
        elif i == 0 and (m := _REQUEST_LINE.match(line)):
            rest = m.group(3)
            rest = rest if not rest or _VERSION.match(rest) else b" " + _REDACTED_B
            out.append(m.group(1) + b" " + redact_target(m.group(2)) + rest)
        elif i == 0 and _STATUS_LINE.match(line):
            out.append(line)
        elif i > 0 and (m := _HEADER_LINE.match(line)):
            name = m.group(1)
            keep = name.lower() in _FRAMING_HEADERS and len(line) <= 256
            out.append(line if keep else name + b": " + _REDACTED_B)
        else:
            out.append(_REDACTED_B)
    result = b"\r\n".join(out) + sep
    if body:
        result += b"[%d bytes redacted]" % len(body)
    return result


def _redact_bytes_literal(m: re.Match) -> str:
    try:
        data = ast.literal_eval(m.group(0))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return "b'" + REDACTED + "'"
    if not isinstance(data, bytes):
        return "b'" + REDACTED + "'"
    return repr(redact_protocol_bytes(data))


def _redact_crlf_header(m: re.Match) -> str:
    if m.group(2).lower().encode() in _FRAMING_HEADERS:
        return m.group(0)
    return f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}"


class RedactingFilter(logging.Filter):
    """Redacts every record a handler emits: message, arguments and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # a broken format string: emit only the template, never the arguments
            message, record.args = str(record.msg), None
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # tracebacks are formatted later from exc_info; pre-format and redact them now
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(handler: logging.Handler) -> None:
    handler.addFilter(RedactingFilter())
