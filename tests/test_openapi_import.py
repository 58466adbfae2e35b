"""`proctor connector import-openapi`: OpenAPI 3 and Swagger 2 documents to connector manifests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import DATA
from proxy.connectors.classifier import Classifier
from proxy.connectors.manifest import ConnectorManifest
from proxy.connectors.openapi import OpenApiError, manifest_from_openapi
from proxy.connectors.values import ValueRejected, with_body_fields

SNOW = DATA / "openapi" / "servicenow-incident.yaml"
PETS = DATA / "openapi" / "petstore-swagger2.json"


def routes_by_action(m: dict) -> dict:
    return {r["action"]: r for r in m["routes"]}


def test_openapi3_document():
    m = manifest_from_openapi(yaml.safe_load(SNOW.read_text()), name="snow")
    assert m["hosts"] == ["acme.service-now.com"]
    r = routes_by_action(m)
    assert set(r) == {"snow.list_incidents", "snow.create_incident", "snow.get_incident", "snow.update_incident", "snow.delete_incident"}
    assert r["snow.get_incident"]["path"] == "/api/now/table/incident/{sys_id}"
    assert r["snow.get_incident"]["resource"] == {"type": "Incident", "id": "{sys_id}"}
    assert r["snow.list_incidents"]["query"]["sysparm_limit"] == {"type": "long", "min": 1, "max": 1000}
    body = r["snow.create_incident"]["body"]
    assert body["short_description"] == {"path": "short_description", "type": "string", "required": True}
    assert body["urgency"]["type"] == "long" and body["business_impact"]["type"] == "decimal"
    assert body["caller_email"]["path"] == "caller.email"
    assert body["watch_list"]["path"] == "watch_list[*]"
    assert "required" not in r["snow.update_incident"]["body"]["short_description"]  # PATCH is partial
    assert r["snow.delete_incident"]["risk"] == "high"


def test_generated_manifest_classifies_requests():
    m = ConnectorManifest.model_validate(manifest_from_openapi(yaml.safe_load(SNOW.read_text()), name="snow"))
    clf = Classifier([m])
    c = clf.classify("GET", "acme.service-now.com", 443, "/api/now/table/incident", "sysparm_limit=5")
    assert c.action == "snow.list_incidents" and c.query_params == {"sysparm_limit": 5}
    with pytest.raises(ValueRejected):
        clf.classify("GET", "acme.service-now.com", 443, "/api/now/table/incident", "sysparm_limit=5000")
    c = clf.classify("POST", "acme.service-now.com", 443, "/api/now/table/incident", "")
    c = with_body_fields(c, {"short_description": "x", "urgency": 2, "watch_list": ["a", "b"]})
    assert c.fields["urgency"] == 2 and c.fields["watch_list"] == ["a", "b"]


def test_swagger2_document():
    m = manifest_from_openapi(json.loads(PETS.read_text()))
    assert m["name"] == "pet_store" and m["hosts"] == ["petstore.example.com"]
    r = routes_by_action(m)
    assert r["pet_store.get_pet_by_id"]["path"] == "/v2/pet/{petId}"
    assert r["pet_store.get_pet_by_id"]["params"] == {"petId": {"type": "long"}}
    assert r["pet_store.add_pet"]["body"]["name"] == {"path": "name", "type": "string", "required": True}
    assert r["pet_store.add_pet"]["body"]["tags"]["path"] == "tags[*]"


@pytest.mark.parametrize("doc", [{"openapi": "2.5"}, {"swagger": "2.0", "paths": {}}, ["not", "a", "mapping"]])
def test_rejects_what_it_cannot_read(doc):
    with pytest.raises(OpenApiError):
        manifest_from_openapi(doc)


def test_cli_writes_a_loadable_manifest(tmp_path):
    out = tmp_path / "connectors" / "snow.yaml"
    out.parent.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "connector", "import-openapi", str(SNOW), "--name", "snow", "-o", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "5 routes" in r.stderr
    from proxy.connectors.manifest import load_manifests

    assert load_manifests(out.parent)[0].name == "snow"
    bad = tmp_path / "bad.yaml"
    bad.write_text("openapi: 3.0.0\ninfo: {title: x}\npaths: {}\n")
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "connector", "import-openapi", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no operations" in r.stderr
