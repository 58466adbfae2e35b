"""deploy/kubernetes: every manifest is valid Kubernetes, consistent with itself, and runs Proctor.

- Every YAML document under deploy/kubernetes validates offline against the Kubernetes
  JSON schemas bundled with `kubernetes-validate` (strict: unknown fields fail) for
  K8S_VERSION; the ServiceMonitor (a CRD, not bundled) against a checked-in subset of
  its CRD schema (tests/data/k8s); kustomizations list every manifest in their folder.
- The replica set hangs together: probes on /readyz and /healthz at the control port,
  replicas >= 2 and the HPA agreeing, the PDB, Services and ServiceMonitor selecting the
  Deployment's pods, control.public_url naming the control Service, and secrets only
  referenced (secretKeyRef, secret volumes), never inlined.
- The proctor.yaml embedded in each ConfigMap loads with Proctor's own config loader,
  and the policies and connectors ConfigMaps compile together.
- A pod is booted from the manifests: its volumes laid out as the kubelet would mount
  them (ConfigMap keys and generated Secret material as files), its environment from the
  Secrets, and its container's args run as `proctor`; it must become ready (on PostgreSQL
  for the replica set).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import ROOT, free_port, wait_for
from proxy.config import load_config
from proxy.connectors.manifest import load_manifests
from proxy.policy.engine import load_bundle
from proxy.policy.formatting import unformatted
from proxy.policy.sources import policy_source

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")

# The oldest Kubernetes release the manifests target (every field they use exists there).
K8S_VERSION = "1.30"
K8S_DIR = ROOT / "deploy" / "kubernetes"
REPLICAS = K8S_DIR / "replicas"
SIDECAR = K8S_DIR / "sidecar"
TRANSPARENT = K8S_DIR / "transparent"
SERVICEMONITOR_SCHEMA = Path(__file__).resolve().parent / "data" / "k8s" / "servicemonitor-v1.schema.json"
# Custom resources validated against a checked-in schema instead of kubernetes-validate's.
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR_SCHEMA}
PG_DSN = os.environ.get("PROCTOR_TEST_POSTGRES_DSN")


# --------------------------------------------------------------------- helpers
def manifest_files() -> list[Path]:
    return sorted([*K8S_DIR.rglob("*.yaml"), *K8S_DIR.rglob("*.yml")])


def docs_of(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def objects(folder: Path, *, examples: bool = False) -> list[dict]:
    """The Kubernetes objects in a folder (not its kustomization; *.example.yaml only if asked)."""
    out = []
    for f in sorted(folder.glob("*.yaml")):
        if f.name == "kustomization.yaml" or (f.name.endswith(".example.yaml") and not examples):
            continue
        out += docs_of(f)
    return out


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    """A matchLabels selector (the only form these manifests use) against a label set."""
    assert set(selector) <= {"matchLabels"}, f"unexpected selector form {selector}"
    return bool(selector.get("matchLabels")) and all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def proctor_container(deployment: dict) -> dict:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["image"].split(":")[0].endswith("proctor")]
    return c


def embedded_config(objs: list[dict]) -> str:
    return one(objs, "ConfigMap", "proctor-config")["data"]["proctor.yaml"]


def load_embedded(text: str, tmp_path: Path):
    f = tmp_path / "proctor.yaml"
    f.write_text(text)
    return load_config(f)


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from walk_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_strings(v)
    elif isinstance(node, str):
        yield node


# ------------------------------------------------------------ schema validation
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path):
    docs = docs_of(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc, f"{path}: not a Kubernetes object"
        if doc["apiVersion"].startswith("kustomize.config.k8s.io/"):
            continue  # not an API object: checked by test_kustomizations_list_every_manifest
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            jsonschema.validate(doc, json.loads(crd.read_text()), cls=jsonschema.Draft202012Validator)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{path}: {e.message} (a custom resource needs a schema in CRD_SCHEMAS)")


def test_the_validators_refuse_what_kubernetes_would():
    """Strict validation bites: an unknown field, a wrong type, a bad ServiceMonitor interval."""
    deployment = one(objects(REPLICAS), "Deployment")
    typo = copy.deepcopy(deployment)
    proctor_container(typo)["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)
    monitor = copy.deepcopy(one(objects(REPLICAS), "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, json.loads(SERVICEMONITOR_SCHEMA.read_text()))


@pytest.mark.parametrize("folder", [REPLICAS, SIDECAR, TRANSPARENT], ids=["replicas", "sidecar", "transparent"])
def test_kustomizations_list_every_manifest(folder: Path):
    (k,) = docs_of(folder / "kustomization.yaml")
    assert k["kind"] == "Kustomization"
    listed = k["resources"]
    assert len(listed) == len(set(listed))
    for r in listed:
        assert (folder / r).is_file(), f"{folder.name}/kustomization.yaml lists a missing {r}"
    present = {f.name for f in folder.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {n for n in present if n.endswith(".example.yaml")}
    assert not examples & set(listed), "example Secrets are never applied with the kustomization"
    assert present - examples == set(listed), "every manifest in the folder is part of its kustomization"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("folder", [REPLICAS, SIDECAR, TRANSPARENT], ids=["replicas", "sidecar", "transparent"])
def test_kustomize_builds(folder: Path):
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(built) == len(objects(folder))
    (k,) = docs_of(folder / "kustomization.yaml")
    if "namespace" in k:
        assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {k["namespace"]}


# ------------------------------------------------------------- the replica set
def test_replica_set_probes_point_at_the_control_port(tmp_path: Path):
    objs = objects(REPLICAS)
    deployment = one(objs, "Deployment", "proctor")
    c = proctor_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    cfg = load_embedded(embedded_config(objs), tmp_path)
    assert ports == {"agents": cfg.listen.port, "control": cfg.control.listen.port, "gateway": cfg.gateway.listen.port}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == cfg.control.listen.port, (probe, get)
    assert c["startupProbe"]["httpGet"]["port"] == "control"
    # probes come from the kubelet at the pod IP: the control API cannot listen on loopback only
    assert cfg.control.listen.host in ("0.0.0.0", "::")
    assert c["args"] == ["run", "-c", "/etc/proctor/config/proctor.yaml"]


def test_replica_set_scales_and_survives_disruptions():
    objs = objects(REPLICAS)
    deployment = one(objs, "Deployment", "proctor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], pod_labels)
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "proctor"}
    assert 2 <= hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    pdb = one(objs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    spec = deployment["spec"]["template"]["spec"]
    assert {t["topologyKey"] for t in spec["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    assert all(selects(t["labelSelector"], pod_labels) for t in spec["topologySpreadConstraints"])
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert all(selects(t["podAffinityTerm"]["labelSelector"], pod_labels) for t in anti)


def test_replica_set_runs_unprivileged():
    spec = one(objects(REPLICAS), "Deployment", "proctor")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # a read-only root: everything Proctor writes is on a mounted volume
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/var/lib/proctor"]] and "emptyDir" in volumes[mounts["/tmp"]]


def test_replica_set_services_and_monitor_select_the_pods(tmp_path: Path):
    objs = objects(REPLICAS)
    deployment = one(objs, "Deployment", "proctor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in proctor_container(deployment)["ports"]}
    services = {s["metadata"]["name"]: s for s in objs if s["kind"] == "Service"}
    assert set(services) == {"proctor-agents", "proctor-gateway", "proctor-control"}
    for svc in services.values():
        assert svc["spec"]["selector"] == {k: pod_labels[k] for k in svc["spec"]["selector"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in container_ports, (svc["metadata"]["name"], p)
    assert [p["targetPort"] for p in services["proctor-control"]["spec"]["ports"]] == ["control"]
    # the ServiceMonitor scrapes /metrics of the control Service's endpoints (every pod)
    monitor = one(objs, "ServiceMonitor")
    selected = [n for n, s in services.items() if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert selected == ["proctor-control"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in services["proctor-control"]["spec"]["ports"]}
    # control.public_url names the control Service in the kustomization's namespace, on its port
    (k,) = docs_of(REPLICAS / "kustomization.yaml")
    cfg = load_embedded(embedded_config(objs), tmp_path)
    url = urlsplit(cfg.control.public_url or "")
    (control_port,) = services["proctor-control"]["spec"]["ports"]
    assert url.hostname == f"proctor-control.{k['namespace']}.svc.cluster.local"
    assert url.port == control_port["port"]
    assert cfg.control.base_url == cfg.control.public_url


def test_secrets_are_referenced_not_inlined(tmp_path: Path):
    objs = objects(REPLICAS)
    examples = [o for o in objects(REPLICAS, examples=True) if o["kind"] == "Secret"]
    assert not any(o["kind"] == "Secret" for o in objs), "no Secret is applied with the manifests"
    # the example Secrets carry placeholders only, and name every key the Deployment reads
    declared: dict[str, set[str]] = {}
    for s in examples:
        values = {**s.get("stringData", {}), **s.get("data", {})}
        assert all(v.startswith("REPLACE") for v in values.values()), s["metadata"]["name"]
        declared[s["metadata"]["name"]] = set(values)
    deployment = one(objs, "Deployment", "proctor")
    spec = deployment["spec"]["template"]["spec"]
    c = proctor_container(deployment)
    from_secrets: dict[str, tuple[str, str]] = {}
    for e in c["env"]:
        if "value" in e:
            if e["name"] != "PROCTOR_PEER_URL":  # (the pod's own address: not a secret)
                assert not re.search(r"URL|DSN|PASSWORD|SECRET|TOKEN|KEY", e["name"]), f"{e['name']} is inlined"
            continue
        if "fieldRef" in e["valueFrom"]:
            continue
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["key"] in declared[ref["name"]], ref
        from_secrets[e["name"]] = (ref["name"], ref["key"])
    secret_volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    for v in secret_volumes.values():
        assert {i["key"] for i in v["items"]} <= declared[v["secretName"]], v
    # proctor.yaml reads every secret through those: the DSN by url_env, the CA and issuer key from
    # the secret volumes, the chain key and the connector's upstream account from the environment
    cfg = load_embedded(embedded_config(objs), tmp_path)
    assert cfg.store.url is None and from_secrets[cfg.store.url_env] == ("proctor-store", "url")
    assert from_secrets[cfg.audit.chain_key_env] == ("proctor-audit", "chain-key")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert secret_volumes[mounts[str(cfg.ca.cert_file.parent)]]["secretName"] == "proctor-ca"
    assert secret_volumes[mounts[str(cfg.ca.key_file.parent)]]["secretName"] == "proctor-ca"
    assert secret_volumes[mounts[str(cfg.dev_issuer.key_file.parent)]]["secretName"] == "proctor-dev-issuer"
    connectors = one(objs, "ConfigMap", "proctor-connectors")["data"]
    auth_envs = {ref for text in connectors.values() for ref in re.findall(r"\{env: ([A-Z_]+)\}", text)}
    assert auth_envs and auth_envs <= set(from_secrets)
    # and no ConfigMap carries key material or a URL with credentials
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        for text in walk_strings(cm["data"]):
            assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text, cm["metadata"]["name"]
            assert not re.search(r"\w+://[^/\s@<>]*:[^/\s@<>]*@", text), cm["metadata"]["name"]


# ----------------------------------------------------------- embedded configs
def test_the_replica_config_loads_with_proctors_loader(tmp_path: Path):
    cfg = load_embedded(embedded_config(objects(REPLICAS)), tmp_path)
    assert cfg.store.url_env == "PROCTOR_STORE_URL"
    assert cfg.ca is not None and cfg.dev_issuer_enabled is False
    assert cfg.identity is not None and all(i.jwks_url for i in cfg.identity.issuers)
    assert cfg.state_dir == Path("/var/lib/proctor/state")
    assert cfg.policies.dir == Path("/etc/proctor/policies") and cfg.connectors_dir == Path("/etc/proctor/connectors")
    assert cfg.approvals.mode == "async" and cfg.gateway.enabled
    assert cfg.policies.source == "store"  # one policy set for the fleet; the ConfigMap seeds it
    # the audit sinks are checked at startup, not by the loader: check them here too
    from proxy.audit.netsinks import build_sink

    for sink in cfg.audit.sinks:
        build_sink(sink, tmp_path)


def test_the_sidecar_config_loads_with_proctors_loader(tmp_path: Path):
    cfg = load_embedded(embedded_config(objects(SIDECAR)), tmp_path)
    assert cfg.listen.host == "127.0.0.1"  # only the agent in the pod
    assert cfg.control.public_url == "http://127.0.0.1:8081" and cfg.dev_issuer_enabled is False


def test_the_policy_and_connector_configmaps_compile_together(tmp_path: Path):
    objs = objects(REPLICAS)
    cfg_text = embedded_config(objs)
    for cm, target in (("proctor-policies", "policies"), ("proctor-connectors", "connectors")):
        d = tmp_path / target
        d.mkdir()
        for key, text in one(objs, "ConfigMap", cm)["data"].items():
            (d / key).write_text(text)
    cfg_text = cfg_text.replace("/etc/proctor/policies", str(tmp_path / "policies"))
    cfg_text = cfg_text.replace("/etc/proctor/connectors", str(tmp_path / "connectors"))
    cfg = load_embedded(cfg_text, tmp_path)
    manifests = load_manifests(cfg.connectors_dir)
    assert [m.name for m in manifests] == ["ticketing"]
    bundle = load_bundle(policy_source(cfg, manifests=manifests))
    assert bundle.policy_count == 3
    assert unformatted(cfg.policies.dir) == [], "format the policies with `proctor policy fmt`"


# ------------------------------------------------------- the transparent sidecar
# What makes bypass impossible in deploy/kubernetes/transparent: the init container really
# writes the redirect for the uid and port the proctor container uses, and the agent can
# neither be that uid nor undo the rules.
PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}
CA_VARS = {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"}


def transparent_pod() -> tuple[list[dict], dict, dict[str, dict]]:
    objs = objects(TRANSPARENT)
    spec = one(objs, "Deployment", "support-agent")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in [*spec["initContainers"], *spec["containers"]]}
    return objs, spec, containers


def run_as(spec: dict, container: dict) -> tuple[int | None, bool | None]:
    """The uid and runAsNonRoot a container gets (its own securityContext over the pod's)."""
    pod, own = spec.get("securityContext", {}), container.get("securityContext", {})
    return own.get("runAsUser", pod.get("runAsUser")), own.get("runAsNonRoot", pod.get("runAsNonRoot"))


def netsetup_args(container: dict, tmp_path: Path):
    """The init container's command parsed by `proctor netsetup` itself, and the plan it builds."""
    from proxy import netsetup as ns
    from proxy.cli import netsetup

    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:2] == ["proctor", "netsetup"], f"the init container runs {argv}, not proctor netsetup"
    ctx = netsetup.make_context("netsetup", argv[2:])
    p = ctx.params
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.96.0.10\n")  # what a pod's resolv.conf names
    plan = ns.build_plan(
        proxy_uid=p["proxy_uid"], proxy_port=p["proxy_port"], exclude_uids=p["exclude_uids"],
        exclude_ports=p["exclude_ports"], exclude_cidrs=p["exclude_cidrs"], dns_port=p["dns_port"],
        dns_servers=p["dns_servers"], ipv6=p["ipv6"], resolv_conf=resolv,
        protect_ports=p["protect_ports"] or None, status_port=p["status_port"],
    )
    return argv, p, plan


def test_transparent_init_container_redirects_to_the_sidecars_uid_and_port(tmp_path: Path):
    objs, spec, containers = transparent_pod()
    (init,) = [c for c in spec["initContainers"] if "netsetup" in [*c.get("command", []), *c.get("args", [])]]
    argv, params, plan = netsetup_args(init, tmp_path)
    assert params["do_apply"] and not params["do_remove"] and params["netns"] is None  # this pod's namespace
    proctor = proctor_container(one(objs, "Deployment"))
    assert plan.proxy_uid == run_as(spec, proctor)[0] == 1337
    cfg = load_embedded(embedded_config(objs), tmp_path)
    assert cfg.transparent.enabled and plan.proxy_port == cfg.transparent.port == 15001
    # the redirect sends IPv4 to 127.0.0.1 and IPv6 to ::1: the listener is on both, and only there
    assert set(cfg.transparent.hosts) == {"127.0.0.1", "::1"}
    # Proctor's own listeners are refused to the agent, and the status redirect names the port
    # the control API really listens on (else a held call's status URL leads nowhere)
    assert plan.status_port == cfg.control.listen.port
    assert {cfg.listen.port, cfg.control.listen.port} <= set(plan.protect_ports)
    if cfg.gateway.enabled:
        assert cfg.gateway.listen.port in plan.protect_ports
    # no hole: nothing excluded, DNS pinned to the pod's resolvers, IPv6 covered
    assert (plan.exclude_uids, plan.exclude_ports, plan.exclude_cidrs) == ((), (), ())
    assert params["dns_servers"] == ("auto",) and plan.ipv6 and plan.warnings == ()
    # an init container (run to completion before the agent starts), not a restartable sidecar
    assert init in spec["initContainers"] and "restartPolicy" not in init
    sc = init["securityContext"]
    assert run_as(spec, init) == (0, False)
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    # it reuses the Proctor image, so that image ships the backends (deploy/Dockerfile)
    assert init["image"] == proctor["image"]


def test_transparent_only_the_init_container_is_root_or_privileged():
    _, spec, containers = transparent_pod()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for name, c in containers.items():
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and "privileged" not in sc, name
        if name == "proctor-netsetup":
            continue
        uid, non_root = run_as(spec, c)
        assert uid not in (None, 0) and non_root is not False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
    # the rules are the pod's own: never the node's
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("shareProcessNamespace")


def test_transparent_agent_cannot_be_proctor_nor_undo_the_rules(tmp_path: Path):
    objs, spec, containers = transparent_pod()
    agent = containers["agent"]
    uid, non_root = run_as(spec, agent)
    assert uid not in (None, 0, 1337) and non_root is not False
    # every container running as Proctor's uid is Proctor (its image)
    proctor_image = proctor_container(one(objs, "Deployment"))["image"]
    assert all(c["image"] == proctor_image for c in containers.values() if run_as(spec, c)[0] == 1337)
    sc = agent["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    # no proxy variable (nothing to forget or bypass), in env or in the ConfigMaps it loads
    env = {e["name"]: e.get("value") for e in agent.get("env", [])}
    for source in agent.get("envFrom", []):
        assert set(source) == {"configMapRef"}, source
        env.update(one(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    assert not {n.lower() for n in env} & PROXY_VARS, env
    # only the CA variables, naming the certificate the proctor-ca init container writes
    assert set(env) == CA_VARS
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    (ca_file,) = set(env.values())
    ca_mount = mounts[str(Path(ca_file).parent)]
    assert ca_mount.get("readOnly") is True
    writer = containers["proctor-ca"]
    assert f"/ca/{Path(ca_file).name}" in writer["command"][-1]
    assert {m["name"]: m["mountPath"] for m in writer["volumeMounts"]}[ca_mount["name"]] == "/ca"
    # the agent mounts nothing of Proctor's: not its state (the CA key), config or identity token
    assert {m["name"] for m in agent["volumeMounts"]} == {ca_mount["name"]}


def test_transparent_identity_is_a_projected_token_only_proctor_reads(tmp_path: Path):
    objs, spec, containers = transparent_pod()
    cfg = load_embedded(embedded_config(objs), tmp_path)
    assert spec["automountServiceAccountToken"] is False  # no API token in any container
    assert one(objs, "ServiceAccount", spec["serviceAccountName"])["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    proctor = containers["proctor"]
    token_file = Path(cfg.transparent.token_file)
    (mount,) = [m for m in proctor["volumeMounts"] if token_file.parent == Path(m["mountPath"])]
    assert mount.get("readOnly") is True
    (source,) = volumes[mount["name"]]["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == token_file.name
    assert 600 <= token["expirationSeconds"] <= 24 * 3600  # short-lived, rotated by the kubelet
    # the token is minted for the audience Proctor verifies, from the issuer it trusts
    assert cfg.identity is not None and cfg.dev_issuer_enabled is False
    audiences = [a for i in cfg.identity.issuers for a in ([i.audience] if isinstance(i.audience, str) else i.audience)]
    assert token["audience"] in audiences
    # nobody else mounts it
    assert [n for n, c in containers.items() if mount["name"] in {m["name"] for m in c.get("volumeMounts", [])}] == ["proctor"]
    # the JWKS CA comes from the cluster's kube-root-ca.crt ConfigMap, mounted where the config reads it
    (issuer,) = cfg.identity.issuers
    ca_dir = str(issuer.jwks_ca_file.parent) if issuer.jwks_ca_file else ""
    (ca_mount,) = [m for m in proctor["volumeMounts"] if m["mountPath"] == ca_dir]
    (ca_source,) = volumes[ca_mount["name"]]["projected"]["sources"]
    assert ca_source["configMap"]["name"] == "kube-root-ca.crt"


def test_transparent_config_loads_with_proctors_loader(tmp_path: Path):
    cfg = load_embedded(embedded_config(objects(TRANSPARENT)), tmp_path)
    assert cfg.transparent.enabled is True
    assert cfg.listen.host == "127.0.0.1" and cfg.control.public_url == "http://127.0.0.1:8081"
    # the probes reach the control port; nothing else is exposed
    proctor = proctor_container(one(objects(TRANSPARENT), "Deployment"))
    assert [p["containerPort"] for p in proctor["ports"]] == [cfg.control.listen.port]


def test_the_image_ships_the_packet_filter_tools():
    """The netsetup init container reuses the Proctor image: it must carry iptables and nftables."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    installs = re.findall(r"apt-get install[^\n\\]*(?:\\\n[^\n\\]*)*", text)
    packages = {w for line in installs for w in line.split() if not w.startswith("-")}
    assert {"iptables", "nftables"} <= packages, installs


@pytest.mark.integration
def test_the_init_containers_command_applies_in_a_fresh_namespace(tmp_path: Path):
    """The manifest's exact command, run in a throwaway network namespace (as root, like the
    init container): the redirect for Proctor's uid and port is there afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables-save") is None:
        pytest.skip("needs root, iproute2 and iptables (CI runs as root)")
    _, spec, containers = transparent_pod()
    argv = containers["proctor-netsetup"]["command"]
    name = f"ptk8s{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        done = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "proxy.cli", *argv[1:]],
                              capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert done.returncode == 0, done.stderr
        saved = subprocess.run(["ip", "netns", "exec", name, "iptables-save"], capture_output=True, text=True).stdout
        assert "-A OUTPUT -j PROCTOR_OUTPUT" in saved
        assert "--uid-owner 1337" in saved and "REDIRECT --to-ports 15001" in saved
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


# -------------------------------------------------------------- booting a pod
def ec_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Pod:
    """One container of a manifest's pod, laid out on disk as the kubelet would mount it."""

    def __init__(self, root: Path, objs: list[dict], deployment: dict, secret_values: dict[str, dict[str, bytes]]):
        self.root = root
        self.objs = objs
        self.spec = deployment["spec"]["template"]["spec"]
        self.secrets = secret_values

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def mount(self, container: dict) -> None:
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        for m in container.get("volumeMounts", []):
            target = self.host(m["mountPath"])
            target.mkdir(parents=True, exist_ok=True)
            v = volumes[m["name"]]
            if "configMap" in v:
                for key, text in one(self.objs, "ConfigMap", v["configMap"]["name"])["data"].items():
                    (target / key).write_text(text)
            elif "secret" in v:
                values = self.secrets.get(v["secret"]["secretName"])
                if values is None:
                    assert v["secret"].get("optional"), f"secret {v['secret']['secretName']} is required"
                    continue
                for item in v["secret"]["items"]:
                    f = target / item["path"]
                    f.write_bytes(values[item["key"]])
                    f.chmod(v["secret"]["defaultMode"])
            elif "projected" in v:
                # a projected ServiceAccount token (secrets["serviceAccountToken/<audience>"]) and
                # ConfigMaps, the cluster's own (kube-root-ca.crt: secrets["configMap/<name>"]) included
                for src in v["projected"]["sources"]:
                    if "serviceAccountToken" in src:
                        sa = src["serviceAccountToken"]
                        f = target / sa["path"]
                        f.write_bytes(self.secrets[f"serviceAccountToken/{sa['audience']}"]["token"])
                    else:
                        name = src["configMap"]["name"]
                        found = [o for o in self.objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
                        data = found[0]["data"] if found else {k: b.decode() for k, b in self.secrets[f"configMap/{name}"].items()}
                        for item in src["configMap"]["items"]:
                            f = target / item["path"]
                            f.write_text(data[item["key"]])
                    if "defaultMode" in v["projected"]:
                        f.chmod(v["projected"]["defaultMode"])
            else:
                assert "emptyDir" in v, v

    def env(self, container: dict) -> dict[str, str]:
        out: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e:
                # Kubernetes expands $(NAME) from the variables defined before it
                out[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), m.group(0)), e["value"])
            elif "fieldRef" in e["valueFrom"]:
                assert e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", e
                out[e["name"]] = "127.0.0.1"  # (this machine plays the pod)
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                out[e["name"]] = self.secrets[ref["name"]][ref["key"]].decode()
        return out

    def relocate(self, text: str) -> str:
        """Absolute paths in the pod's file system (at the start of a path) -> this test's directory."""
        return _POD_PATHS.sub(lambda m: str(self.host(m.group(1))), text)


# the mount points the manifests use, where a path starts (not /etc/proctor/ca inside another path)
_POD_PATHS = re.compile(r"(?<![\w./-])(/etc/proctor|/var/lib/proctor|/var/run/secrets/proctor|/ca)(?=/|\b)")


@dataclass
class Booted:
    pod: Pod
    control_url: str
    health: dict
    log: Path


@contextmanager
def boot(tmp_path: Path, folder: Path, secret_values: dict[str, dict[str, bytes]],
         adjust: Callable[[dict], None] | None = None) -> Iterator[Booted]:
    """Mount the Deployment's volumes, run its init containers and its proctor container's args
    (listeners on free loopback ports, paths moved under tmp_path, then `adjust` on the parsed
    config), wait for /readyz; SIGTERM at exit."""
    objs = objects(folder)
    deployment = one(objs, "Deployment")
    pod = Pod(tmp_path / "pod", objs, deployment, secret_values)
    container = proctor_container(deployment)
    for c in [*pod.spec.get("initContainers", []), container]:
        pod.mount(c)
    # the config as mounted, with this test's ports and paths
    cfg_file = next(pod.host(a) for a in container["args"] if a.endswith("proctor.yaml"))
    raw = yaml.safe_load(cfg_file.read_text())
    for section in (raw, raw["control"], raw.get("gateway") or {}):
        if "listen" in section:
            section["listen"] = {"host": "127.0.0.1", "port": free_port()}
    if (raw.get("transparent") or {}).get("enabled"):
        raw["transparent"]["port"] = free_port()
    if adjust is not None:
        adjust(raw)
    cfg_file.write_text(pod.relocate(yaml.safe_dump(raw)))
    control_url = f"http://127.0.0.1:{raw['control']['listen']['port']}"
    cli = [sys.executable, "-m", "proxy.cli"]
    for init in pod.spec.get("initContainers", []):
        if init["command"][:2] == ["proctor", "netsetup"]:
            continue  # the pod's packet filter, not this machine's (run in a namespace by its own test)
        assert init["command"][:2] == ["sh", "-c"] and init["command"][2].startswith("proctor ")
        command = " ".join(cli) + pod.relocate(init["command"][2].removeprefix("proctor"))
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **pod.env(init)})
        assert done.returncode == 0, done.stderr
    log = tmp_path / "proctor.log"
    proc = subprocess.Popen(
        [*cli, *(pod.relocate(a) for a in container["args"])],
        cwd=str(pod.host("/var/lib/proctor")),
        env={**os.environ, **pod.env(container), "PYTHONUNBUFFERED": "1"},
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"proctor exited with {proc.returncode}:\n{log.read_text()}")
            try:
                return httpx.get(f"{control_url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=60, what="the pod's readiness")
        health = httpx.get(f"{control_url}/healthz", timeout=5).json()
        assert health["ready"] is True, health
        assert "proctor_" in httpx.get(f"{control_url}/metrics", timeout=5).text
        # the config names where the control API is reached: no loopback guess
        assert "control.public_url is not set" not in log.read_text()
        yield Booted(pod, control_url, health, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.integration
@pytest.mark.skipif(not PG_DSN, reason="PROCTOR_TEST_POSTGRES_DSN not set (CI sets it)")
def test_a_replica_boots_from_the_manifests(tmp_path: Path):
    schema = "proctor_deploy_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in (PG_DSN or "") else "?"
    ca = trustme.CA()
    secret_values = {
        "proctor-ca": {"tls.crt": ca.cert_pem.bytes(), "tls.key": ca.private_key_pem.bytes()},
        "proctor-store": {"url": f"{PG_DSN}{sep}schema={schema}".encode()},
        "proctor-audit": {"chain-key": secrets.token_hex(32).encode()},
        "proctor-dev-issuer": {"key.pem": ec_key_pem()},
        "proctor-upstream-ticketing": {"username": b"proctor-svc", "password": secrets.token_hex(12).encode()},
    }
    try:
        with boot(tmp_path, REPLICAS, secret_values) as pod:
            assert pod.health["components"]["store"]["backend"] == "postgresql"
            policies = httpx.get(f"{pod.control_url}/v1/policies", timeout=5).json()
            assert policies["policy_count"] == 3  # the policies ConfigMap, not the bundled set
            # the fleet follows the store: this first replica seeded it from the ConfigMap
            fleet = policies["fleet"]
            assert fleet["source"] == "store" and fleet["active_revision"] == policies["active_revision"]
            assert fleet["disagreeing"] == []
    finally:
        async def drop() -> None:
            import asyncpg

            conn = await asyncpg.connect(PG_DSN, timeout=10)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


@pytest.mark.integration
def test_the_sidecar_boots_from_the_manifest(tmp_path: Path):
    with boot(tmp_path, SIDECAR, {}) as pod:
        exported = pod.pod.host("/ca/ca.pem")  # written by the init container for the agent
        cfg = load_config(pod.pod.host("/etc/proctor/proctor.yaml"))
        # the agent trusts the CA this proctor intercepts with
        assert exported.read_bytes() == (cfg.ca_dir / "mitmproxy-ca-cert.pem").read_bytes()


@pytest.mark.integration
def test_the_transparent_sidecar_boots_with_its_workload_identity(tmp_path: Path, idp, pki):
    """The transparent pod's Proctor becomes ready only with a valid workload identity: a token
    shaped like the projected ServiceAccount token (the manifest's issuer and audience) in the
    identity volume, verified against a JWKS served over TLS with the CA from the kube-ca volume."""
    from dataclasses import replace

    from support.jwks_server import JwksServer

    raw = yaml.safe_load(embedded_config(objects(TRANSPARENT)))
    (issuer,) = raw["identity"]["issuers"]
    cluster = replace(idp, issuer=issuer["issuer"], audience=issuer["audience"])
    sub = "system:serviceaccount:agents:support-agent"
    token = cluster.token(sub, ttl=3600, **{"kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "support-agent"}}})
    jwks = JwksServer(pki, json.loads(idp.jwks_path.read_text()))

    def the_test_jwks(cfg: dict) -> None:  # (the cluster's DNS name does not resolve here)
        cfg["identity"]["issuers"][0]["jwks_url"] = jwks.url

    secret_values = {"serviceAccountToken/proctor": {"token": token.encode()},
                     "configMap/kube-root-ca.crt": {"ca.crt": pki.ca_pem.read_bytes()}}
    try:
        with boot(tmp_path, TRANSPARENT, secret_values, the_test_jwks) as pod:
            workload = pod.health["components"]["workload_identity"]
            assert workload["status"] == "ok", workload
            assert workload["agent_id"] == sub and workload["issuer"] == issuer["issuer"]
            assert token not in json.dumps(pod.health) and token not in pod.log.read_text()
            # the agent trusts the CA this proctor intercepts with
            cfg = load_config(pod.pod.host("/etc/proctor/proctor.yaml"))
            assert pod.pod.host("/ca/ca.pem").read_bytes() == (cfg.ca_dir / "mitmproxy-ca-cert.pem").read_bytes()
    finally:
        jwks.stop()
