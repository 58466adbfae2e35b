"""The bundled CRM connector (Salesforce REST sObjects/SOQL) and its mock server (no proxy process)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.connectors.classifier import Classifier, PathRejected
from proxy.connectors.manifest import load_manifest
from proxy.connectors.values import ValueRejected, with_body_fields
from proxy.demo.mock_crm import build_app

MANIFEST = Path(__file__).parents[1] / "connectors" / "crm.yaml"
V = "/services/data/v60.0"
HOST, PORT = "acme.my.salesforce.com", 443
ACC = "0015g00000AbCdEFGH"  # 18 characters
OPP = "0065g00000XyZ12345"
TYPES = {"Account": "account", "Contact": "contact", "Opportunity": "opportunity"}


def dec(text: str) -> dict:
    return {"__extn": {"fn": "decimal", "arg": text}}


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier([load_manifest(MANIFEST)])


# ---- (a) the manifest ----


def test_manifest_loads():
    m = load_manifest(MANIFEST)
    assert m.name == "crm"
    assert m.hosts == ["*.my.salesforce.com", "crm.example.com", "127.0.0.1:9102", "localhost:9102"]
    actions = {r.action for r in m.routes}
    assert actions == {"crm.query"} | {f"crm.{t}.{op}" for t in TYPES.values() for op in ("list", "read", "create", "update")}
    assert all(r.path.startswith(V + "/") for r in m.routes)


# ---- (b) classification ----


@pytest.mark.parametrize("sobject", TYPES)
def test_read_create_update_list_per_type(clf, sobject):
    low = TYPES[sobject]
    c = clf.classify("GET", HOST, PORT, f"{V}/sobjects/{sobject}/{ACC}")
    assert (c.connector, c.action, c.resource_type, c.resource_id, c.risk) == ("crm", f"crm.{low}.read", sobject, ACC, "low")
    assert c.params == {"id": ACC}
    c = clf.classify("POST", HOST, PORT, f"{V}/sobjects/{sobject}")
    assert (c.action, c.resource_uid, c.risk) == (f"crm.{low}.create", f'{sobject}::"new"', "medium")
    c = clf.classify("PATCH", HOST, PORT, f"{V}/sobjects/{sobject}/{ACC}")
    assert (c.action, c.resource_id, c.risk) == (f"crm.{low}.update", ACC, "medium")
    c = clf.classify("GET", HOST, PORT, f"{V}/sobjects/{sobject}")
    assert (c.action, c.resource_id, c.risk) == (f"crm.{low}.list", "*", "low")


def test_fifteen_character_ids_and_all_hosts(clf):
    short = ACC[:15]
    for host, port in [(HOST, PORT), ("crm.example.com", 443), ("127.0.0.1", 9102), ("localhost", 9102)]:
        assert clf.classify("GET", host, port, f"{V}/sobjects/Account/{short}").resource_id == short
    assert clf.classify("GET", "my.salesforce.com", 443, f"{V}/sobjects/Account/{ACC}") is None  # * needs a label
    assert clf.classify("GET", "127.0.0.1", 9101, f"{V}/sobjects/Account/{ACC}") is None


def test_opportunity_create_fields_and_resource_attributes(clf):
    c = clf.classify("POST", HOST, PORT, f"{V}/sobjects/Opportunity")
    c = with_body_fields(c, {"Name": "Big deal", "Amount": 250000.5, "StageName": "Prospecting", "AccountId": ACC, "CloseDate": "2026-12-31"})
    want = {"amount": dec("250000.5"), "stage": "Prospecting", "account_id": ACC}
    assert c.fields == want and c.resource_attrs == want
    # numbers sent as strings are accepted exactly
    c = with_body_fields(clf.classify("POST", HOST, PORT, f"{V}/sobjects/Opportunity"), {"Amount": "1000"})
    assert c.fields == {"amount": dec("1000.0")} and c.resource_attrs == {"amount": dec("1000.0")}


def test_updates_and_other_types_fields(clf):
    c = with_body_fields(clf.classify("PATCH", HOST, PORT, f"{V}/sobjects/Opportunity/{OPP}"), {"StageName": "Closed Won"})
    assert (c.resource_id, c.fields, c.resource_attrs) == (OPP, {"stage": "Closed Won"}, {"stage": "Closed Won"})
    c = with_body_fields(clf.classify("PATCH", HOST, PORT, f"{V}/sobjects/Account/{ACC}"), {"Industry": "Energy", "AnnualRevenue": 1.25e6})
    assert c.resource_attrs == {"industry": "Energy", "annual_revenue": dec("1250000.0")}
    c = with_body_fields(clf.classify("POST", HOST, PORT, f"{V}/sobjects/Contact"), {"LastName": "Doe", "Email": "jd@example.com", "AccountId": ACC[:15]})
    assert c.resource_attrs == {"email": "jd@example.com", "account_id": ACC[:15]}
    # nothing declared in the body: no fields, no attributes (everything is optional)
    c = with_body_fields(clf.classify("PATCH", HOST, PORT, f"{V}/sobjects/Contact/{ACC}"), {"Phone": "555", "AccountId": None})
    assert c.fields == {} and c.resource_attrs == {}


@pytest.mark.parametrize(
    "sobject,body",
    [
        ("Opportunity", {"Amount": "a lot"}),
        ("Opportunity", {"Amount": True}),
        ("Opportunity", {"Amount": {"value": 5}}),
        ("Opportunity", {"Amount": 1.23456}),  # more than 4 decimal places
        ("Opportunity", {"StageName": 5}),
        ("Opportunity", {"AccountId": "not-an-id"}),
        ("Account", {"AnnualRevenue": "NaN"}),
        ("Contact", {"AccountId": "001' OR '1'='1"}),
    ],
)
def test_wrong_body_values_are_refused(clf, sobject, body):
    for method, path in [("POST", f"{V}/sobjects/{sobject}"), ("PATCH", f"{V}/sobjects/{sobject}/{ACC}")]:
        with pytest.raises(ValueRejected):
            with_body_fields(clf.classify(method, HOST, PORT, path), body)


@pytest.mark.parametrize("bad", [ACC[:14], ACC[:16], ACC + "X", ACC[:17] + "!", "describe", "0015g00000AbCdE%20", "%27%20OR%201%3D1"])
def test_malformed_ids_are_refused_not_rerouted(clf, bad):
    for method in ("GET", "PATCH"):
        with pytest.raises(ValueRejected, match="pattern"):
            clf.classify(method, HOST, PORT, f"{V}/sobjects/Account/{bad}")


@pytest.mark.parametrize(
    "path",
    [f"{V}/sobjects/Account/../Account", f"{V}/sobjects/Account/%2e%2e", f"{V}/sobjects/Account%2f{ACC}", f"{V}/sobjects//Account/{ACC}", f"{V}/sobjects/Account/{ACC};x"],
)
def test_path_tricks_are_refused(clf, path):
    with pytest.raises(PathRejected):
        clf.classify("GET", HOST, PORT, path)


@pytest.mark.parametrize(
    "method,path",
    [
        ("DELETE", f"{V}/sobjects/Account/{ACC}"),  # not modelled: default-deny
        ("PUT", f"{V}/sobjects/Account/{ACC}"),
        ("GET", f"{V}/sobjects/account/{ACC}"),  # case-sensitive
        ("GET", f"{V}/sobjects/Lead/{ACC}"),
        ("GET", f"/services/data/v59.0/sobjects/Account/{ACC}"),
        ("GET", f"{V}/sobjects/Account/{ACC}/Contacts"),
        ("PATCH", f"{V}/sobjects/Account/External_Id__c/42"),  # upsert by external id
        ("GET", f"{V}/sobjects"),
    ],
)
def test_unmodelled_requests_match_nothing(clf, method, path):
    assert clf.classify(method, HOST, PORT, path) is None


def test_soql_query(clf):
    c = clf.classify("GET", HOST, PORT, f"{V}/query", "q=SELECT+Id,+Name+FROM+Account+WHERE+Industry+%3D+%27Energy%27")
    assert (c.action, c.resource_uid, c.risk) == ("crm.query", 'CrmQuery::"soql"', "low")
    assert c.query_params == {"q": "SELECT Id, Name FROM Account WHERE Industry = 'Energy'"}
    with pytest.raises(ValueRejected, match="required"):
        clf.classify("GET", HOST, PORT, f"{V}/query", "")
    with pytest.raises(ValueRejected, match="more than once"):
        clf.classify("GET", HOST, PORT, f"{V}/query", "q=SELECT+Id+FROM+Account&q=SELECT+Id+FROM+Contact")
    assert clf.classify("POST", HOST, PORT, f"{V}/query", "q=x") is None


# ---- (c) the mock server ----


def run_mock(scenario) -> None:
    async def main() -> None:
        app = build_app()
        async with TestClient(TestServer(app)) as client:
            await scenario(client, app)

    asyncio.run(main())


def test_mock_seed_ids_are_salesforce_ids_the_connector_accepts(clf):
    async def scenario(client, app):
        prefixes = {"Account": "001", "Contact": "003", "Opportunity": "006"}
        counts = {}
        for sobject, prefix in prefixes.items():
            r = await client.get(f"{V}/sobjects/{sobject}")
            assert r.status == 200
            body = await r.json()
            assert body["objectDescribe"]["name"] == sobject
            ids = [item["Id"] for item in body["recentItems"]]
            counts[sobject] = len(ids)
            for rid in ids:
                assert re.fullmatch(prefix + "[A-Za-z0-9]{15}", rid)
                assert clf.classify("GET", "127.0.0.1", 9102, f"{V}/sobjects/{sobject}/{rid}").resource_id == rid
        assert counts == {"Account": 2, "Contact": 2, "Opportunity": 1}

    run_mock(scenario)


def test_mock_create_read_update_and_auth_header():
    async def scenario(client, app):
        assert app["last_authorization"] is None
        r = await client.post(
            f"{V}/sobjects/Opportunity",
            json={"Name": "Demo deal", "Amount": 125000.0, "StageName": "Prospecting", "Custom__c": "kept"},
            headers={"Authorization": "Bearer injected-token"},
        )
        assert r.status == 201
        created = await r.json()
        assert created["success"] is True and created["errors"] == [] and created["id"].startswith("006") and len(created["id"]) == 18
        assert app["last_authorization"] == "Bearer injected-token"
        rid = created["id"]
        r = await client.get(f"{V}/sobjects/Opportunity/{rid}")
        rec = await r.json()
        assert r.status == 200
        assert rec["attributes"] == {"type": "Opportunity", "url": f"{V}/sobjects/Opportunity/{rid}"}
        assert (rec["Id"], rec["Amount"], rec["StageName"], rec["Custom__c"]) == (rid, 125000.0, "Prospecting", "kept")
        r = await client.patch(f"{V}/sobjects/Opportunity/{rid}", json={"StageName": "Closed Won"})
        assert r.status == 204 and await r.read() == b""
        r = await client.get(f"{V}/sobjects/Opportunity/{rid[:15]}", params={"fields": "StageName, Amount"})
        assert await r.json() == {"attributes": rec["attributes"], "Id": rid, "StageName": "Closed Won", "Amount": 125000.0}

    run_mock(scenario)


def test_mock_errors():
    async def scenario(client, app):
        missing = "0015g00000ZZZZZZZZ"
        for r in [await client.get(f"{V}/sobjects/Account/{missing}"), await client.patch(f"{V}/sobjects/Account/{missing}", json={"Name": "x"})]:
            assert r.status == 404
            assert await r.json() == [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
        r = await client.post(f"{V}/sobjects/Account", data=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status == 400 and (await r.json())[0]["errorCode"] == "JSON_PARSER_ERROR"
        rid = (await (await client.get(f"{V}/sobjects/Account")).json())["recentItems"][0]["Id"]
        r = await client.patch(f"{V}/sobjects/Account/{rid}", data=b"[1, 2", headers={"Content-Type": "application/json"})
        assert r.status == 400 and (await r.json())[0]["errorCode"] == "JSON_PARSER_ERROR"
        r = await client.get(f"{V}/query", params={"q": "DELETE FROM Account"})
        assert r.status == 400 and (await r.json())[0]["errorCode"] == "MALFORMED_QUERY"

    run_mock(scenario)


def test_mock_soql_query():
    async def scenario(client, app):
        r = await client.get(f"{V}/query", params={"q": "SELECT Id, Name, Industry FROM Account"})
        body = await r.json()
        assert r.status == 200 and body["totalSize"] == 2 and body["done"] is True
        assert {rec["Name"] for rec in body["records"]} == {"Acme Corporation", "Globex Inc"}
        assert set(body["records"][0]) == {"attributes", "Id", "Name", "Industry"}
        acme = next(rec["Id"] for rec in body["records"] if rec["Name"] == "Acme Corporation")
        r = await client.get(f"{V}/query", params={"q": f"select Name, Email from Contact where AccountId = '{acme}'"})
        body = await r.json()
        assert body["totalSize"] == 1 and body["records"][0]["Email"] == "wile@acme.example"
        r = await client.get(f"{V}/query", params={"q": "SELECT Id FROM Account LIMIT 1"})
        assert (await r.json())["totalSize"] == 1
        await client.post(f"{V}/sobjects/Account", json={"Name": "New Co", "Industry": "Energy"})
        r = await client.get(f"{V}/query", params={"q": "SELECT Name FROM Account WHERE Industry = 'Energy'"})
        assert [rec["Name"] for rec in (await r.json())["records"]] == ["New Co"]

    run_mock(scenario)
