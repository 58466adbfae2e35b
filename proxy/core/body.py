"""Read a request body exactly as the upstream will, or refuse it.

A policy can only judge what Proctor can read, and an upstream acts on what it
decodes. So a body is read by its declared media type and charset, with every
construct whose meaning differs between parsers refused instead of guessed:

- JSON: decoded by its declared charset (UTF-8 by default; UTF-16/32 only with
  an explicit byte order), then parsed strictly: no byte-order mark, no
  duplicate keys, no trailing data, no NaN/Infinity, no lone surrogates, and
  numbers kept exact (`Decimal`), never rounded through a float.
- `application/x-www-form-urlencoded`: UTF-8, `&`-separated, strict
  percent-decoding; bracket (`a[b][0]`) and dotted (`a.b`) keys nest, so the
  connector's `body:` paths read form fields like JSON fields.
- `multipart/form-data`: parsed strictly (RFC 7578, the `multipart` library in
  strict mode plus checks of our own); text parts are strings, JSON parts are
  documents, file parts are described (name, type, size), never read.

Anything else is *opaque*: refused by the caller (415) unless the route lets
opaque bodies through, in which case the policy sees only that it is opaque,
its size and its media type.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

import multipart

BodyFormat = Literal["none", "json", "form", "multipart", "opaque"]


class BodyRejected(Exception):
    """The body cannot be read the way its headers say it is written; `status` is 400 or 415."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# -- media types (RFC 9110 §8.3.1) --------------------------------------------------
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\xff])*"'
_TYPE_RE = re.compile(rf"[ \t]*({_TOKEN})/({_TOKEN})[ \t]*")
_PARAM_RE = re.compile(rf";[ \t]*(?:({_TOKEN})=({_TOKEN}|{_QUOTED}))?[ \t]*")
_DISPOSITION_RE = re.compile(rf"[ \t]*({_TOKEN})[ \t]*")


@dataclass(frozen=True, slots=True)
class MediaType:
    essence: str  # "type/subtype", lower-case
    params: dict[str, str] = field(default_factory=dict)  # lower-case names, unquoted values

    @property
    def charset(self) -> str | None:
        value = self.params.get("charset")
        return value.lower() if value is not None else None


def _unquote(value: str) -> str:
    if value.startswith('"'):
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _parameters(text: str, start: int, what: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = start
    while pos < len(text):
        m = _PARAM_RE.match(text, pos)
        if m is None:
            raise BodyRejected(f"the {what} header is malformed")
        pos = m.end()
        if m.group(1) is None:
            continue
        name = m.group(1).lower()
        if name in params:
            # servers disagree about which copy wins: never guess
            raise BodyRejected(f"the {what} header repeats the parameter {name!r}")
        params[name] = _unquote(m.group(2))
    return params


def parse_media_type(value: str, what: str = "Content-Type") -> MediaType:
    """A Content-Type value, strictly: `type/subtype *(; name=value)`; raises BodyRejected (400)."""
    m = _TYPE_RE.match(value)
    if m is None:
        raise BodyRejected(f"the {what} header is malformed")
    return MediaType(f"{m.group(1)}/{m.group(2)}".lower(), _parameters(value, m.end(), what))


def is_json_media(essence: str) -> bool:
    return essence in ("application/json", "text/json") or essence.endswith("+json")


# -- JSON ---------------------------------------------------------------------------
# Charsets Proctor decodes JSON in. An upstream that ignores the declared charset
# and reads UTF-8 fails on UTF-16/32 (NUL bytes), so it cannot read those as
# something else; a single-byte charset (latin-1) would read differently from
# UTF-8 without failing, and "utf-16" without a byte order is read big- or
# little-endian depending on the server: both are refused.
JSON_CHARSETS = {
    "utf-8": "utf-8",
    "utf8": "utf-8",
    "us-ascii": "ascii",
    "ascii": "ascii",
    "utf-16le": "utf-16-le",
    "utf-16be": "utf-16-be",
    "utf-32le": "utf-32-le",
    "utf-32be": "utf-32-be",
}
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dupe = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise BodyRejected(f"the JSON body repeats the key {json.dumps(dupe)[:80]} in one object "
                           "(servers disagree about which copy wins)")
    if len(out) > 1:
        _no_case_twins(out, "JSON object")
    return out


def _no_case_twins(keys: Any, what: str) -> None:
    """Keys equal but for case (Go, ASP.NET, Salesforce match names case-insensitively;
    Unicode folding too: "ſ" is "s") are one key to some servers: refused."""
    folded = {k.casefold() for k in keys}
    if len(folded) != len(keys):
        raise BodyRejected(f"a {what} has two keys that differ only by case (servers that ignore case "
                           "disagree about which one wins)")


def _no_constants(name: str) -> Any:
    raise BodyRejected(f"the JSON body contains {name}, which is not JSON")


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise BodyRejected("the JSON body contains an unpaired UTF-16 surrogate escape")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


def decode_text(raw: bytes, charset: str | None, what: str) -> str:
    codec = JSON_CHARSETS.get(charset or "utf-8")
    if codec is None:
        raise BodyRejected(
            f"{what} declares charset {charset!r}, which Proctor does not decode; send UTF-8", status=415
        )
    if raw.startswith(_BOMS) or raw[:4] in (b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00"):
        raise BodyRejected(f"{what} starts with a byte-order mark; send it without one")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        raise BodyRejected(f"{what} is not valid {charset or 'utf-8'}") from None


def parse_json_text(text: str, what: str = "the JSON body") -> Any:
    """Strict JSON: exact numbers (Decimal for non-integers), no duplicate keys,
    no NaN/Infinity, no trailing data, no unpaired surrogates."""
    if text.startswith("\ufeff"):
        raise BodyRejected(f"{what} starts with a byte-order mark; send it without one")
    try:
        doc = json.loads(
            text, object_pairs_hook=_no_duplicate_keys, parse_float=Decimal, parse_constant=_no_constants
        )
    except RecursionError:
        raise BodyRejected(f"{what} is JSON nested deeper than the parser allows") from None
    except ValueError as e:  # JSONDecodeError; int() over the digit limit
        if isinstance(e, BodyRejected):
            raise
        raise BodyRejected(f"{what} is not valid JSON ({_json_error(e)})") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            _check_strings(doc)
        except RecursionError:
            raise BodyRejected(f"{what} is JSON nested deeper than the parser allows") from None
    return doc


def _json_error(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    return "a number has too many digits"


# -- nesting of form keys -----------------------------------------------------------
_KEY_BASE = re.compile(r"[^.\[\]]+")
_KEY_STEP = re.compile(r"\[([^\[\]]*)\]|\.([^.\[\]]+)")
_APPEND = object()
MAX_KEY_DEPTH = 32  # a[b][c]...: deeper names are refused (the document is walked recursively)


def _key_steps(key: str) -> list[Any]:
    """`a[b][0][]` / `a.b` -> ["a", "b", 0, _APPEND]; malformed keys are refused."""
    m = _KEY_BASE.match(key)
    if m is None:
        raise BodyRejected(f"form field name {key[:80]!r} is malformed")
    steps: list[Any] = [m.group(0)]
    pos = m.end()
    while pos < len(key):
        if len(steps) > MAX_KEY_DEPTH:
            raise BodyRejected(f"form field name {key[:80]!r} nests deeper than {MAX_KEY_DEPTH} levels")
        s = _KEY_STEP.match(key, pos)
        if s is None:
            raise BodyRejected(f"form field name {key[:80]!r} is malformed (unbalanced brackets or dots)")
        if s.group(2) is not None:
            steps.append(s.group(2))
        elif s.group(1) == "":
            steps.append(_APPEND)
        elif s.group(1).isascii() and s.group(1).isdigit():
            if len(s.group(1)) > 1 and s.group(1).startswith("0"):
                raise BodyRejected(f"form field name {key[:80]!r} has a zero-padded index")
            steps.append(int(s.group(1)))
        else:
            steps.append(s.group(1))
        pos = s.end()
    return steps


class _Tree:
    """Builds a nested document from (key, value) pairs; conflicts are refused."""

    MAX_INDEX = 10_000

    def __init__(self) -> None:
        self.root: dict[str, Any] = {}

    def add(self, key: str, value: Any) -> None:
        steps = _key_steps(key)
        node: Any = self.root
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            if step is _APPEND:
                if not isinstance(node, _Seq) or node.indexed:
                    raise BodyRejected(f"form field {key[:80]!r} mixes [] with other keys")
                if last:
                    node.items.append(value)
                    return
                child: Any = _container(steps[i + 1])
                node.items.append(child)
                node = child
                continue
            if isinstance(step, int):
                if not isinstance(node, _Seq) or (node.items and not node.indexed):
                    raise BodyRejected(f"form field {key[:80]!r} mixes an index with other keys")
                if step > self.MAX_INDEX:
                    raise BodyRejected(f"form field {key[:80]!r} has an index over {self.MAX_INDEX}")
                node.indexed = True
                slot = node.by_index
            else:
                if not isinstance(node, dict):
                    raise BodyRejected(f"form field {key[:80]!r} uses a list as an object")
                slot = node
            if last:
                _put_leaf(slot, step, value, key)
                return
            existing = slot.get(step)
            if existing is None:
                existing = slot[step] = _container(steps[i + 1])
            elif isinstance(existing, _Leaf):
                raise BodyRejected(f"form field {key[:80]!r} is both a value and an object")
            node = existing

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = _finish(self.root)
        return doc


@dataclass
class _Leaf:
    values: list[Any]


@dataclass
class _Seq:
    items: list[Any] = field(default_factory=list)
    by_index: dict[int, Any] = field(default_factory=dict)
    indexed: bool = False


def _container(next_step: Any) -> Any:
    return _Seq() if next_step is _APPEND or isinstance(next_step, int) else {}


def _put_leaf(slot: dict[Any, Any], step: Any, value: Any, key: str) -> None:
    existing = slot.get(step)
    if existing is None:
        slot[step] = _Leaf([value])
    elif isinstance(existing, _Leaf):
        existing.values.append(value)  # a repeated name is a list (servers disagree on first/last)
    else:
        raise BodyRejected(f"form field {key[:80]!r} is both a value and an object")


def _finish(node: Any) -> Any:
    if isinstance(node, _Leaf):
        return node.values[0] if len(node.values) == 1 else list(node.values)
    if isinstance(node, dict):
        if len(node) > 1:
            _no_case_twins(node, "form")
        return {k: _finish(v) for k, v in node.items()}
    if isinstance(node, _Seq):
        if not node.indexed:
            return [_finish(v) for v in node.items]
        if sorted(node.by_index) != list(range(len(node.by_index))):
            raise BodyRejected("form field indexes must run 0, 1, 2, ... without gaps")
        return [_finish(node.by_index[i]) for i in range(len(node.by_index))]
    return node


# -- application/x-www-form-urlencoded ------------------------------------------------
MAX_FORM_FIELDS = 10_000
# HTML's _charset_ field: some servers decode the other fields in the charset it names.
CHARSET_FIELD = "_charset_"


def _form_component(raw: str) -> str:
    # WHATWG application/x-www-form-urlencoded: "+" is a space, a "%" not followed
    # by two hex digits stays literal, the bytes are UTF-8 (strictly).
    try:
        return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise BodyRejected("the form body is not valid UTF-8 after percent-decoding") from None


_NAME_TROUBLE = re.compile(r"[\x00-\x1f\x7f]|^\s|\s$")


def check_field_name(name: str, what: str) -> str:
    """Field names some servers rewrite (PHP drops leading spaces, cuts at NUL, turns
    '.' and ' ' into '_') could reach another field than the one policy read: refused."""
    if _NAME_TROUBLE.search(name):
        raise BodyRejected(f"a {what} name has control characters or surrounding spaces (servers rewrite such names)")
    return name


def parse_form(raw: bytes, media: MediaType) -> dict[str, Any]:
    charset = media.charset
    if charset not in (None, "utf-8", "utf8", "us-ascii"):
        raise BodyRejected(f"form bodies in charset {charset!r} are not decoded by Proctor; send UTF-8", status=415)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyRejected("the form body is not valid UTF-8") from None
    if ";" in text:
        raise BodyRejected("the form body contains ';', which some servers read as a separator; percent-encode it")
    tree = _Tree()
    pairs = [p for p in text.split("&") if p]
    if len(pairs) > MAX_FORM_FIELDS:
        raise BodyRejected(f"the form body has more than {MAX_FORM_FIELDS} fields")
    for pair in pairs:
        name, _, value = pair.partition("=")
        name = check_field_name(_form_component(name), "form field")
        if name.casefold() == CHARSET_FIELD:
            raise BodyRejected("a form _charset_ field is not accepted; send UTF-8", status=415)
        tree.add(name, _form_component(value))
    return tree.document()


# -- multipart/form-data -------------------------------------------------------------
MAX_MULTIPART_PARTS = 1_000
_ALLOWED_TRANSFER_ENCODINGS = ("7bit", "8bit", "binary")


_TEXT_CHARSETS = (None, "utf-8", "utf8", "us-ascii")


def _disposition(value: str) -> tuple[str, str | None]:
    m = _DISPOSITION_RE.match(value)
    if m is None or m.group(1).lower() != "form-data":
        raise BodyRejected("a multipart part is not form-data")
    params = _parameters(value, m.end(), "part Content-Disposition")
    extra = set(params) - {"name", "filename"}
    if extra:
        # name*, name*0 (RFC 2231 continuations), filename*...: some servers read them as the name
        raise BodyRejected("a multipart Content-Disposition may carry only name and filename "
                           "(servers decode other parameters differently)")
    name = params.get("name")
    if name is None or name == "":
        raise BodyRejected("a multipart part has no name")
    if "%" in name or "\\" in value:
        # browsers percent-encode quotes in names, RFC parsers do not: ambiguous
        raise BodyRejected("a multipart part name contains '%' or '\\' (ambiguous between servers)")
    return name, params.get("filename")


def parse_multipart(raw: bytes, media: MediaType) -> dict[str, Any]:
    boundary = media.params.get("boundary")
    if not boundary:
        raise BodyRejected("multipart/form-data without a boundary parameter")
    if media.charset not in _TEXT_CHARSETS:
        raise BodyRejected(f"multipart bodies in charset {media.charset!r} are not decoded by Proctor; send UTF-8",
                           status=415)
    if not raw.startswith(b"--" + boundary.encode("latin-1")):
        raise BodyRejected("the multipart body must start with its boundary (no preamble)")
    tree = _Tree()
    parts: list[tuple[Any, bytearray]] = []
    try:
        parser = multipart.PushMultipartParser(
            boundary, content_length=len(raw), strict=True, max_segment_count=MAX_MULTIPART_PARTS
        )
        current: bytearray | None = None
        for event in parser.parse(raw):
            if isinstance(event, multipart.MultipartSegment):
                current = bytearray()
                parts.append((event, current))
            elif event is None:
                current = None
            elif current is not None:
                current += event
        epilogue = parser._buffer  # what follows the closing delimiter
        parser.close()
    except multipart.MultipartError as e:
        raise BodyRejected(f"the multipart body is malformed ({e})") from None
    if epilogue.strip(b"\r\n\t "):
        raise BodyRejected("the multipart body has data after its closing boundary")
    for segment, data in parts:
        names = [n for n, _ in segment.headerlist]
        if len(set(names)) != len(names):
            raise BodyRejected("a multipart part repeats a header")
        cte = (segment.header("Content-Transfer-Encoding") or "binary").strip().lower()
        if cte not in _ALLOWED_TRANSFER_ENCODINGS:
            raise BodyRejected(f"multipart Content-Transfer-Encoding {cte!r} is not accepted", status=415)
        name, filename = _disposition(segment.header("Content-Disposition") or "")
        check_field_name(name, "multipart part")
        if name.casefold() == CHARSET_FIELD:
            # HTML's _charset_ field makes some servers decode the other fields in its charset
            raise BodyRejected("a multipart _charset_ field is not accepted; send UTF-8", status=415)
        ctype = segment.header("Content-Type")
        part_media = parse_media_type(ctype, "part Content-Type") if ctype else MediaType("text/plain")
        if filename is None and part_media.charset not in _TEXT_CHARSETS:
            raise BodyRejected(f"multipart part {name!r} declares charset {part_media.charset!r}; "
                               "only UTF-8 parts are decoded", status=415)
        value: Any
        if filename is not None:
            value = {"filename": filename, "content_type": part_media.essence, "size": len(data)}
        elif is_json_media(part_media.essence):
            value = parse_json_text(decode_text(bytes(data), part_media.charset, f"part {name!r}"), f"part {name!r}")
        elif part_media.essence == "text/plain":
            value = decode_text(bytes(data), part_media.charset, f"part {name!r}")
        else:
            value = {"filename": "", "content_type": part_media.essence, "size": len(data)}
        tree.add(name, value)
    return tree.document()


# -- the body as a whole -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReadBody:
    format: BodyFormat
    doc: Any = None  # the parsed document (json, form, multipart)
    media_type: str = ""  # the declared media type essence ("" when none)
    size: int = 0

    def describe(self) -> dict[str, Any]:
        """What `context.payload` tells policies about the body."""
        return {"format": self.format, "size": self.size, "media_type": self.media_type}


def _looks_like_json(raw: bytes) -> bool:
    return raw.lstrip(b" \t\r\n")[:1] in (b"{", b"[")


def read_body(raw: bytes, content_type: str | None) -> ReadBody:
    """The body as Proctor reads it. Raises BodyRejected for a body that declares a
    readable type but does not parse as one; returns format "opaque" for a body
    whose type Proctor does not read (the caller refuses it unless the route
    accepts opaque bodies)."""
    if not raw:
        return ReadBody("none")
    media = parse_media_type(content_type) if content_type and content_type.strip() else None
    essence = media.essence if media is not None else ""
    if media is not None and is_json_media(essence):
        text = decode_text(raw, media.charset, "the JSON body")
        return ReadBody("json", parse_json_text(text), essence, len(raw))
    if essence == "application/x-www-form-urlencoded" and not _looks_like_json(raw):
        assert media is not None
        return ReadBody("form", parse_form(raw, media), essence, len(raw))
    if essence == "multipart/form-data":
        assert media is not None
        return ReadBody("multipart", parse_multipart(raw, media), essence, len(raw))
    # Many upstreams parse JSON whatever the Content-Type says: a body that looks
    # like JSON and parses strictly is read as JSON, so a mislabel dodges nothing.
    charset = media.charset if media is not None else None
    if _looks_like_json(raw) and (charset is None or charset in JSON_CHARSETS):
        try:
            return ReadBody("json", parse_json_text(decode_text(raw, charset, "the body")), essence, len(raw))
        except BodyRejected:
            if media is None:  # no declared type and looks like JSON: it must be JSON
                raise
            if essence == "application/x-www-form-urlencoded":
                raise BodyRejected("the form body starts like JSON but is neither JSON nor a plain form") from None
    return ReadBody("opaque", None, essence, len(raw))
