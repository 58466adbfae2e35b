"""Shared identity material (issue 15 item 2): replicas with their own state directories
present one configured interception CA and verify each other's dev issuer tokens.

Integration tests run real `proctor run` processes and real clients (requests, curl, a raw
CONNECT + TLS handshake to read the leaf certificate); the unit tests check the loaders'
refusals and that no key material ever reaches a message.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from conftest import basic_proxy_auth, free_port
from proxy.ca import export_ca_pem, load_configured_ca, prepare_ca
from proxy.config import CaConfig, ConfigError, DevIssuerConfig, ProctorConfig, load_config
from proxy.identity.dev_issuer import DevIssuer
from proxy.keymaterial import KeyMaterialError

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


# ------------------------------------------------------------------ material
def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cn: str = "Acme Proxy CA", *, key=None, is_ca: bool = True, not_before=None, not_after=None,
            issuer: tuple[x509.Certificate, object] | None = None) -> tuple[x509.Certificate, object]:
    """A certificate for `key` (new RSA-2048 by default), self-signed or issued by `issuer`."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer_cert.subject if issuer_cert else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before or NOW - DAY).not_valid_after(not_after or NOW + 365 * DAY)
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if is_ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    return b.sign(issuer_key, hashes.SHA256()), key


@dataclass
class Material:
    cert: x509.Certificate
    cert_pem: bytes
    cert_file: Path
    key_pem: bytes
    key_file: Path
    dev_key_pem: bytes
    dev_key_file: Path

    def key_secrets(self) -> list[str]:
        """Lines of base64 of both private keys: none may appear in any output."""
        lines = []
        for pem in (self.key_pem, self.dev_key_pem):
            lines += [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]
        return lines


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Material:
    d = tmp_path_factory.mktemp("shared-identity")
    cert, key = make_ca()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    dev_key = ec.generate_private_key(ec.SECP256R1())
    return Material(
        cert, cert_pem, write(d / "ca.crt", cert_pem, 0o644),
        # 0644, as a Kubernetes secret volume mounts it by default: a warning, not a refusal
        _key_pem(key), write(d / "ca.key", _key_pem(key), 0o644),
        _key_pem(dev_key), write(d / "dev-issuer.key", _key_pem(dev_key)),
    )


def assert_no_key_material(text: str, material: Material) -> None:
    assert "PRIVATE KEY" not in text
    for line in material.key_secrets():
        assert line not in text


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def leaf_through_connect(proxy_port: int, agent: str, token: str, host: str, port: int, cafile: Path) -> x509.Certificate:
    """CONNECT through the proxy and complete a TLS handshake that verifies against `cafile`
    only; return the certificate the proxy presented."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as raw:
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Proxy-Authorization: {basic_proxy_auth(agent, token)}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            assert chunk, f"proxy closed the CONNECT: {head!r}"
            head += chunk
        assert head.split(b"\r\n")[0].split()[1] == b"200", head
        ctx = ssl.create_default_context(cafile=str(cafile))
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der)


def leaf_of_listener(port: int, host: str, cafile: Path) -> x509.Certificate:
    """The certificate a TLS listener (the gateway) presents, verified against `cafile`."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der)


# ------------------------------------------------------------ two replicas
@pytest.mark.integration
def test_two_replicas_present_one_configured_ca_and_share_the_dev_issuer(
    proctor_factory, shared, upstream, upstream_tls, tmp_path
):
    # Replica A reads files; replica B gets the same CA from environment variables (the CA
    # certificate as PEM, its key base64-encoded, as secret injectors often do) and serves its
    # gateway with the aiohttp engine. Each has its own state directory.
    a = proctor_factory({
        "ca": {"cert_file": str(shared.cert_file), "key_file": str(shared.key_file)},
        "dev_issuer": {"key_file": str(shared.dev_key_file)},
    }, name="a")
    b = proctor_factory({
        "ca": {"cert_env": "TEST_PROCTOR_CA_CERT", "key_env": "TEST_PROCTOR_CA_KEY"},
        "dev_issuer": {"key_file": str(shared.dev_key_file)},
        "gateway": {"engine": "aiohttp"},
    }, name="b", env={"TEST_PROCTOR_CA_CERT": shared.cert_pem.decode(),
                      "TEST_PROCTOR_CA_KEY": base64.b64encode(shared.key_pem).decode()})
    replicas = {"a": a, "b": b}
    ca_file = shared.cert_file

    for name, p in replicas.items():
        # no CA of its own: nothing generated in <state_dir>/ca; the configured one laid out 0600
        assert not (p.dir / "state" / "ca").exists(), name
        confdir = p.dir / "state" / "ca-configured"
        assert (confdir / "mitmproxy-ca.pem").stat().st_mode & 0o777 == 0o600
        assert (confdir / "mitmproxy-ca-cert.pem").read_bytes() == shared.cert_pem
        log = p.log()
        assert "interception CA from ca.cert" in log and "CN=Acme Proxy CA" in log, log
        assert_no_key_material(log, shared)
        # the CLI prints the configured CA, checked, for both replicas' configs
        env = {"TEST_PROCTOR_CA_CERT": shared.cert_pem.decode(),
               "TEST_PROCTOR_CA_KEY": base64.b64encode(shared.key_pem).decode()}
        out = cli("ca", "export", "-c", str(p.config_path), env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.encode() == shared.cert_pem
        out = cli("ca", "export", str(tmp_path / f"{name}.pem"), "-c", str(p.config_path), env=env)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / f"{name}.pem").read_bytes() == shared.cert_pem
    # the permissive key file is named in a warning (A reads it; B's key came from a variable)
    assert "ca.key_file" in a.log() and "readable by group or others (mode 0644)" in a.log()
    assert "readable by group or others" not in b.log()
    assert "dev_issuer.key_file" not in a.log()  # 0600: no warning

    # the dev issuer publishes one key under one id on both replicas
    jwks = {n: json.loads((p.dir / "state" / "dev-issuer-configured" / "jwks.json").read_text())
            for n, p in replicas.items()}
    assert jwks["a"] == jwks["b"]
    kid = jwks["a"]["keys"][0]["kid"]
    assert kid.startswith("dev-")

    for issuing, serving in (("a", "b"), ("b", "a")):
        token = replicas[issuing].dev_token(f"bot-{issuing}", groups=["readers"])
        assert jwt.get_unverified_header(token)["kid"] == kid
        p = replicas[serving]
        # HTTPS through the forward proxy (CONNECT + interception), trusting only the configured CA
        upstream_tls.clear()
        r = requests.get(f"https://localhost:{upstream_tls.port}/items/7", timeout=15, verify=str(ca_file),
                         proxies={"https": p.proxy_url_with(f"bot-{issuing}", token)})
        assert r.status_code == 200, r.text
        assert p.decision(r.headers["x-proctor-decision-id"])["issuer"] == "proctor-dev"
        assert upstream_tls.last()["path"] == "/items/7"
        leaf = leaf_through_connect(p.port, f"bot-{issuing}", token, "localhost", upstream_tls.port, ca_file)
        assert leaf.issuer == shared.cert.subject
        leaf.verify_directly_issued_by(shared.cert)
        assert x509.DNSName("localhost") in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    # curl, configured only by environment variables, like an unmodified agent
    token = a.dev_token("curl-bot")
    for p in replicas.values():
        url = p.proxy_url_with("curl-bot", token)
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        env.update(https_proxy=url, HTTPS_PROXY=url, CURL_CA_BUNDLE=str(ca_file))
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                              f"https://localhost:{upstream_tls.port}/items/3"], env=env, capture_output=True, text=True)
        assert out.stdout == "200", out.stderr

    # the gateway listener's TLS, on both engines (A: mitmproxy, B: aiohttp), from the same CA
    for p in replicas.values():
        leaf = leaf_of_listener(p.gateway_port, "localhost", ca_file)
        leaf.verify_directly_issued_by(shared.cert)
        r = requests.get(f"https://localhost:{p.gateway_port}/svc/items/5", verify=str(ca_file), timeout=15,
                         headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text


# ------------------------------------------------------------ refusals at startup
def _bad_inputs(d: Path, shared: Material) -> dict[str, tuple[dict, dict, list[str]]]:
    """name -> (ca section, environment, words the refusal must contain)."""
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf, leaf_key = make_ca("not a ca", is_ca=False)
    expired, expired_key = make_ca("old", not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    pem = serialization.Encoding.PEM
    files = {
        "other.key": write(d / "other.key", _key_pem(other_key)),
        "leaf.crt": write(d / "leaf.crt", leaf.public_bytes(pem)),
        "leaf.key": write(d / "leaf.key", _key_pem(leaf_key)),
        "expired.crt": write(d / "expired.crt", expired.public_bytes(pem)),
        "expired.key": write(d / "expired.key", _key_pem(expired_key)),
        "swapped.key": write(d / "swapped.key", shared.cert_pem),
    }
    crt, key = str(shared.cert_file), str(shared.key_file)
    return {
        "not-a-ca": ({"cert_file": str(files["leaf.crt"]), "key_file": str(files["leaf.key"])}, {},
                     ["ca.cert_file", "leaf.crt", "not a CA certificate", "CA:TRUE"]),
        "mismatched-key": ({"cert_file": crt, "key_file": str(files["other.key"])}, {},
                           ["ca.key_file", "other.key", "does not match the CA certificate", "ca.crt"]),
        "missing-key-file": ({"cert_file": crt, "key_file": str(d / "nowhere.key")}, {},
                             ["ca.key_file", "nowhere.key", "does not exist"]),
        "missing-cert-file": ({"cert_file": str(d / "nowhere.crt"), "key_file": key}, {},
                              ["ca.cert_file", "nowhere.crt", "does not exist"]),
        "expired": ({"cert_file": str(files["expired.crt"]), "key_file": str(files["expired.key"])}, {},
                    ["ca.cert_file", "expired.crt", "expired on"]),
        "certificate-as-key": ({"cert_file": crt, "key_file": str(files["swapped.key"])}, {},
                               ["ca.key_file", "no readable PEM private key", "is this the certificate file?"]),
        "unset-variable": ({"cert_file": crt, "key_env": "TEST_PROCTOR_UNSET_CA_KEY"}, {},
                           ["ca.key_env", "TEST_PROCTOR_UNSET_CA_KEY", "not set"]),
        "variable-not-pem": ({"cert_file": crt, "key_env": "TEST_PROCTOR_CA_KEY"},
                             {"TEST_PROCTOR_CA_KEY": "not a key"}, ["ca.key_env", "neither PEM nor base64"]),
    }


@pytest.mark.integration
def test_bad_ca_material_refuses_to_start_with_a_clear_message(shared, tmp_path):
    for name, (section, env, words) in _bad_inputs(tmp_path, shared).items():
        d = tmp_path / name
        d.mkdir()
        cfg = {"state_dir": "state", "listen": {"port": free_port()}, "control": {"listen": {"port": free_port()}},
               "ca": section}
        (d / "proctor.yaml").write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, **env)
        env.pop("TEST_PROCTOR_UNSET_CA_KEY", None)
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(d / "proctor.yaml")],
                             capture_output=True, text=True, timeout=60, env=env, cwd=d)
        text = out.stdout + out.stderr
        assert out.returncode == 1, (name, text)
        assert "cannot start" in text, (name, text)
        for w in words:
            assert w in text, (name, w, text)
        assert "Traceback" not in text, (name, text)
        assert_no_key_material(text, shared)
        assert not (d / "state" / "ca-configured").exists() and not (d / "state" / "ca").exists(), name
        # `proctor ca export` refuses the same material with the same message
        exp = subprocess.run([sys.executable, "-m", "proxy.cli", "ca", "export", "-c", str(d / "proctor.yaml")],
                             capture_output=True, text=True, timeout=60, env=env)
        assert exp.returncode == 1 and exp.stdout == "", (name, exp)
        assert words[-1] in exp.stderr, (name, exp.stderr)
        assert_no_key_material(exp.stderr, shared)


def test_half_a_ca_section_is_a_config_error(tmp_path, shared):
    for section, words in (
        ({"cert_file": str(shared.cert_file)}, "set both the certificate"),
        ({"key_env": "X"}, "set both the certificate"),
        ({"cert_file": "a.crt", "cert_env": "X", "key_file": "a.key"}, "set one of cert_file or cert_env"),
    ):
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"ca": section}))
        with pytest.raises(ConfigError, match=words):
            load_config(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"dev_issuer": {"key_file": "k", "key_env": "K"}}))
    with pytest.raises(ConfigError, match="set key_file or key_env, not both"):
        load_config(tmp_path / "p.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "ca": {"cert_file": "secrets/ca.crt", "key_file": "secrets/ca.key"},
        "dev_issuer": {"key_file": "secrets/dev.key"},
    }))
    c = load_config(tmp_path / "p.yaml")
    assert c.ca is not None and c.ca.cert_file == tmp_path / "secrets" / "ca.crt"
    assert c.ca.key_file == tmp_path / "secrets" / "ca.key"
    assert c.dev_issuer.key_file == tmp_path / "secrets" / "dev.key"
    assert c.ca_dir == tmp_path / ".proctor" / "ca-configured"
    assert c.dev_issuer_dir == tmp_path / ".proctor" / "dev-issuer-configured"


# ------------------------------------------------------------ the loaders
def test_loader_refusals_never_quote_the_key(tmp_path, shared):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "encrypted": (write(tmp_path / "enc.key", other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"))), "is encrypted"),
        "garbage": (write(tmp_path / "garbage.key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
                    "no readable PEM private key"),
        "directory": (tmp_path, "not a regular file"),
    }
    for name, (path, words) in cases.items():
        with pytest.raises(KeyMaterialError, match=words) as e:
            load_configured_ca(CaConfig(cert_file=shared.cert_file, key_file=path))
        assert_no_key_material(str(e.value), shared)
        # no parser error (which may quote its input) chained into what a traceback would show
        assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__), name


def test_not_yet_valid_and_no_cert_sign(tmp_path):
    future, fkey = make_ca("later", not_before=NOW + DAY, not_after=NOW + 30 * DAY)
    with pytest.raises(KeyMaterialError, match="not valid before"):
        load_configured_ca(CaConfig(cert_file=write(tmp_path / "f.crt", future.public_bytes(serialization.Encoding.PEM)),
                                    key_file=write(tmp_path / "f.key", _key_pem(fkey))))
    # a CA whose keyUsage forbids signing certificates
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-sign")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY * 90)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    with pytest.raises(KeyMaterialError, match="lacks keyCertSign"):
        load_configured_ca(CaConfig(cert_file=write(tmp_path / "n.crt", cert.public_bytes(serialization.Encoding.PEM)),
                                    key_file=write(tmp_path / "n.key", _key_pem(key))))


def test_ed25519_ca_key_is_refused(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - DAY).not_valid_after(NOW + 90 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, None))
    with pytest.raises(KeyMaterialError, match="must be RSA or EC"):
        load_configured_ca(CaConfig(cert_file=write(tmp_path / "e.crt", cert.public_bytes(serialization.Encoding.PEM)),
                                    key_file=write(tmp_path / "e.key", _key_pem(key))))


def test_intermediate_ca_with_chain_and_ec_key_signs_leaves(tmp_path):
    """An EC intermediate issued by an offline root: the cert file carries intermediate + root,
    leaves verify against the root alone, and the export carries both certificates."""
    root, root_key = make_ca("Acme Root")
    inter, inter_key = make_ca("Acme Proxy Intermediate", key=ec.generate_private_key(ec.SECP256R1()),
                               issuer=(root, root_key))
    pem = serialization.Encoding.PEM
    state = tmp_path / "state"
    config = ProctorConfig(state_dir=state, ca=CaConfig(
        cert_file=write(tmp_path / "chain.crt", inter.public_bytes(pem) + root.public_bytes(pem)),
        key_file=write(tmp_path / "inter.key", _key_pem(inter_key))))
    path = prepare_ca(config)
    assert path == state / "ca-configured" / "mitmproxy-ca-cert.pem"
    assert export_ca_pem(config) == inter.public_bytes(pem) + root.public_bytes(pem)

    from proxy.engine.gateway_tls import ListenerCertificates

    server_ctx = ListenerCertificates(config.ca_dir).for_address("127.0.0.1")
    client_ctx = ssl.create_default_context(cafile=str(write(tmp_path / "root.crt", root.public_bytes(pem))))
    # a handshake over memory BIOs: the gateway listener's context against a client trusting the root only
    cin, cout, sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(cin, cout, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(sin, sout, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        sin.write(cout.read())
        cin.write(sout.read())
    client.do_handshake()
    leaf = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
    leaf.verify_directly_issued_by(inter)


def test_expiry_soon_is_a_warning(tmp_path, caplog):
    cert, key = make_ca("short-lived", not_after=NOW + 10 * DAY)
    with caplog.at_level(logging.WARNING, logger="proctor.ca"):
        ca = load_configured_ca(CaConfig(cert_file=write(tmp_path / "s.crt", cert.public_bytes(serialization.Encoding.PEM)),
                                         key_file=write(tmp_path / "s.key", _key_pem(key))))
    assert ca.cert == cert
    assert "expires on" in caplog.text and "s.crt" in caplog.text


def test_dev_issuer_key_is_shared_and_checked(tmp_path, shared):
    cfg = DevIssuerConfig(key_file=shared.dev_key_file)
    one, two = DevIssuer(tmp_path / "r1", cfg), DevIssuer(tmp_path / "r2", cfg)
    one.ensure()
    two.ensure()
    assert (tmp_path / "r1" / "jwks.json").read_text() == (tmp_path / "r2" / "jwks.json").read_text()
    assert not (tmp_path / "r1" / "key.pem").exists()  # the key is never copied
    token = one.issue("bot", {"groups": ["x"]})
    jwk = json.loads((tmp_path / "r2" / "jwks.json").read_text())["keys"][0]
    claims = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience="proctor")
    assert claims["sub"] == "bot" and jwt.get_unverified_header(token)["kid"] == jwk["kid"]

    # the same key from a variable (base64 PEM) gives the same key id
    env = {"TEST_DEV_KEY": base64.b64encode(shared.dev_key_pem).decode()}
    os.environ.update(env)
    try:
        three = DevIssuer(tmp_path / "r3", DevIssuerConfig(key_env="TEST_DEV_KEY"))
        three.ensure()
        assert json.loads((tmp_path / "r3" / "jwks.json").read_text())["keys"][0]["kid"] == jwk["kid"]
    finally:
        del os.environ["TEST_DEV_KEY"]

    # only an EC P-256 key can sign ES256
    for key in (rsa.generate_private_key(public_exponent=65537, key_size=2048), ec.generate_private_key(ec.SECP384R1())):
        bad = write(tmp_path / "bad.key", _key_pem(key))
        with pytest.raises(KeyMaterialError, match="needs an EC P-256 key") as e:
            DevIssuer(tmp_path / "r4", DevIssuerConfig(key_file=bad)).issue("bot")
        assert "PRIVATE KEY" not in str(e.value)


@pytest.mark.integration
def test_token_issue_with_a_bad_dev_issuer_key_fails_clearly(tmp_path, shared):
    rsa_key = write(tmp_path / "rsa.key", _key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"dev_issuer": {"key_file": str(rsa_key)}}))
    out = cli("token", "issue", "--agent", "bot", "-c", str(tmp_path / "p.yaml"))
    assert out.returncode == 1 and out.stdout == ""
    assert "dev_issuer.key_file" in out.stderr and "needs an EC P-256 key" in out.stderr
    assert "PRIVATE KEY" not in out.stderr
