"""Reading request bodies the way upstreams do, or refusing them (core/body.py; no processes)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from proxy.core.body import BodyRejected, parse_media_type, read_body
from proxy.core.context import InexactNumber, body_to_cedar


def rejected(raw: bytes, ctype: str | None, status: int = 400, match: str | None = None) -> BodyRejected:
    with pytest.raises(BodyRejected, match=match) as e:
        read_body(raw, ctype)
    assert e.value.status == status, str(e.value)
    return e.value


# -- media types ---------------------------------------------------------------------
def test_media_type_parsing_is_strict():
    m = parse_media_type('Application/JSON ; charset="UTF-8"')
    assert m.essence == "application/json" and m.charset == "utf-8"
    for bad in ("json", "application/json; charset", "application/json; charset=a b", "a/b; x=1; X=2", "/json"):
        with pytest.raises(BodyRejected):
            parse_media_type(bad)


# -- JSON ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "charset,codec",
    [("utf-8", "utf-8"), ("UTF-16LE", "utf-16-le"), ("utf-16be", "utf-16-be"), ("utf-32le", "utf-32-le")],
)
def test_json_is_decoded_by_its_declared_charset(charset, codec):
    raw = '{"StageName": "Closed Won"}'.encode(codec)
    body = read_body(raw, f"application/json; charset={charset}")
    assert body.format == "json" and body.doc == {"StageName": "Closed Won"}


@pytest.mark.parametrize("charset", ["utf-16", "iso-8859-1", "ebcdic-cp-us", "cp500", "x-unknown"])
def test_json_in_a_charset_proctor_does_not_decode_is_415(charset):
    rejected(b'{"a": 1}', f"application/json; charset={charset}", 415, "does not decode")


@pytest.mark.parametrize(
    "raw,match",
    [
        (b'\xef\xbb\xbf{"a": 1}', "byte-order mark"),
        (b'{"a": 1, "a": 2}', "repeats the key"),
        (b'{"x": {"a": 1, "a": 2}}', "repeats the key"),
        (b'{"a": 1} {"a": 2}', "not valid JSON"),
        (b'{"a": 1}x', "not valid JSON"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": -Infinity}', "Infinity"),
        (b'{"a": "\\ud800"}', "surrogate"),
        (b'{"a": 1', "not valid JSON"),
        (b'{"a": "\xff"}', "not valid utf-8"),
    ],
)
def test_json_that_parsers_read_differently_is_refused(raw, match):
    rejected(raw, "application/json", 400, match)


def test_utf16_bom_is_refused_even_with_a_charset():
    rejected('{"a":1}'.encode("utf-16"), "application/json; charset=utf-16le", 400, "byte-order mark")


def test_numbers_are_exact_or_refused():
    doc = read_body(b'{"a": 10000.00000000000000001, "b": 12345678901234567890, "c": 1e400, "d": 1.5}',
                    "application/json").doc
    assert doc["a"] == Decimal("10000.00000000000000001")  # never rounded through a float
    with pytest.raises(InexactNumber, match=r"\$\.a"):
        body_to_cedar(doc, 32)
    with pytest.raises(InexactNumber, match=r"\$\.b"):
        body_to_cedar({"b": doc["b"]}, 32)
    with pytest.raises(InexactNumber, match=r"\$\.c"):
        body_to_cedar({"c": doc["c"]}, 32)
    assert body_to_cedar({"d": doc["d"], "e": [Decimal("1E+3")]}, 32) == {
        "d": {"__extn": {"fn": "decimal", "arg": "1.5"}},
        "e": [{"__extn": {"fn": "decimal", "arg": "1000.0"}}],
    }
    # the operator's escape hatch: the exact text, which no numeric comparison accepts
    assert body_to_cedar(doc, 32, "text") == {
        "a": "10000.00000000000000001", "b": "12345678901234567890", "c": "1E+400",
        "d": {"__extn": {"fn": "decimal", "arg": "1.5"}},
    }


def test_mislabelled_json_is_read_as_json():
    for ctype in (None, "text/plain", "application/octet-stream", "application/x-www-form-urlencoded"):
        body = read_body(b' {"amount": 5000}', ctype)
        assert body.format == "json" and body.doc == {"amount": 5000}, ctype
    rejected(b"{broken", None, 400)  # no label and looks like JSON: it must be JSON


# -- forms ---------------------------------------------------------------------------
def test_form_fields_nest_like_json():
    raw = (b"order[total]=12.5&order[items][0][sku]=A&order[items][0][qty]=2&order[items][1][sku]=B"
           b"&order.items[1].qty=3&tags[]=x&tags[]=y&name=J%C3%BCrgen+M")
    body = read_body(raw, "application/x-www-form-urlencoded; charset=UTF-8")
    assert body.format == "form"
    assert body.doc == {
        "order": {"total": "12.5", "items": [{"sku": "A", "qty": "2"}, {"sku": "B", "qty": "3"}]},
        "tags": ["x", "y"],
        "name": "Jürgen M",
    }


def test_repeated_form_field_is_a_list_never_first_or_last_wins():
    assert read_body(b"stage=Open&stage=Closed+Won", "application/x-www-form-urlencoded").doc == {
        "stage": ["Open", "Closed Won"]
    }


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"a=1;b=2", "';'"),
        (b"a=%ff", "UTF-8"),
        (b"a=\xff", "UTF-8"),
        (b"a=1&a[b]=2", "both a value and an object"),
        (b"a[b]=1&a=2", "both a value and an object"),
        (b"a[0]=1&a[2]=2", "without gaps"),
        (b"a[]=1&a[0]=2", "mixes"),
        (b"a[b=1", "malformed"),
        (b"a]=1", "malformed"),
        (b"a[01]=1", "zero-padded"),
        (b"StageName=Open&stagename=Closed+Won", "differ only by case"),
        (b"StageName=Open&%C5%BFtageName=Closed+Won", "differ only by case"),  # long s folds to s
        (b"StageName%00x=Closed+Won", "control characters"),
        (b"+StageName=Closed+Won", "surrounding spaces"),
    ],
)
def test_ambiguous_forms_are_refused(raw, match):
    rejected(raw, "application/x-www-form-urlencoded", 400, match)


def test_a_non_ascii_digit_is_a_name_not_an_index():
    assert read_body(b"a[%C2%B2]=1", "application/x-www-form-urlencoded").doc == {"a": {"\u00b2": "1"}}


def test_forms_decode_like_browsers_do():
    body = read_body("StageName=Négociation&d=100%&e=%zz".encode(), "application/x-www-form-urlencoded")
    assert body.doc == {"StageName": "Négociation", "d": "100%", "e": "%zz"}  # WHATWG: lone % is literal


def test_json_keys_that_differ_only_by_case_are_refused():
    rejected(b'{"StageName": "Prospecting", "stageName": "Closed Won"}', "application/json", 400, "case")
    rejected(rb'{"o": {"K": 1, "\u212a": 2}}', "application/json", 400, "case")  # Kelvin sign folds to k


def test_form_in_another_charset_is_415():
    rejected(b"a=1", "application/x-www-form-urlencoded; charset=iso-8859-1", 415)


# -- multipart -----------------------------------------------------------------------
def multipart_body(parts: list[tuple[str, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    out = b""
    for headers, data in parts:
        out += f"--{boundary}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def test_multipart_fields_files_and_json_parts():
    raw, ctype = multipart_body([
        ('Content-Disposition: form-data; name="StageName"', b"Closed Won"),
        ('Content-Disposition: form-data; name="meta"\r\nContent-Type: application/json', b'{"amount": 12}'),
        ('Content-Disposition: form-data; name="file"; filename="a.pdf"\r\nContent-Type: application/pdf', b"%PDF-1"),
    ])
    body = read_body(raw, ctype)
    assert body.format == "multipart"
    assert body.doc == {
        "StageName": "Closed Won",
        "meta": {"amount": 12},
        "file": {"filename": "a.pdf", "content_type": "application/pdf", "size": 6},
    }


@pytest.mark.parametrize(
    "parts,match",
    [
        ([('Content-Disposition: form-data; name="a"; name="b"', b"x")], "repeats the parameter"),
        ([('Content-Disposition: form-data; name*=UTF-8\'\'a', b"x")], r"name"),
        ([('Content-Disposition: form-data; name="a%22b"', b"x")], "ambiguous"),
        ([('Content-Disposition: form-data; name="a"\r\nContent-Transfer-Encoding: base64', b"eA==")], "Transfer"),
        ([('Content-Disposition: form-data; name="a"\r\nContent-Disposition: form-data; name="b"', b"x")], "header"),
        ([('Content-Disposition: attachment; name="a"', b"x")], "form-data|Wrong type"),
        ([('Content-Type: text/plain', b"x")], "Content-Disposition|no name"),
        ([('Content-Disposition: form-data; name="Note"; name*0="StageName"', b"x")], "only name and filename"),
        ([('Content-Disposition: form-data; name="Note"; x-extra="1"', b"x")], "only name and filename"),
        ([('Content-Disposition: form-data; name="a"', b"1"), ('Content-Disposition: form-data; name="A"', b"2")],
         "case"),
    ],
)
def test_ambiguous_multipart_is_refused(parts, match):
    raw, ctype = multipart_body(parts)
    with pytest.raises(BodyRejected, match=match):
        read_body(raw, ctype)


@pytest.mark.parametrize("part_type", ["text/plain; charset=utf-16le", "text/plain; charset=utf-32",
                                       "application/json; charset=utf-16le", "text/plain; charset=utf-7"])
def test_multipart_parts_in_another_charset_are_415(part_type):
    raw, ctype = multipart_body([(f'Content-Disposition: form-data; name="StageName"\r\nContent-Type: {part_type}',
                                  b"Closed Won")])
    with pytest.raises(BodyRejected) as e:
        read_body(raw, ctype)
    assert e.value.status == 415


def test_multipart_charset_parameter_and_charset_field_are_415():
    raw, ctype = multipart_body([('Content-Disposition: form-data; name="StageName"', b"Closed +AFc-on")])
    with pytest.raises(BodyRejected) as e:
        read_body(raw, ctype + "; charset=utf-7")
    assert e.value.status == 415
    raw, ctype = multipart_body([('Content-Disposition: form-data; name="_charset_"', b"utf-7"),
                                 ('Content-Disposition: form-data; name="StageName"', b"Closed +AFc-on")])
    with pytest.raises(BodyRejected) as e:
        read_body(raw, ctype)
    assert e.value.status == 415


def test_multipart_framing_is_strict():
    raw, ctype = multipart_body([('Content-Disposition: form-data; name="a"', b"1")])
    with pytest.raises(BodyRejected, match="preamble"):
        read_body(b"junk\r\n" + raw, ctype)
    with pytest.raises(BodyRejected, match="after its closing boundary"):
        read_body(raw + b"--XyZ\r\nsmuggled", ctype)
    with pytest.raises(BodyRejected, match="malformed"):
        read_body(raw.replace(b"--XyZ--", b"--XyZ"), ctype)  # never closed
    with pytest.raises(BodyRejected, match="boundary"):
        read_body(raw, "multipart/form-data")
    part_charset, ctype = multipart_body([('Content-Disposition: form-data; name="a"\r\nContent-Type: text/plain; charset=cp500', b"x")])
    with pytest.raises(BodyRejected) as e:
        read_body(part_charset, ctype)
    assert e.value.status == 415


# -- what is not read ----------------------------------------------------------------
@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "application/octet-stream", None])
def test_other_bodies_are_opaque(ctype):
    body = read_body(b"StageName=Closed Won", ctype)
    assert body.format == "opaque" and body.size == 20 and body.doc is None
    assert body.describe() == {"format": "opaque", "size": 20, "media_type": ctype or ""}


def test_empty_body_is_none():
    assert read_body(b"", "application/json").format == "none"


def test_deep_form_names_and_deep_surrogate_json_are_clean_refusals():
    rejected(b"a" + b"[x]" * 40 + b"=1", "application/x-www-form-urlencoded", 400, "deeper")
    deep = b'{"a":' * 900 + b'"\\ud800"' + b"}" * 900
    with pytest.raises(BodyRejected):
        read_body(deep, "application/json")
