"""Fleet policy without processes (proxy/policy/fleet.py): pushed file sets are checked before
anything is written (names, sizes, the schema present), materialized into a fresh directory
that loads exactly as the files say, and validated against this replica's connectors."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import default_config
from proxy.policy.engine import load_bundle
from proxy.policy.fleet import MAX_PUSH_BYTES, PushRejected, check_files, materialize
from proxy.policy.sources import policy_source

ROOT = Path(__file__).resolve().parent.parent


def bundled_files() -> dict[str, str]:
    d = ROOT / "policies"
    return {p.name: p.read_text() for p in d.iterdir() if p.suffix == ".cedar" or p.name == "schema.cedarschema"}


@pytest.mark.parametrize("files, problem", [
    ({}, "no files"),
    ({"a.cedar": "permit(principal, action, resource);"}, "schema file schema.cedarschema is missing"),
    ({"schema.cedarschema": ""}, "no *.cedar policy files"),
    ({"schema.cedarschema": "", "../x.cedar": ""}, "plain file name"),
    ({"schema.cedarschema": "", "sub/x.cedar": ""}, "plain file name"),
    ({"schema.cedarschema": "", ".hidden.cedar": ""}, "plain file name"),
    ({"schema.cedarschema": "", "x\n.cedar": ""}, "plain file name"),
    ({"schema.cedarschema": "", "a.cedar": "", "run.sh": "rm -rf /"}, "only *.cedar policy files"),
    ({"schema.cedarschema": "", "a.cedar": "x" * (MAX_PUSH_BYTES + 1)}, "bytes: at most"),
])
def test_bad_file_sets_are_refused_before_anything_is_written(files: dict, problem: str) -> None:
    assert any(problem in p for p in check_files(files, "schema.cedarschema", "entities.json")), check_files(
        files, "schema.cedarschema", "entities.json")


def test_materialized_files_load_as_the_same_revision(tmp_path: Path) -> None:
    cfg = default_config()
    seed = policy_source(cfg)
    here = load_bundle(seed)
    source = materialize(seed, tmp_path / "active", dict(here.sources))
    assert source.policy_dir.parent == tmp_path / "active" and source.policy_dir.name.startswith("rev-")
    assert load_bundle(source).revision == here.revision  # same files, same connectors: same revision
    again = materialize(seed, tmp_path / "active", dict(here.sources))
    assert again.policy_dir != source.policy_dir  # a fresh directory each time: never half-written
    with pytest.raises(PushRejected) as e:
        materialize(seed, tmp_path / "active", {"schema.cedarschema": "", "../../etc/passwd": "x"})
    assert "plain file name" in str(e.value)
    assert not (tmp_path / "etc").exists()


def test_the_url_a_replica_advertises_to_the_others(monkeypatch) -> None:
    from proxy.config import ProctorConfig
    from proxy.policy.fleet import advertised_control_url

    def cfg(**control) -> ProctorConfig:
        return ProctorConfig.model_validate({"control": control})

    assert advertised_control_url(cfg(listen={"host": "10.0.0.7", "port": 8081})) == "http://10.0.0.7:8081"
    assert advertised_control_url(cfg(listen={"host": "0.0.0.0", "port": 8081})) is None  # (loopback: itself)
    svc = "http://proctor-control.proctor.svc.cluster.local:8081"
    assert advertised_control_url(cfg(listen={"host": "0.0.0.0", "port": 8081}, public_url=svc)) == svc
    monkeypatch.setenv("PROCTOR_PEER_URL", "http://10.1.2.3:8081")
    # the pod's own address wins over the load-balanced Service
    assert advertised_control_url(cfg(public_url=svc, peer_url_env="PROCTOR_PEER_URL")) == "http://10.1.2.3:8081"
    monkeypatch.setenv("PROCTOR_PEER_URL", "http://0.0.0.0:8081")
    with pytest.raises(ValueError):
        advertised_control_url(cfg(peer_url_env="PROCTOR_PEER_URL"))
    monkeypatch.delenv("PROCTOR_PEER_URL")
    with pytest.raises(ValueError, match="not set"):
        advertised_control_url(cfg(peer_url_env="PROCTOR_PEER_URL"))
    with pytest.raises(ValueError, match="not both"):
        cfg(peer_url="http://a:1", peer_url_env="X")
