"""The Cedar schema generated from connector manifests (connectors/schema_gen.py), its use by
the policy loader, `proctor connector schema`, and aggregate body values (sum/min/max/count)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from proxy.config import ProctorConfig
from proxy.connectors.classifier import Classifier
from proxy.connectors.manifest import BodyFieldSpec, ConnectorManifest, ManifestError, load_manifest, load_manifests
from proxy.connectors.schema_gen import declared_in, generate_schema
from proxy.connectors.values import ValueRejected, body_values, with_body_fields
from proxy.policy.engine import PolicyLoadError, PolicySource, load_bundle
from proxy.policy.sources import policy_source

ROOT = Path(__file__).resolve().parent.parent
CONNECTORS = ROOT / "connectors"
POLICIES = ROOT / "policies"
BASE_SCHEMA = POLICIES / "schema.cedarschema"
PO_SRV = "/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV"


def dec(text: str) -> dict:
    return {"__extn": {"fn": "decimal", "arg": text}}


def manifest(name: str, routes: list[dict]) -> ConnectorManifest:
    return ConnectorManifest.model_validate({"name": name, "hosts": [f"{name}.test"], "routes": routes})


@pytest.fixture(scope="module")
def bundled() -> list[ConnectorManifest]:
    return load_manifests(CONNECTORS)


@pytest.fixture(scope="module")
def generated(bundled) -> str:
    return generate_schema(bundled, declared_in(BASE_SCHEMA.read_text()))


def decl(text: str, keyword: str, name: str) -> str:
    """The one generated line declaring `name` (an entity, action or common type)."""
    quoted = f'"{name}"' if keyword == "action" else name
    lines = [ln for ln in text.splitlines() if ln.startswith(f"{keyword} {quoted} ") or ln == f"{keyword} {quoted};"]
    assert len(lines) == 1, f"{keyword} {name}: {lines}"
    return lines[0]


def context_type(text: str, action: str) -> str:
    m = re.search(r"context: (\w+) \};$", decl(text, "action", action))
    assert m, action
    name = m.group(1)
    return name if name == "RequestContext" else decl(text, "type", name)


@pytest.fixture
def pdir(tmp_path) -> Path:
    """A policy directory with the bundled base schema and no policies yet."""
    d = tmp_path / "policies"
    d.mkdir()
    shutil.copy(BASE_SCHEMA, d / "schema.cedarschema")
    return d


def load_with(pdir: Path, policy: str, manifests, schema_extra: str = ""):
    (pdir / "p.cedar").write_text(policy)
    if schema_extra:
        (pdir / "schema.cedarschema").write_text(BASE_SCHEMA.read_text() + "\n" + schema_extra)
    return load_bundle(PolicySource(pdir / "schema.cedarschema", pdir, None, tuple(manifests)))


# ------------------------------------------------------------------ bundled set


def test_bundled_connectors_and_policies_validate(bundled):
    b = load_bundle(PolicySource(BASE_SCHEMA, POLICIES, None, tuple(bundled)))
    ids = set(b.policies)
    assert {"po-over-10k-needs-approval", "no-self-approval", "approvers-release-orders",
            "support-update-own-group-incidents", "no-reassigning-incidents-away", "resolve-needs-close-code",
            "agents-never-close-won", "sales-read-crm"} <= ids
    assert b.policy_count == len(ids) >= 14


def test_bundled_policies_need_the_generated_schema():
    # the hand-written schema alone declares no connector action or resource type
    with pytest.raises(PolicyLoadError) as e:
        load_bundle(PolicySource(BASE_SCHEMA, POLICIES, None, ()))
    assert any("schema validation" in p for p in e.value.problems)


def test_schema_from_connectors_false_turns_generation_off(tmp_path, bundled):
    on = ProctorConfig(state_dir=tmp_path, connectors_dir=CONNECTORS, policies={"dir": POLICIES})
    src = policy_source(on)
    assert {m.name for m in src.manifests} == {"crm", "erp", "llm", "ticketing"}
    load_bundle(src)
    off = ProctorConfig(state_dir=tmp_path, connectors_dir=CONNECTORS,
                        policies={"dir": POLICIES, "schema_from_connectors": False})
    src = policy_source(off)
    assert src.manifests == ()
    with pytest.raises(PolicyLoadError):
        load_bundle(src)


def test_generated_entities(generated):
    # created_by only where a route tracks the creator; lookup attributes join the entity
    assert decl(generated, "entity", "PurchaseOrder") == (
        "entity PurchaseOrder { company_code?: String, created_by?: Agent, currency?: String, "
        "net_amount?: decimal, release_status?: String, supplier?: String };"
    )
    assert decl(generated, "entity", "Incident") == (
        "entity Incident { assignment_group?: String, created_by?: Agent, state?: String, table?: String };"
    )
    assert decl(generated, "entity", "Opportunity") == (
        "entity Opportunity { account_id?: String, amount?: decimal, stage?: String };"
    )
    assert decl(generated, "entity", "Supplier") == "entity Supplier;"
    assert "created_by" not in decl(generated, "entity", "Opportunity")
    # the shared types stay hand-written
    for name in ("Agent", "AgentGroup", "HttpHost"):
        assert not re.search(rf"^entity {name}\b", generated, re.M)
    assert "http.request" not in generated


def test_generated_contexts_required_and_optional(generated):
    create = context_type(generated, "erp.purchase_order.create")
    # required body values (and counts, always present) are required; the rest optional
    assert ("fields: { company_code: String, currency?: String, item_count: Long, materials?: Set<String>, "
            "net_amount?: decimal, prices?: Set<decimal>, quantities?: Set<decimal>, quotation?: String, "
            "requisition?: String, supplier: String }") in create
    assert "params" not in create and "query_params" not in create
    assert "method: String" in create and "source_ip: ipaddr" in create and "time: Time" in create
    approve = context_type(generated, "erp.purchase_order.approve")
    assert approve.endswith("params: { po: String } };") and "fields" not in approve
    assert 'query_params?: { "$top"?: Long }' in context_type(generated, "erp.purchase_order.list")
    assert "query_params: { q: String }" in context_type(generated, "crm.query")
    # PATCH and PUT share ticketing.incident.update: one context type, all body values optional
    update = context_type(generated, "ticketing.incident.update")
    assert "params: { sys_id: String }" in update
    assert "fields?: { assigned_to?: String, assignment_group?: String, close_code?: String, state?: String }" in update
    assert context_type(generated, "crm.account.list") == "RequestContext"
    assert decl(generated, "action", "erp.purchase_order.approve") == (
        'action "erp.purchase_order.approve" appliesTo { principal: Agent, resource: PurchaseOrder, '
        "context: ErpPurchaseOrderApproveContext };"
    )


def test_generated_procure_to_pay_declarations(generated):
    """The bundled ERP's procure-to-pay steps: each names the document it follows, with its
    amounts, and the payment sees the invoice as the ERP has it (lookup) and who entered it."""
    assert decl(generated, "entity", "PurchaseRequisition") == (
        "entity PurchaseRequisition { created_by?: Agent, net_amount?: decimal };")
    assert decl(generated, "entity", "SupplierQuotation") == (
        "entity SupplierQuotation { created_by?: Agent, currency?: String, net_amount?: decimal, "
        "requisition?: String, supplier?: String };")
    assert decl(generated, "entity", "GoodsReceipt") == "entity GoodsReceipt { created_by?: Agent, purchase_order?: String };"
    assert decl(generated, "entity", "SupplierInvoice") == (
        "entity SupplierInvoice { created_by?: Agent, currency?: String, gross_amount?: decimal, "
        "payment_status?: String, purchase_order?: String, supplier?: String };")
    assert ("fields: { item_count: Long, materials?: Set<String>, net_amount?: decimal } };"
            in context_type(generated, "erp.requisition.create"))
    assert ("fields: { currency?: String, item_count: Long, materials?: Set<String>, net_amount?: decimal, "
            "requisition: String, supplier: String } };") in context_type(generated, "erp.quote.create")
    assert ("fields: { item_count: Long, purchase_order: String, purchase_orders?: Set<String>, quantity?: decimal } };"
            in context_type(generated, "erp.goods_receipt.create"))
    assert ("fields: { currency?: String, gross_amount: decimal, purchase_order: String, reference?: String, "
            "supplier?: String } };") in context_type(generated, "erp.invoice.create")
    assert context_type(generated, "erp.payment.create").endswith("params: { invoice: String } };")
    assert decl(generated, "action", "erp.payment.create") == (
        'action "erp.payment.create" appliesTo { principal: Agent, resource: SupplierInvoice, '
        "context: ErpPaymentCreateContext };")
    for action, resource in (("erp.requisition.read", "PurchaseRequisition"), ("erp.quote.read", "SupplierQuotation"),
                             ("erp.goods_receipt.read", "GoodsReceipt"), ("erp.invoice.read", "SupplierInvoice")):
        assert f"resource: {resource}," in decl(generated, "action", action)


def test_every_bundled_action_is_declared_once(generated, bundled):
    actions = {r.action for m in bundled for r in m.routes}
    for a in actions:
        decl(generated, "action", a)
    assert len(re.findall(r"^action ", generated, re.M)) == len(actions)


# ---------------------------------------------------- validation against it


@pytest.mark.parametrize(
    "condition,error",
    [
        # decimal compared as a Long
        ('context.fields has net_amount && context.fields.net_amount > 5', "expected Long but saw decimal"),
        ('context.fields.item_count == "3"', "not compatible"),
        ('context.fields.supplier > 3', "String"),
        ('context.fields.materials == "PAPER"', "not compatible"),
        ('context.fields.no_such_field == "x"', "not found"),
        # optional values need `has`
        ('context.fields.net_amount.greaterThan(decimal("1.0"))', "optional attribute"),
        ('resource.created_by == principal', "optional attribute"),
    ],
)
def test_policy_with_wrong_generated_field_type_fails(pdir, bundled, condition, error):
    policy = ('@id("bad") forbid (principal, action == Action::"erp.purchase_order.create", resource) '
              f"when {{ {condition} }};")
    with pytest.raises(PolicyLoadError) as e:
        load_with(pdir, policy, bundled)
    text = "\n".join(e.value.problems)
    assert "schema validation: policy 'bad'" in text and error in text, text


def test_policy_using_generated_types_correctly_validates(pdir, bundled):
    policy = """
@id("good") forbid (principal, action == Action::"erp.purchase_order.create", resource is PurchaseOrder)
when {
  context.fields.supplier == "17300099" && context.fields.item_count > 20 &&
  context.fields has net_amount && context.fields.net_amount.greaterThan(decimal("1.0")) &&
  context.fields has materials && context.fields.materials.contains("X") && context.risk == "high"
};
@id("good2") forbid (principal, action == Action::"erp.purchase_order.approve", resource is PurchaseOrder)
when { context.params.po like "45*" && resource has created_by && resource.created_by == principal &&
       resource has release_status && resource.release_status == "RELEASED" };
"""
    assert load_with(pdir, policy, bundled).policy_count == 2


def test_hand_declared_entity_overrides_the_generated_one(pdir, bundled):
    extra = "entity PurchaseOrder { approved: Bool, created_by?: Agent };"
    text = generate_schema(bundled, declared_in(BASE_SCHEMA.read_text() + "\n" + extra))
    assert not re.search(r"^entity PurchaseOrder\b", text, re.M)
    assert "entity Incident " in text  # the others are still generated
    policy = ('@id("o") forbid (principal, action == Action::"erp.purchase_order.approve", resource) '
              "when { resource.approved };")
    assert load_with(pdir, policy, bundled, extra).policy_count == 1
    # the generated attributes are gone with it: the hand declaration is the whole type
    policy = ('@id("o") forbid (principal, action == Action::"erp.purchase_order.approve", resource) '
              'when { resource.release_status == "X" };')
    with pytest.raises(PolicyLoadError, match="release_status"):
        load_with(pdir, policy, bundled, extra)


def test_hand_declared_action_overrides_the_generated_one(pdir, bundled):
    extra = ('type MyCreate = { fields: { supplier: String, net_amount: decimal } };\n'
             'action "erp.purchase_order.create" appliesTo { principal: Agent, resource: PurchaseOrder, '
             "context: MyCreate };")
    text = generate_schema(bundled, declared_in(BASE_SCHEMA.read_text() + "\n" + extra))
    assert '"erp.purchase_order.create"' not in text and "ErpPurchaseOrderCreateContext" not in text
    assert '"erp.purchase_order.approve"' in text
    # net_amount is required in the hand-written context: no `has` needed
    policy = ('@id("o") forbid (principal, action == Action::"erp.purchase_order.create", resource) '
              'when { context.fields.net_amount.greaterThan(decimal("1.0")) };')
    assert load_with(pdir, policy, bundled, extra).policy_count == 1


def test_declared_in_reads_names_not_comments():
    d = declared_in(
        '// entity Commented;\n'
        'entity A, "B" in [G] { x: String };\n'
        'action "q.r", s appliesTo { principal: A, resource: A };\n'
        'type T = { entity: String, action: String };\n'
        'type "Quoted" = {};\n'
    )
    assert d.entities == {"A", "B"}
    assert d.actions == {"q.r", "s"}
    assert "T" in d.types and "Commented" not in d.entities


def test_context_type_names_never_collide():
    m = manifest("c", [
        {"method": "GET", "path": "/p", "action": "a.b", "resource": {"type": "P"}, "query": {"z": {"type": "long"}}},
        {"method": "GET", "path": "/q", "action": "a_b", "resource": {"type": "P"}, "query": {"z": {"type": "long"}}},
        {"method": "GET", "path": "/r", "action": "request", "resource": {"type": "P"}, "query": {"z": {"type": "long"}}},
    ])
    text = generate_schema([m], declared_in(BASE_SCHEMA.read_text() + "\ntype ABContext = {};"))
    assert "context: ABContext2 }" in text and "context: ABContext3 }" in text
    assert "type RequestContext2 = " in text and "context: RequestContext2 }" in text
    assert not re.search(r"^type (ABContext|RequestContext) =", text, re.M)
    # and the whole thing is a valid schema
    import cedarpy

    cedarpy.Schema.from_str(BASE_SCHEMA.read_text() + "\ntype ABContext = {};\n" + text)


def test_jsonrpc_and_set_and_multi_resource_actions():
    m = manifest("rpc", [
        {"method": "POST", "path": "/mcp", "jsonrpc": [
            {"method": "tools/list", "action": "t.list", "resource": {"type": "Tool", "id": "*"}},
            {"method": "tools/call", "tool": "x", "action": "t.call", "resource": {"type": "Tool", "id": "{tool}"},
             "body": {"n": {"path": "params.arguments.n", "type": "long", "required": True}}},
        ]},
        {"method": "GET", "path": "/a/{id}", "action": "thing.read", "resource": {"type": "A", "id": "{id}"}},
        {"method": "GET", "path": "/b/{id}", "action": "thing.read", "resource": {"type": "B", "id": "{id}"},
         "params": {"id": {"type": "long"}}},
    ])
    with pytest.raises(ManifestError, match=r"context.params.id is declared with two types \(String and Long\)"):
        generate_schema([m])
    m.routes[2].params.clear()
    text = generate_schema([m])
    assert "rpc: { method: String, tool?: String }" in decl(text, "type", "TListContext")
    assert "fields: { n: Long }" in decl(text, "type", "TCallContext")
    assert "resource: [A, B]" in decl(text, "action", "thing.read")


def test_same_action_on_two_routes_is_optional_where_one_lacks_it():
    m = manifest("s", [
        {"method": "PATCH", "path": "/p/{id}", "action": "p.upd", "resource": {"type": "P", "id": "{id}"},
         "body": {"s": {"path": "s", "type": "string", "required": True}}},
        {"method": "PUT", "path": "/p/{id}", "action": "p.upd", "resource": {"type": "P", "id": "{id}"},
         "body": {"s": {"path": "s", "type": "string", "required": True}, "t": {"path": "t", "type": "long"}}},
        {"method": "POST", "path": "/p/{id}", "action": "p.upd", "resource": {"type": "P", "id": "{id}"}},
    ])
    ctx = decl(generate_schema([m]), "type", "PUpdContext")
    # one route sends no fields at all: fields itself is optional; `s` is required whenever present
    assert "params: { id: String }" in ctx and "fields?: { s?: String, t?: Long }" in ctx
    m.routes.pop()
    ctx = decl(generate_schema([m]), "type", "PUpdContext")
    assert "fields: { s: String, t?: Long }" in ctx


# ------------------------------------------------------- conflicts are errors


def test_conflicting_attribute_types_across_connectors(pdir):
    a = manifest("a", [{"method": "GET", "path": "/o/{id}", "action": "x.o.read", "resource": {"type": "Order", "id": "{id}"},
                        "params": {"id": {"type": "long"}}, "resource_attributes": ["id"]}])
    b = manifest("b", [{"method": "GET", "path": "/o/{id}", "action": "y.o.read", "resource": {"type": "Order", "id": "{id}"},
                        "resource_attributes": ["id"]}])
    with pytest.raises(ManifestError) as e:
        generate_schema([a, b])
    msg = str(e.value)
    assert "resource type Order" in msg and "'id' is Long in a GET /o/{id} but String in b GET /o/{id}" in msg
    # the policy loader reports it (and refuses the bundle) instead of crashing
    (pdir / "p.cedar").write_text('@id("p") permit (principal, action, resource);')
    with pytest.raises(PolicyLoadError) as e:
        load_bundle(PolicySource(pdir / "schema.cedarschema", pdir, None, (a, b)))
    assert any(p.startswith("schema from connectors: resource type Order") for p in e.value.problems)


def test_conflicting_static_attributes_and_lookup_types():
    static = manifest("e", [
        {"method": "GET", "path": "/p/{id}", "action": "p.r", "resource": {"type": "P", "id": "{id}"}, "attributes": {"k": "x"}},
        {"method": "GET", "path": "/q/{id}", "action": "p.r2", "resource": {"type": "P", "id": "{id}"}, "attributes": {"k": 5}},
    ])
    with pytest.raises(ManifestError, match="attribute 'k' is String .* but Long"):
        generate_schema([static])
    lookup = manifest("f", [
        {"method": "POST", "path": "/p", "action": "p.c", "resource": {"type": "P", "id": "new"},
         "body": {"amt": {"path": "a", "type": "long"}}, "resource_attributes": ["amt"]},
        {"method": "POST", "path": "/p/{id}/go", "action": "p.go", "resource": {"type": "P", "id": "{id}"},
         "lookup": {"path": "/p/{id}", "attributes": {"amt": {"path": "a", "type": "decimal"}}}},
    ])
    with pytest.raises(ManifestError, match="'amt' is Long in f POST /p but decimal in f POST /p/{id}/go lookup"):
        generate_schema([lookup])


def test_conflicting_context_types_for_one_action():
    m = manifest("d", [
        {"method": "PATCH", "path": "/p/{id}", "action": "p.upd", "resource": {"type": "P", "id": "{id}"},
         "body": {"s": {"path": "s", "type": "string"}}},
        {"method": "PUT", "path": "/p/{id}", "action": "p.upd", "resource": {"type": "P", "id": "{id}"},
         "body": {"s": {"path": "s", "type": "long"}}},
    ])
    with pytest.raises(ManifestError, match=r"action p.upd: context.fields.s is declared with two types \(String and Long\)"):
        generate_schema([m])


def test_json_schema_file_with_generation_is_a_clear_error(tmp_path, bundled):
    d = tmp_path / "p"
    d.mkdir()
    (d / "schema.json").write_text("{}")
    (d / "p.cedar").write_text('@id("p") permit (principal, action, resource);')
    with pytest.raises(PolicyLoadError, match="needs a human-format .cedarschema"):
        load_bundle(PolicySource(d / "schema.json", d, None, tuple(bundled)))


def test_duplicate_connector_names_are_refused(tmp_path):
    for f in ("erp.yaml", "crm.yaml"):
        shutil.copy(CONNECTORS / f, tmp_path / f)
    raw = yaml.safe_load((CONNECTORS / "erp.yaml").read_text())
    raw["hosts"] = ["other.example.com"]
    (tmp_path / "erp2.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError, match=r"duplicate connector names: \['erp'\]"):
        load_manifests(tmp_path)


# ------------------------------------------------------------------------ CLI


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=str(cwd) if cwd else None)


def test_cli_connector_schema_prints_the_declarations(bundled, tmp_path):
    out = run_cli("connector", "schema", cwd=tmp_path)  # no config: the bundled connectors, schema and workflow
    assert out.returncode == 0, out.stderr
    from proxy.workflows.spec import load_workflows

    actions = load_workflows(ROOT / "workflows", bundled).actions  # their contexts carry `workflow`
    assert "erp.purchase_order.create" in actions
    assert out.stdout == generate_schema(bundled, declared_in(BASE_SCHEMA.read_text()), workflow_actions=actions)
    assert out.stdout.startswith("// Generated from the connector manifests")


def test_cli_connector_schema_with_config_override_and_error(tmp_path):
    conns = tmp_path / "connectors"
    conns.mkdir()
    shutil.copy(CONNECTORS / "erp.yaml", conns / "erp.yaml")
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "schema.cedarschema").write_text(BASE_SCHEMA.read_text() + "\nentity Supplier { name: String };\n")
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": "state", "connectors_dir": "connectors", "policies": {"dir": "policies"}}))
    out = run_cli("connector", "schema", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "entity PurchaseOrder {" in out.stdout and not re.search(r"^entity Supplier\b", out.stdout, re.M)
    assert "entity SupplierInvoice {" in out.stdout  # (generated: not the declared Supplier)
    assert '"erp.supplier.read"' in out.stdout and "crm." not in out.stdout and "ticketing." not in out.stdout
    # a manifest conflict: exit 2 and the message
    raw = yaml.safe_load((CONNECTORS / "erp.yaml").read_text())
    raw["name"] = "erp2"
    raw["hosts"] = ["erp2.example.com"]
    po_read = next(r for r in raw["routes"] if r["action"] == "erp.purchase_order.read")
    po_read["attributes"] = {"net_amount": 5}  # Long here, decimal elsewhere
    (conns / "erp2.yaml").write_text(yaml.safe_dump(raw))
    out = run_cli("connector", "schema", "-c", str(cfg))
    assert out.returncode == 2
    assert "error: resource type PurchaseOrder" in out.stderr and "net_amount" in out.stderr


# ------------------------------------------------------------ aggregate values


NET = BodyFieldSpec(path="to_PurchaseOrderItem[*].NetPriceAmount", weight="OrderQuantity", aggregate="sum", type="decimal")
COUNT = BodyFieldSpec(path="to_PurchaseOrderItem[*]", aggregate="count", type="long")


def items(*pairs) -> dict:
    return {"to_PurchaseOrderItem": [{"OrderQuantity": q, "NetPriceAmount": p} for q, p in pairs]}


def test_weighted_sum_and_count():
    doc = items(("10", "120.50"), (2, 99.99))
    assert body_values({"net": NET, "n": COUNT}, doc) == {"net": dec("1404.98"), "n": 2}
    assert body_values({"net": NET}, items((3, 1), (1, "0.5"))) == {"net": dec("3.5")}
    assert body_values({"net": NET}, items((1, 10000))) == {"net": dec("10000.0")}


def test_weighted_sum_rounds_half_up_to_four_places():
    assert body_values({"net": NET}, items(("0.5", "0.3333"))) == {"net": dec("0.1667")}  # 0.16665
    assert body_values({"net": NET}, items(("0.5", "0.0001"))) == {"net": dec("0.0001")}  # 0.00005
    credit = NET.model_copy(update={"min": -1})  # a manifest that allows credit lines
    assert body_values({"net": credit}, items(("0.5", "-0.0001"))) == {"net": dec("-0.0001")}  # away from zero
    assert body_values({"net": NET}, items(("0.3333", "0.3333"))) == {"net": dec("0.1111")}  # 0.11108889


def test_min_max_and_long_sums():
    s = lambda agg, t: BodyFieldSpec(path="a[*].p", aggregate=agg, type=t, min=-10)
    doc = {"a": [{"p": 3}, {"p": "9.5"}, {"p": -1.25}]}
    assert body_values({"x": s("min", "decimal")}, doc) == {"x": dec("-1.25")}
    assert body_values({"x": s("max", "decimal")}, doc) == {"x": dec("9.5")}
    assert body_values({"x": s("sum", "long")}, {"a": [{"p": 1}, {"p": "2"}, {"p": 3}]}) == {"x": 6}
    # nested [*]: the last one picks the elements
    nested = BodyFieldSpec(path="o[*].i[*].p", aggregate="sum", type="long")
    assert body_values({"x": nested}, {"o": [{"i": [{"p": 1}, {"p": 2}]}, {"i": [{"p": 3}]}]}) == {"x": 6}
    # null elements are skipped, as for sets
    assert body_values({"x": BodyFieldSpec(path="a[*]", aggregate="max", type="long")}, {"a": [3, None, 9, 1]}) == {"x": 9}


def test_negative_elements_and_weights_are_refused_unless_the_manifest_allows_them():
    """A negative line must not offset an order's total below an approval threshold."""
    with pytest.raises(ValueRejected, match="element 1 must be at least 0"):
        body_values({"net": NET}, items(("10", "5000"), ("1", "-4000")))
    with pytest.raises(ValueRejected, match="OrderQuantity must be at least 0"):
        body_values({"net": NET}, items(("10", "5000"), ("-8", "1000")))
    allowed = NET.model_copy(update={"min": -10000, "weight_min": -100})
    assert body_values({"net": allowed}, items(("10", "5000"), ("-8", "1000"))) == {"net": dec("42000.0")}
    # explicit bounds apply to decimals and longs alike, outside aggregates too
    bounded = BodyFieldSpec(path="amount", type="decimal", min=1, max="99.5")
    assert body_values({"a": bounded}, {"amount": "99.5"}) == {"a": dec("99.5")}
    for bad in ("0.5", "99.6"):
        with pytest.raises(ValueRejected, match="must be at"):
            body_values({"a": bounded}, {"amount": bad})


def test_decimal_strings_are_plain_digits():
    spec = BodyFieldSpec(path="amount", type="decimal")
    for bad in ("1_000", "1e3", "NaN", " 5", "٥", "Infinity", "0x10"):
        with pytest.raises(ValueRejected):
            body_values({"a": spec}, {"amount": bad})


def test_a_name_in_another_case_is_refused_in_what_agents_send():
    spec = {"stage": BodyFieldSpec(path="StageName", type="string")}
    with pytest.raises(ValueRejected, match="another case"):
        body_values(spec, {"stagename": "Closed Won"})
    with pytest.raises(ValueRejected, match="another case"):
        body_values({"net": NET}, {"to_purchaseorderitem": [{"OrderQuantity": "1", "NetPriceAmount": "1"}]})
    assert body_values(spec, {"stagename": "x"}, agent_supplied=False) == {}  # the upstream's own data: as is
    assert body_values(spec, {"Other": "x"}) == {}


def test_empty_aggregates():
    assert body_values({"net": NET, "n": COUNT}, {"to_PurchaseOrderItem": []}) == {"n": 0}  # no sum of nothing
    assert body_values({"n": COUNT}, {"to_PurchaseOrderItem": None}) == {"n": 0}  # null is absent
    # an object (or a scalar) where the array belongs is refused, never read as "no items":
    # PHP, Rack and qs iterate {"0": {...}} / items[a][sku] as if it were the array
    for shape in ("not a list", {"results": [{"OrderQuantity": "3", "NetPriceAmount": "5000"}]},
                  {"0": {"OrderQuantity": "3", "NetPriceAmount": "5000"}}):
        with pytest.raises(ValueRejected, match="expected an array"):
            body_values({"net": NET, "n": COUNT}, {"to_PurchaseOrderItem": shape})
    assert body_values({"net": NET, "n": COUNT}, None) == {"n": 0}
    required = BodyFieldSpec(path="a[*].p", aggregate="sum", type="decimal", required=True)
    with pytest.raises(ValueRejected, match="is required"):
        body_values({"x": required}, {"a": []})
    with pytest.raises(ValueRejected, match="is required"):
        body_values({"x": BodyFieldSpec(path="a[*]", aggregate="count", type="long", required=True)}, {"a": []})


@pytest.mark.parametrize("doc", [{}, {"Supplier": "17300001"}, [1, 2]])
def test_aggregate_when_the_array_is_absent(doc):
    assert body_values({"net": NET, "n": COUNT}, doc) == {"n": 0}


@pytest.mark.parametrize(
    "spec,doc,match",
    [
        (NET, items((1, "abc")), "element 0 must be a decimal"),
        (NET, items((1, True)), "element 0 must be a decimal"),
        (NET, items((1, {"v": 1})), "element 0 must be a decimal"),
        (NET, items(("x", 1)), "element 0 OrderQuantity must be a decimal"),
        (NET, items((1, "1.00001")), "more than 4 decimal places"),
        (NET, {"to_PurchaseOrderItem": [{"OrderQuantity": 1}]}, "element 0 has no value"),
        (NET, {"to_PurchaseOrderItem": [{"NetPriceAmount": 1}]}, "element 0 has no OrderQuantity"),
        (NET, items((1, "922337203685477.5807"), (1, 1)), "out of range for a Cedar decimal"),
        (BodyFieldSpec(path="a[*]", aggregate="sum", type="long"), {"a": [1, 1.5]}, "element 1 must be an integer"),
        (BodyFieldSpec(path="a[*]", aggregate="sum", type="long"), {"a": [2**62, 2**62]}, "out of range for a Cedar Long"),
        (BodyFieldSpec(path="a[*].p", weight="q", aggregate="sum", type="long"), {"a": [{"p": 1, "q": "0.5"}]}, "not an integer"),
    ],
)
def test_wrong_aggregate_values_are_rejected(spec, doc, match):
    with pytest.raises(ValueRejected, match=match):
        body_values({"x": spec}, doc)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(path="a.p", aggregate="sum", type="decimal"), "aggregate needs a \\[\\*\\] path"),
        (dict(path="a[*].p", weight="q", type="decimal"), "weight needs aggregate: sum"),
        (dict(path="a[*].p", weight="q", aggregate="max", type="decimal"), "weight is only meaningful with aggregate: sum"),
        (dict(path="a[*]", aggregate="count", type="decimal"), "count gives a long"),
        (dict(path="a[*]", aggregate="count", type="string"), "count gives a long"),
        (dict(path="a[*]", aggregate="sum", type="string"), "sum needs type long or decimal"),
        (dict(path="a[*]", aggregate="min", type="bool"), "min needs type long or decimal"),
        (dict(path="a[*].p", weight="q[*]", aggregate="sum", type="decimal"), "a dotted field path inside each element"),
        (dict(path="a[*]", aggregate="avg", type="decimal"), "'sum', 'min', 'max' or 'count'"),
    ],
)
def test_aggregate_manifest_validation(kw, match):
    with pytest.raises(ValidationError, match=match):
        BodyFieldSpec(**kw)


def test_aggregate_manifest_error_names_the_file(tmp_path):
    raw = yaml.safe_load((CONNECTORS / "erp.yaml").read_text())
    create = next(r for r in raw["routes"] if r["action"] == "erp.purchase_order.create")
    create["body"]["item_count"]["type"] = "decimal"
    (tmp_path / "erp.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError, match=r"erp.yaml: invalid connector manifest(.|\n)*count gives a long"):
        load_manifest(tmp_path / "erp.yaml")


def test_bundled_erp_create_and_release_lookup():
    erp = load_manifest(CONNECTORS / "erp.yaml")
    clf = Classifier([erp])
    c = clf.classify("POST", "127.0.0.1", 9103, f"{PO_SRV}/A_PurchaseOrder")
    body = {"Supplier": "17300001", "CompanyCode": "1010", "DocumentCurrency": "EUR",
            "to_PurchaseOrderItem": [{"Material": "A", "OrderQuantity": "10", "NetPriceAmount": "120.50"},
                                     {"Material": "B", "OrderQuantity": 2, "NetPriceAmount": 99.99}]}
    c = with_body_fields(c, body)
    assert c.fields == {"supplier": "17300001", "company_code": "1010", "currency": "EUR",
                        "net_amount": dec("1404.98"), "item_count": 2, "materials": ["A", "B"],
                        # the lines' quantities and prices (the dedupe key), in item order, canonical
                        "quantities": [dec("10.0"), dec("2.0")], "prices": [dec("120.5"), dec("99.99")]}
    # item_count, materials, quantities and prices stay in the context only
    assert c.resource_attrs == {"supplier": "17300001", "company_code": "1010", "currency": "EUR",
                                "net_amount": dec("1404.98")}
    # the release lookup reads the ERP's own answer shape (OData V2, expanded items)
    release = next(r for r in erp.routes if r.action == "erp.purchase_order.approve")
    answer = {"d": {"Supplier": "17300001", "DocumentCurrency": "EUR", "ReleaseStatus": "NOT_RELEASED",
                    "to_PurchaseOrderItem": {"results": [{"OrderQuantity": "50", "NetPriceAmount": "4.20"}]}}}
    assert body_values(release.lookup.attributes, answer) == {
        "supplier": "17300001", "currency": "EUR", "net_amount": dec("210.0"), "release_status": "NOT_RELEASED"}


# Regression: resource_entity() once ran to_cedar() over typed manifest values, which
# drops '__extn' keys, so a decimal resource attribute reached Cedar as an empty record.
def test_typed_decimal_resource_attribute_reaches_cedar_as_decimal(pdir, bundled):
    from proxy.core.context import resource_entity
    from proxy.policy.engine import PolicyStore

    c = Classifier(bundled).classify("POST", "127.0.0.1", 9103, f"{PO_SRV}/A_PurchaseOrder")
    c = with_body_fields(c, {"Supplier": "17300001", "CompanyCode": "1010",
                             "to_PurchaseOrderItem": [{"OrderQuantity": 2, "NetPriceAmount": "9000"}]})
    assert c.resource_attrs["net_amount"] == dec("18000.0")
    resource = resource_entity(c)
    (pdir / "p.cedar").write_text(
        '@id("permit") permit (principal, action, resource);\n'
        '@id("big") forbid (principal, action == Action::"erp.purchase_order.create", resource is PurchaseOrder) '
        'when { resource has net_amount && resource.net_amount.greaterThan(decimal("10000.0")) };')
    store = PolicyStore(PolicySource(pdir / "schema.cedarschema", pdir, None, tuple(bundled)))
    principal = {"uid": {"type": "Agent", "id": "a"}, "attrs": {}, "parents": []}
    ctx = {"method": "POST", "path": "/", "query": "", "host": "h", "port": 1, "headers": {}, "connector": "erp",
           "risk": "high", "mode": "forward", "fields": c.fields,
           "time": {"now": {"__extn": {"fn": "datetime", "arg": "2026-01-01T00:00:00Z"}}, "epoch": 1, "hour": 0, "weekday": 1},
           "source_ip": {"__extn": {"fn": "ip", "arg": "127.0.0.1"}}}
    result = store.authorize(principal, "erp.purchase_order.create", resource, ctx, [principal, resource])
    assert result.errors == [] and result.reasons == ["big"]
    assert resource["attrs"]["net_amount"] == dec("18000.0")
