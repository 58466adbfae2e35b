"""Nothing a policy cannot read reaches an upstream (issue: hardening, bodies and aggregates).

The bundled CRM and ERP connectors and policies, through a real proxy to recording
upstreams: every spelling of a body that policy forbids is either read (and
refused by policy, or held) or refused for being unreadable, and the upstream
sees nothing of it.
"""

from __future__ import annotations

import json
import shutil
import socket
import uuid

import httpx
import pytest
import yaml

from conftest import ROOT, _start_upstream, start_proctor

OPP = "/services/data/v60.0/sobjects/Opportunity/006000000000001AAA"
PO = "/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder"

UPLOAD_CONNECTOR = {
    "name": "files",
    "hosts": [],  # filled in with the upload upstream
    "routes": [
        {"method": "POST", "path": "/upload/{name}", "action": "files.upload",
         "resource": {"type": "File", "id": "{name}"}, "opaque_body": True},
        {"method": "POST", "path": "/notes", "action": "files.note", "resource": {"type": "File", "id": "note"}},
    ],
}
UPLOAD_POLICIES = """
@id("uploads-small-pdfs-only")
permit (principal in AgentGroup::"sales", action == Action::"files.upload", resource)
when { context has payload && context.payload.media_type == "application/pdf" && context.payload.size < 1000 };

@id("notes-any-readable-body")
permit (principal in AgentGroup::"sales", action == Action::"files.note", resource);
"""


def connector(name: str, port: int) -> dict:
    m = yaml.safe_load((ROOT / "connectors" / f"{name}.yaml").read_text())
    m["hosts"] = [f"127.0.0.1:{port}"]
    return m


@pytest.fixture(scope="module")
def stack(tmp_path_factory, idp, pki, upstream, upstream_tls):
    base = tmp_path_factory.mktemp("hardening-bodies")
    crm_up = _start_upstream(base, None)
    erp_up = _start_upstream(base, None)
    files_up = _start_upstream(base, None)
    policies = base / "policies-src"
    shutil.copytree(ROOT / "policies", policies)
    (policies / "files.cedar").write_text(UPLOAD_POLICIES)
    (policies / "ticketing.cedar").unlink()  # this stack has no ticketing connector
    (policies / "llm.cedar").unlink()  # nor the LLM connector
    files = dict(UPLOAD_CONNECTOR, hosts=[f"127.0.0.1:{files_up.port}"])
    p = start_proctor(
        base / "proctor", idp, pki, upstream, upstream_tls,
        overrides={"approvals": {"mode": "async"}},
        policies_src=policies,
        extra_connectors=[connector("crm", crm_up.port), connector("erp", erp_up.port), files],
    )
    sales = idp.token("sales-bot", groups=["sales"])
    buyer = idp.token("buyer-bot", groups=["procurement"])
    yield {"proctor": p, "crm": crm_up, "erp": erp_up, "files": files_up, "sales": sales, "buyer": buyer}
    p.stop()
    for up in (crm_up, erp_up, files_up):
        up.proc.terminate()
        up.proc.wait(5)


def send(stack, method: str, upstream, path: str, token: str, agent: str, content: bytes = b"", headers=None):
    up = stack[upstream]
    up.clear()
    proxy = stack["proctor"].proxy_url_with(agent, token)
    with httpx.Client(proxy=proxy, timeout=15) as c:
        return c.request(method, f"http://127.0.0.1:{up.port}{path}", content=content, headers=headers or {})


def crm(stack, content: bytes, ctype: str | None, method="PATCH", path=OPP, extra=None):
    headers = {"Content-Type": ctype} if ctype else {}
    headers.update(extra or {})
    return send(stack, method, "crm", path, stack["sales"], "sales-bot", content, headers)


def nothing_reached(stack, upstream="crm") -> None:
    assert stack[upstream].received() == [], "the upstream saw a request policy did not judge"


CLOSE_WON = {"StageName": "Closed Won"}


# -- the example from the issue: deny-list policies must see every body spelling ----------
def test_plain_json_close_won_is_denied_by_policy(stack):
    r = crm(stack, json.dumps(CLOSE_WON).encode(), "application/json")
    assert r.status_code == 403 and r.json()["reasons"] == ["agents-never-close-won"]
    nothing_reached(stack)


@pytest.mark.parametrize("charset,codec", [("utf-16le", "utf-16-le"), ("UTF-16BE", "utf-16-be"), ("utf-32le", "utf-32-le")])
def test_json_in_another_unicode_charset_is_decoded_and_denied(stack, charset, codec):
    r = crm(stack, json.dumps(CLOSE_WON).encode(codec), f"application/json; charset={charset}")
    assert r.status_code == 403 and r.json()["reasons"] == ["agents-never-close-won"]
    nothing_reached(stack)


@pytest.mark.parametrize("charset,codec", [("utf-16", "utf-16-le"), ("cp500", "cp500"), ("ibm037", "cp037"),
                                           ("iso-8859-1", "latin-1"), ("utf-7", "utf-7")])
def test_json_in_a_charset_proctor_does_not_decode_is_415(stack, charset, codec):
    r = crm(stack, json.dumps(CLOSE_WON).encode(codec), f"application/json; charset={charset}")
    assert r.status_code == 415, r.text
    assert r.headers["content-type"].startswith("application/problem+json") and r.json()["decision_id"]
    nothing_reached(stack)


@pytest.mark.parametrize("ctype", ["text/plain; charset=cp500", "application/xml", "application/octet-stream", None])
def test_unreadable_body_on_a_write_route_is_415(stack, ctype):
    body = "StageName=Closed Won".encode("cp500") if ctype and "cp500" in ctype else b"<StageName>Closed Won</StageName>"
    r = crm(stack, body, ctype)
    assert r.status_code == 415, r.text
    assert "cannot read" in r.json()["detail"]
    nothing_reached(stack)


def test_form_body_fields_reach_policy(stack):
    r = crm(stack, b"StageName=Closed+Won", "application/x-www-form-urlencoded")
    assert r.status_code == 403 and r.json()["reasons"] == ["agents-never-close-won"]
    nothing_reached(stack)
    ok = crm(stack, b"StageName=Prospecting&Amount=12.5", "application/x-www-form-urlencoded")
    assert ok.status_code == 200
    assert stack["crm"].last()["body"] == "StageName=Prospecting&Amount=12.5"


def test_repeated_form_field_cannot_hide_a_value(stack):
    r = crm(stack, b"StageName=Prospecting&StageName=Closed+Won", "application/x-www-form-urlencoded")
    assert r.status_code == 400 and "must be a string" in r.json()["detail"]
    nothing_reached(stack)


def test_multipart_body_fields_reach_policy(stack):
    files = {"StageName": (None, "Closed Won"), "Note": (None, "x")}
    req = httpx.Request("PATCH", "http://x/", files=files)
    r = crm(stack, req.read(), req.headers["content-type"])
    assert r.status_code == 403 and r.json()["reasons"] == ["agents-never-close-won"]
    nothing_reached(stack)


@pytest.mark.parametrize(
    "body",
    [
        b'\xef\xbb\xbf{"StageName": "Closed Won"}',  # BOM
        b'{"StageName": "Prospecting", "StageName": "Closed Won"}',  # duplicate key: last wins upstream
        b'{"StageName": "Prospecting"} {"StageName": "Closed Won"}',  # trailing data
        b'{"StageName": "Prospecting", "Amount": NaN}',
        b'{"StageName": "Prospecting", "Amount": 1e400}',
        b'{"StageName": "Prospecting", "Amount": 10000.000000000000000001}',
        b'{"StageName": "Prospecting", "Amount": 123456789012345678901234567890}',
        b'{"StageName": "Closed\\ud800 Won"}',
    ],
    ids=["bom", "duplicate-key", "trailing-data", "nan", "1e400", "too-many-digits", "huge-int", "lone-surrogate"],
)
def test_json_that_parsers_disagree_on_is_400(stack, body):
    r = crm(stack, body, "application/json")
    assert r.status_code == 400, r.text
    nothing_reached(stack)


# -- parser differentials found by red-teaming against Werkzeug, Starlette and undici ------
def multipart(parts: list[tuple[str, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    out = b"".join(f"--{boundary}\r\n{h}\r\n\r\n".encode() + data + b"\r\n" for h, data in parts)
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("part_charset", ["utf-16le", "utf-16be", "utf-32"])
def test_multipart_part_charset_cannot_hide_a_value(stack, part_charset):
    """Flask, FastAPI and Node read these ASCII bytes as "Closed Won" whatever the part says."""
    raw, ctype = multipart([(f'Content-Disposition: form-data; name="StageName"\r\n'
                             f"Content-Type: text/plain; charset={part_charset}", b"Closed Won")])
    r = crm(stack, raw, ctype)
    assert r.status_code == 415, r.text
    nothing_reached(stack)


def test_multipart_level_charset_and_charset_field_are_refused(stack):
    raw, ctype = multipart([('Content-Disposition: form-data; name="StageName"', b"Closed +AFc-on")])
    assert crm(stack, raw, ctype + "; charset=utf-7").status_code == 415
    raw, ctype = multipart([('Content-Disposition: form-data; name="_charset_"', b"utf-7"),
                            ('Content-Disposition: form-data; name="StageName"', b"Closed +AFc-on")])
    assert crm(stack, raw, ctype).status_code == 415
    assert crm(stack, b"_charset_=utf-7&StageName=Closed+%2BAFc-on", "application/x-www-form-urlencoded").status_code == 415
    nothing_reached(stack)


def test_rfc2231_continuation_names_are_refused(stack):
    """Werkzeug reads name*0="StageName" as the field name."""
    raw, ctype = multipart([('Content-Disposition: form-data; name="Note"; name*0="StageName"', b"Closed Won")])
    r = crm(stack, raw, ctype)
    assert r.status_code == 400, r.text
    nothing_reached(stack)


@pytest.mark.parametrize("body", [b'{"stagename": "Closed Won"}', b'{"StageName": "Prospecting", "stageName": "Closed Won"}',
                                  rb'{"\u017ftageName": "Closed Won"}'])
def test_a_field_in_another_case_cannot_hide(stack, body):
    """Go's encoding/json, ASP.NET and Salesforce match field names ignoring case."""
    r = crm(stack, body, "application/json")
    assert r.status_code == 400, r.text
    nothing_reached(stack)


def test_body_field_in_the_query_string_is_refused(stack):
    """Flask's request.values, Rails params, PHP $_REQUEST merge the query into the body."""
    for path in (OPP + "?StageName=Closed+Won", OPP + "?stagename=Closed+Won", OPP + "?StageName%00=Closed+Won"):
        r = crm(stack, b"Description=x", "application/x-www-form-urlencoded", path=path)
        assert r.status_code == 400, (path, r.text)
    nothing_reached(stack)
    ok = crm(stack, b'{"StageName": "Prospecting"}', "application/json", path=OPP + "?other=1")
    assert ok.status_code == 200


# -- encodings and method overrides ---------------------------------------------------
def raw_request(stack, head: str, body: bytes) -> bytes:
    """Send bytes through the proxy as-is (clients refuse to send some of these)."""
    p = stack["proctor"]
    auth = f"Proxy-Authorization: Basic {__import__('base64').b64encode(('sales-bot:' + stack['sales']).encode()).decode()}\r\n"
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(head.replace("\r\n\r\n", "\r\n" + auth + "\r\n", 1).encode() + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head_part, _, rest = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head_part.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    return data


@pytest.mark.parametrize("coding,expected", [("gzip, chunked", 415), ("deflate, chunked", 415),
                                             ("chunked, identity", 400)])  # the engine refuses the last one itself
def test_transfer_codings_other_than_chunked_are_refused(stack, coding, expected):
    stack["crm"].clear()
    port = stack["crm"].port
    body = json.dumps(CLOSE_WON).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    head = (f"PATCH http://127.0.0.1:{port}{OPP} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: {coding}\r\n\r\n")
    reply = raw_request(stack, head, chunked)
    status = int(reply.split(b" ", 2)[1]) if reply else 0
    assert status == expected, reply[:300]
    assert b"application/problem+json" in reply
    nothing_reached(stack)


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override",
                                    "X_HTTP_METHOD_OVERRIDE", "x_http_method"])
def test_method_override_headers_are_refused(stack, header):
    r = crm(stack, json.dumps({"StageName": "Prospecting"}).encode(), "application/json", extra={header: "DELETE"})
    assert r.status_code == 400 and "method" in r.json()["detail"]
    nothing_reached(stack)


def test_method_override_in_query_or_form_is_refused(stack):
    r = crm(stack, b'{"StageName": "Prospecting"}', "application/json", path=OPP + "?_method=DELETE")
    assert r.status_code == 400
    r = crm(stack, b'{"StageName": "Prospecting"}', "application/json", path=OPP + "?%5Fmethod=DELETE")
    assert r.status_code == 400
    r = crm(stack, b"StageName=Prospecting&_method=DELETE", "application/x-www-form-urlencoded")
    assert r.status_code == 400
    for path in (OPP + "?.method=DELETE", OPP + "?_HttpMethod=DELETE", OPP + "?_%6Dethod=DELETE", OPP + "?_method[]=x"):
        r = crm(stack, b'{"StageName": "Prospecting"}', "application/json", path=path)
        assert r.status_code == 400, path
    r = crm(stack, b'{"StageName": "Prospecting", "_method": "DELETE"}', "application/json")
    assert r.status_code == 400
    r = crm(stack, b"StageName=Prospecting&_method%00=DELETE", "application/x-www-form-urlencoded")
    assert r.status_code == 400
    nothing_reached(stack)


def test_underscore_spellings_of_headers_proctor_reads_are_refused(stack):
    for name in ("Content_Type", "Idempotency_Key", "X_Request_Id", "Transfer_Encoding"):
        r = crm(stack, b'{"StageName": "Prospecting"}', "application/json", extra={name: "x"})
        assert r.status_code == 400, name
    nothing_reached(stack)


# -- aggregates that cannot be gamed ------------------------------------------------------
def order(*lines) -> dict:
    return {"Supplier": "17300001", "CompanyCode": "1010", "DocumentCurrency": "EUR",
            "to_PurchaseOrderItem": [{"Material": f"M{i}", "OrderQuantity": q, "NetPriceAmount": p}
                                     for i, (q, p) in enumerate(lines)]}


def erp(stack, content: bytes, ctype: str, key: str | None = None):
    headers = {"Content-Type": ctype, "Idempotency-Key": key or uuid.uuid4().hex}
    return send(stack, "POST", "erp", PO, stack["buyer"], "buyer-bot", content, headers)


def test_big_order_is_held(stack):
    r = erp(stack, json.dumps(order(("1", "50000"))).encode(), "application/json")
    assert r.status_code == 202 and r.json()["reasons"] == ["po-over-10k-needs-approval"]
    nothing_reached(stack, "erp")


@pytest.mark.parametrize("lines", [[("1", "50000"), ("1", "-45000")], [("1", "50000"), ("-9", "5000")],
                                   [(1, 50000), (1, -45000.0)]])
def test_a_negative_line_cannot_offset_the_total_below_the_threshold(stack, lines):
    r = erp(stack, json.dumps(order(*lines)).encode(), "application/json")
    assert r.status_code == 400 and "must be at least 0" in r.json()["detail"], r.text
    nothing_reached(stack, "erp")


@pytest.mark.parametrize("items", [{"results": [{"OrderQuantity": "3", "NetPriceAmount": "5000"}]},
                                   {"0": {"OrderQuantity": "3", "NetPriceAmount": "5000"}},
                                   {"OrderQuantity": "3", "NetPriceAmount": "5000"}])
def test_an_object_where_the_item_array_belongs_is_refused_not_read_as_no_items(stack, items):
    body = {"Supplier": "17300001", "CompanyCode": "1010", "to_PurchaseOrderItem": items}
    r = erp(stack, json.dumps(body).encode(), "application/json")
    assert r.status_code == 400 and "expected an array" in r.json()["detail"], r.text
    form = b"Supplier=17300001&CompanyCode=1010&to_PurchaseOrderItem[a][OrderQuantity]=3&to_PurchaseOrderItem[a][NetPriceAmount]=5000"
    r = erp(stack, form, "application/x-www-form-urlencoded")
    assert r.status_code == 400 and "expected an array" in r.json()["detail"], r.text
    nothing_reached(stack, "erp")


def test_a_small_order_goes_through(stack):
    r = erp(stack, json.dumps(order(("2", "100.5"))).encode(), "application/json")
    assert r.status_code == 200
    assert len(stack["erp"].received()) == 1


def test_form_encoded_order_is_aggregated_and_held(stack):
    form = ("Supplier=17300001&CompanyCode=1010&to_PurchaseOrderItem[0][Material]=A"
            "&to_PurchaseOrderItem[0][OrderQuantity]=3&to_PurchaseOrderItem[0][NetPriceAmount]=4000"
            "&to_PurchaseOrderItem[1][Material]=B&to_PurchaseOrderItem[1][OrderQuantity]=1"
            "&to_PurchaseOrderItem[1][NetPriceAmount]=10")
    r = erp(stack, form.encode(), "application/x-www-form-urlencoded")
    assert r.status_code == 202 and r.json()["reasons"] == ["po-over-10k-needs-approval"], r.text
    nothing_reached(stack, "erp")


def test_multipart_order_with_a_json_part_is_aggregated_and_held(stack):
    files = {"Supplier": (None, "17300001"), "CompanyCode": (None, "1010"),
             "to_PurchaseOrderItem[0][OrderQuantity]": (None, "2"),
             "to_PurchaseOrderItem[0][NetPriceAmount]": (None, "6000")}
    req = httpx.Request("POST", "http://x/", files=files)
    r = erp(stack, req.read(), req.headers["content-type"])
    assert r.status_code == 202 and r.json()["reasons"] == ["po-over-10k-needs-approval"], r.text
    nothing_reached(stack, "erp")


# -- opaque bodies: only where the route says so, and policy sees that they are opaque ----
def files(stack, path: str, content: bytes, ctype: str | None):
    headers = {"Content-Type": ctype} if ctype else {}
    return send(stack, "POST", "files", path, stack["sales"], "sales-bot", content, headers)


def test_opaque_upload_route_forwards_and_policy_sees_size_and_type(stack):
    ok = files(stack, "/upload/a.pdf", b"%PDF-1.7 tiny", "application/pdf")
    assert ok.status_code == 200
    assert stack["files"].last()["body"] == "%PDF-1.7 tiny"
    too_big = files(stack, "/upload/b.pdf", b"%PDF" + b"x" * 2000, "application/pdf")
    assert too_big.status_code == 403
    rec = stack["proctor"].decision(too_big.json()["decision_id"])
    assert rec["cedar"]["context"]["payload"] == {"format": "opaque", "size": 2004, "media_type": "application/pdf"}
    wrong_type = files(stack, "/upload/c.exe", b"MZ", "application/octet-stream")
    assert wrong_type.status_code == 403
    nothing_reached(stack, "files")


def test_route_without_opaque_refuses_what_it_cannot_read(stack):
    r = files(stack, "/notes", b"%PDF-1.7 tiny", "application/pdf")
    assert r.status_code == 415
    nothing_reached(stack, "files")
    ok = files(stack, "/notes", b"text=hello", "application/x-www-form-urlencoded")
    assert ok.status_code == 200


def test_inexact_numbers_as_text_never_dodge_a_numeric_policy(proctor_factory, upstream, writer_token):
    """limits.inexact_numbers: text lets such numbers through where no policy compares them,
    and a policy comparing one fails evaluation: denied, never judged on a rounded value."""
    p = proctor_factory({"limits": {"inexact_numbers": "text"}})
    proxy = p.proxy_url_with("writer-bot", writer_token)
    with httpx.Client(proxy=proxy, timeout=15) as c:
        upstream.clear()
        r = c.post(f"http://127.0.0.1:{upstream.port}/items", content=b'{"amount": 5000.000001}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 403 and r.json()["reasons"] == ["no-big-orders"], r.text
        assert upstream.received() == []
        ok = c.post(f"http://127.0.0.1:{upstream.port}/items", content=b'{"amount": 5, "lat": 52.520008}',
                    headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text
    rec = p.decision(ok.headers["x-proctor-decision-id"])
    assert rec["decision"] == "allow"
