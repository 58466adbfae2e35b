"""Classification and path normalisation (no processes)."""

from __future__ import annotations

import pytest

from proxy.connectors.classifier import Classifier, PathRejected, host_matches, normalise_path
from proxy.connectors.manifest import ConnectorManifest, ManifestError, load_manifests


def manifest(**kw) -> ConnectorManifest:
    base = {
        "name": "svc",
        "hosts": ["api.example.com", "*.svc.example.com", "127.0.0.1:9000"],
        "routes": [
            {"method": "GET", "path": "/items/{id}", "action": "svc.item.read", "resource": {"type": "Item", "id": "{id}"}},
            {"method": "GET", "path": "/items/special", "action": "svc.item.special", "resource": {"type": "Item", "id": "special"}},
            {"method": "POST", "path": "/items", "action": "svc.item.create", "resource": {"type": "Item", "id": "new"}, "risk": "high"},
            {"method": "GET", "path": "/files/{*}", "action": "svc.file.read", "resource": {"type": "File", "id": "{*}"}},
        ],
    }
    base.update(kw)
    return ConnectorManifest.model_validate(base)


@pytest.fixture
def clf() -> Classifier:
    return Classifier([manifest()])


def test_route_match_and_resource_id(clf):
    c = clf.classify("GET", "api.example.com", 443, "/items/42")
    assert (c.action, c.resource_type, c.resource_id, c.connector) == ("svc.item.read", "Item", "42", "svc")


def test_literal_route_beats_parameter(clf):
    assert clf.classify("GET", "api.example.com", 443, "/items/special").action == "svc.item.special"


def test_method_matters(clf):
    assert clf.classify("DELETE", "api.example.com", 443, "/items/42") is None
    assert clf.classify("post", "api.example.com", 443, "/items").risk == "high"


def test_wildcard_tail(clf):
    assert clf.classify("GET", "api.example.com", 443, "/files/a/b/c.txt").resource_id == "a/b/c.txt"


def test_host_patterns(clf):
    assert clf.classify("GET", "x.svc.example.com", 443, "/items/1") is not None
    assert clf.classify("GET", "svc.example.com", 443, "/items/1") is None  # * needs a label
    assert clf.classify("GET", "API.EXAMPLE.COM.", 443, "/items/1") is not None  # case, trailing dot
    assert clf.classify("GET", "127.0.0.1", 9000, "/items/1") is not None
    assert clf.classify("GET", "127.0.0.1", 9001, "/items/1") is None
    assert clf.classify("GET", "evil-api.example.com", 443, "/items/1") is None


def test_unknown_host_is_none_unless_allowlisted():
    assert Classifier([manifest()]).classify("GET", "other.com", 443, "/") is None
    c = Classifier([manifest()], unclassified_hosts=["other.com"]).classify("GET", "other.com", 443, "/")
    assert (c.action, c.resource_uid) == ("http.request", 'HttpHost::"other.com"')


@pytest.mark.parametrize(
    "path",
    [
        "/items/../admin",
        "/items/./42",
        "/items/%2e%2e/admin",
        "/items/%2E%2E",
        "/items%2f42",
        "/items%2F42",
        "/items/4%5c2",
        "/items\\42",
        "//items/42",
        "/items//42",
        "/items/42;jsessionid=x",
        "/items/%252e%252e",
        "/items/%00",
        "items/42",
    ],
)
def test_path_tricks_refused(clf, path):
    with pytest.raises(PathRejected):
        clf.classify("GET", "api.example.com", 443, path)


def test_safe_normalisation(clf):
    assert normalise_path("/items/42/") == ["items", "42"]
    assert normalise_path("/items/a%20b") == ["items", "a b"]
    assert clf.classify("GET", "api.example.com", 443, "/items/42/").resource_id == "42"
    # case is significant: /ITEMS is not /items, and matches nothing
    assert clf.classify("GET", "api.example.com", 443, "/ITEMS/42") is None


def test_host_matches_ipv6():
    assert host_matches("[::1]:8080", "::1", 8080)
    assert not host_matches("[::1]:8080", "::1", 8081)


def test_manifest_validation_errors(tmp_path):
    with pytest.raises(Exception, match="does not define"):
        manifest(routes=[{"method": "GET", "path": "/a", "action": "x", "resource": {"type": "T", "id": "{id}"}}])
    with pytest.raises(Exception, match="unknown HTTP method"):
        manifest(routes=[{"method": "FETCH", "path": "/a", "action": "x", "resource": {"type": "T"}}])
    with pytest.raises(Exception, match="Extra inputs"):
        manifest(hots=["typo"])
    (tmp_path / "a.yaml").write_text("name: a\nhosts: [x]\nroutes: []\n")
    (tmp_path / "b.yaml").write_text("name: a\nhosts: [y]\nroutes: []\n")
    with pytest.raises(ManifestError, match="duplicate"):
        load_manifests(tmp_path)


def test_bundled_connectors_load():
    from proxy.config import default_config

    assert {m.name for m in load_manifests(default_config().connectors_dir)} >= {"ticketing"}


def test_invalid_utf8_percent_encoding_refused(clf):
    with pytest.raises(PathRejected, match="UTF-8"):
        clf.classify("GET", "api.example.com", 443, "/items/%ff")


def test_default_resource_id_is_the_path():
    m = manifest(routes=[{"method": "GET", "path": "/reports/{year}", "action": "r", "resource": {"type": "Report"}}])
    assert Classifier([m]).classify("GET", "api.example.com", 443, "/reports/2026").resource_id == "/reports/2026"


def test_star_id_needs_a_tail():
    with pytest.raises(Exception, match="no \\{\\*\\} tail"):
        manifest(routes=[{"method": "GET", "path": "/a", "action": "x", "resource": {"type": "T", "id": "{*}"}}])


def test_resource_template_is_substituted_once():
    m = manifest(routes=[{"method": "GET", "path": "/t/{table}/{sys_id}", "action": "r", "resource": {"type": "Rec", "id": "{table}/{sys_id}"}}])
    c = Classifier([m]).classify("GET", "api.example.com", 443, "/t/%7Bsys_id%7D/incident")
    assert c.resource_id == "{sys_id}/incident"


def test_resource_uid_escapes_quotes():
    m = manifest(routes=[{"method": "GET", "path": "/t/{id}", "action": "r", "resource": {"type": "Rec", "id": "{id}"}}])
    c = Classifier([m]).classify("GET", "api.example.com", 443, '/t/%22%20or%20x')
    assert c.resource_uid == 'Rec::"\\" or x"'
