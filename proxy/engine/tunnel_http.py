"""Plain HTTP/1 inside a CONNECT tunnel: governed like forward-proxied HTTP.

Some clients tunnel every URL, `http://` ones too: undici's `EnvHttpProxyAgent`
(Node's `fetch` with a global dispatcher) sends `CONNECT host:80` and then the
plain request inside. Refusing that broke every `http://` URL for them. A
mature intercepting proxy (mitmproxy, Squid with ssl-bump) parses it as HTTP
instead, and so does Proctor:

- the tunnel's identity is the one proven at CONNECT (no tunnel, no HTTP: a
  refused CONNECT never opens one, and a payload without a bound identity is
  refused here all the same);
- the decision target is the CONNECT's `host:port`, scheme `http`, and every
  request inside is parsed by the same hardened HTTP/1 reader and decided by the
  same chain as a forward-proxied `http://host:port/...` request: a `Host`
  header or absolute-form authority naming anything else is 421, a nested
  `CONNECT` is refused by the engine, framing problems are 400;
- anything that is neither TLS nor an HTTP/1 request line is still refused
  (engine/mitm.py records it as `non-TLS traffic in tunnel`).

mitmproxy's own layer choice assumes HTTP for any non-TLS bytes once raw TCP is
off; this module decides with a stricter test: the first line must be an HTTP/1
request line (`METHOD target HTTP/1.x`). Until a whole line has arrived, bytes
that could still become one wait (at most `MAX_FIRST_LINE` of them).
"""

from __future__ import annotations

import enum
import re

from mitmproxy.proxy import layer, layers

_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
# An HTTP/1 request line: a method token (at most 32 characters), a target, the version.
_REQUEST_LINE = re.compile(_TCHAR + rb"{1,32} [^\s]+ HTTP/1\.[01]\r?\n")
# What may come before the line ends (loosely: the strict test runs once it has ended).
_LINE_SO_FAR = re.compile(_TCHAR + rb"{1,32}(?: [^\s]*(?: [HTP/10.\r]{0,9})?)?")
MAX_FIRST_LINE = 64 * 1024  # the default limits.max_request_head_bytes


class Payload(enum.Enum):
    HTTP = "http"  # an HTTP/1 request line
    MORE = "more"  # could still become one: wait for more bytes
    OTHER = "other"  # neither: refuse


def classify(data: bytes) -> Payload:
    """What the first bytes a client sent inside a tunnel are (TLS is decided before this)."""
    end = data.find(b"\n")
    if end >= 0:
        return Payload.HTTP if _REQUEST_LINE.fullmatch(data[: end + 1]) else Payload.OTHER
    if len(data) < MAX_FIRST_LINE and _LINE_SO_FAR.fullmatch(data):
        return Payload.MORE
    return Payload.OTHER


def admit_plain_http(nextlayer: layer.NextLayer, chosen: layer.Layer, identity_bound: bool) -> bool:
    """For a tunnel's payload that mitmproxy would parse as HTTP: True if it may (an HTTP/1
    request on a tunnel with a bound identity, parsed and decided per request), or if the
    decision waits for more bytes (then nothing is chosen yet); False to refuse it."""
    if not identity_bound or not isinstance(chosen, layers.HttpLayer):
        return False
    verdict = classify(nextlayer.data_client())
    if verdict is Payload.HTTP:
        return True
    if verdict is Payload.MORE:
        # Undo the choice: the layer appended itself to the context's stack when it was
        # made, and the next attempt must see the stack as it was (the tunnel's HttpStream
        # as the parent), or it would not know it is inside a tunnel.
        if chosen in nextlayer.context.layers:
            nextlayer.context.layers.remove(chosen)
        nextlayer.layer = None
        return True
    return False
