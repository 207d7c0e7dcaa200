"""blkrewind/tlsconf.py and `blkrewind tls init`: real certificates, real TLS 1.3 handshakes
over 127.0.0.1 with mutual authentication, and the refusals that matter (wrong CA, no client
certificate, a certificate for another name, an expired certificate, bad --tls directories)."""
from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blkrewind import tlsconf
from blkrewind.errors import UserError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """One CA with a replayer valid for 127.0.0.1 and ::1, and two tracer hosts."""
    d = tmp_path_factory.mktemp("pki") / "tls"
    made = tlsconf.init(d, ["replayer=127.0.0.1+::1", "hosta", "hostb=10.213.0.2"])
    assert made == ["replayer", "hosta", "hostb"]
    return d


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki2") / "tls"
    tlsconf.init(d, ["replayer=127.0.0.1", "hosta"])
    return d


class Result:
    def __init__(self):
        self.peer = None
        self.version = None
        self.data = None
        self.error: BaseException | None = None


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, dial="127.0.0.1",
              family=socket.AF_INET) -> tuple[Result, Result]:
    """One real TCP connection on the loopback: the server accepts, reads a line and echoes it;
    the client sends b'hello\\n' and reads the echo. Returns (server result, client result)."""
    srv, cli = Result(), Result()
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.bind((dial, 0))
    lsock.listen(1)
    lsock.settimeout(10)
    port = lsock.getsockname()[1]

    def serve():
        try:
            conn, _ = lsock.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                srv.version = s.version()
                srv.peer = tlsconf.peer_host(s)
                srv.data = s.recv(100)
                s.sendall(srv.data)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            srv.error = e

    th = threading.Thread(target=serve)
    th.start()
    try:
        with socket.create_connection((dial, port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=dial) as s:
                cli.version = s.version()
                cli.peer = tlsconf.peer_host(s)
                s.sendall(b"hello\n")
                cli.data = s.recv(100)
                if not cli.data:
                    raise ConnectionError("the server closed the connection")
    except BaseException as e:  # noqa: BLE001
        cli.error = e
    finally:
        th.join(15)
        lsock.close()
    assert not th.is_alive()
    return srv, cli


def test_mutual_tls13_handshake(pki):
    srv, cli = handshake(tlsconf.server_context(pki / "replayer"),
                         tlsconf.client_context(pki / "hosta"))
    assert srv.error is None and cli.error is None, (srv.error, cli.error)
    assert srv.version == cli.version == "TLSv1.3"
    assert srv.peer == "hosta" and cli.peer == "replayer"   # each side knows who the other is
    assert srv.data == cli.data == b"hello\n"
    assert tlsconf.own_host(pki / "hosta") == "hosta"
    assert tlsconf.own_host(pki / "replayer") == "replayer"


def test_ipv6_loopback_handshake(pki):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("::1 not configured")
    srv, cli = handshake(tlsconf.server_context(pki / "replayer"),
                         tlsconf.client_context(pki / "hostb"), dial="::1", family=socket.AF_INET6)
    assert srv.error is None and cli.error is None, (srv.error, cli.error)
    assert srv.peer == "hostb"


def test_contexts_are_tls13_only_and_require_certificates(pki):
    s = tlsconf.server_context(pki / "replayer")
    c = tlsconf.client_context(pki / "hosta")
    assert s.minimum_version == c.minimum_version == ssl.TLSVersion.TLSv1_3
    assert s.verify_mode == c.verify_mode == ssl.CERT_REQUIRED
    assert c.check_hostname


def test_tls12_client_is_refused(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.load_cert_chain(pki / "hosta" / "cert.pem", pki / "hosta" / "key.pem")
    srv, cli = handshake(tlsconf.server_context(pki / "replayer"), ctx)
    assert isinstance(srv.error, ssl.SSLError) and cli.error is not None
    assert srv.peer is None


def test_client_of_another_ca_is_refused(pki, other_pki):
    # the client trusts our CA (so it would accept the server) but holds a cert of another CA
    ctx = tlsconf.client_context(other_pki / "hosta")
    ctx.load_verify_locations(pki / "ca.pem")
    srv, cli = handshake(tlsconf.server_context(pki / "replayer"), ctx)
    assert isinstance(srv.error, ssl.SSLError), srv.error
    assert "certificate" in str(srv.error).lower()
    assert cli.error is not None and srv.peer is None and srv.data is None


def test_server_of_another_ca_is_refused(pki, other_pki):
    srv, cli = handshake(tlsconf.server_context(other_pki / "replayer"),
                         tlsconf.client_context(pki / "hosta"))
    assert isinstance(cli.error, ssl.SSLCertVerificationError), cli.error
    assert cli.peer is None and srv.data is None


def test_client_without_certificate_is_refused(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki / "ca.pem")
    srv, cli = handshake(tlsconf.server_context(pki / "replayer"), ctx)
    assert isinstance(srv.error, ssl.SSLError), srv.error
    assert "certificate" in str(srv.error).lower()
    # TLS 1.3: the client learns it on its first read; it never gets the echo
    assert cli.error is not None and cli.data is None and srv.data is None


def test_server_certificate_for_another_name_is_refused(pki):
    # hosta's certificate is signed by the right CA but valid only for DNS:hosta:
    # a tracer dialling 127.0.0.1 must refuse it
    srv, cli = handshake(tlsconf.server_context(pki / "hosta"),
                         tlsconf.client_context(pki / "hostb"))
    assert isinstance(cli.error, ssl.SSLCertVerificationError), cli.error
    assert "mismatch" in str(cli.error).lower() or "match" in str(cli.error).lower()
    assert srv.data is None


def _write_host(d: Path, key, cert, ca_pem: bytes) -> Path:
    d.mkdir(mode=0o700)
    (d / "ca.pem").write_bytes(ca_pem)
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp = d / "key.pem"
    kp.touch(mode=0o600)
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return d


def _ca(pki):
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), None)
    return ca_key, ca_cert


def test_expired_certificates_are_refused(pki, tmp_path):
    ca_key, ca_cert = _ca(pki)
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    key, cert = tlsconf.make_host_cert(ca_key, ca_cert, "old", [], not_before=long_ago, days=2)
    old = _write_host(tmp_path / "old", key, cert, (pki / "ca.pem").read_bytes())
    with pytest.raises(UserError, match="cert.pem expired on"):
        tlsconf.client_context(old)
    # and the peer refuses it at the handshake too (not only our pre-check): a client context
    # made by hand around the expired certificate
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.load_cert_chain(old / "cert.pem", old / "key.pem")
    srv, cli = handshake(tlsconf.server_context(pki / "replayer"), ctx)
    assert isinstance(srv.error, ssl.SSLError) and "expired" in str(srv.error).lower(), srv.error
    assert srv.data is None and cli.error is not None
    # an expired server certificate (valid for 127.0.0.1) is refused by the tracer
    key, cert = tlsconf.make_host_cert(ca_key, ca_cert, "oldsrv", ["127.0.0.1"],
                                       not_before=long_ago, days=2)
    olds = _write_host(tmp_path / "oldsrv", key, cert, (pki / "ca.pem").read_bytes())
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(olds / "cert.pem", olds / "key.pem")
    srv, cli = handshake(sctx, tlsconf.client_context(pki / "hosta"))
    assert isinstance(cli.error, ssl.SSLCertVerificationError) and "expired" in str(cli.error)


def test_init_permissions_and_layout(pki):
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    assert stat.S_IMODE((pki / "ca-key.pem").stat().st_mode) == 0o600
    for h in ("replayer", "hosta", "hostb"):
        hd = pki / h
        assert sorted(p.name for p in hd.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
        assert stat.S_IMODE((hd / "key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE(hd.stat().st_mode) == 0o700
        assert (hd / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
        cert = x509.load_pem_x509_certificate((hd / "cert.pem").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN={h}"
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == tlsconf.HOST_DAYS
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= tlsconf.CA_DAYS
    san = x509.load_pem_x509_certificate((pki / "replayer" / "cert.pem").read_bytes()) \
        .extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["replayer"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    # no host directory holds the CA key
    assert not list(pki.glob("*/ca-key.pem"))


def test_rerun_adds_hosts_with_the_same_ca(tmp_path):
    d = tmp_path / "tls"
    r = run_cli("tls", "init", d, "--hosts", "replayer=127.0.0.1,a")
    assert r.stdout.split() == [f"{d}/replayer", f"{d}/a"]
    ca_before = (d / "ca.pem").read_bytes()
    key_before = (d / "ca-key.pem").read_bytes()
    a_before = (d / "a" / "cert.pem").read_bytes()
    r = run_cli("tls", "init", d, "--hosts", "a,b=10.1.2.3")
    assert r.stdout.split() == [f"{d}/b"]
    assert (d / "ca.pem").read_bytes() == ca_before and (d / "ca-key.pem").read_bytes() == key_before
    assert (d / "a" / "cert.pem").read_bytes() == a_before
    # the new host works against the old replayer
    srv, cli = handshake(tlsconf.server_context(d / "replayer"), tlsconf.client_context(d / "b"))
    assert srv.error is None and cli.error is None and srv.peer == "b"
    # nothing new: refused, nothing changed
    assert_one_line_error(run_cli("tls", "init", d, "--hosts", "a,b=10.1.2.3", check=False),
                          "nothing to add")
    # the same name with other addresses: refused
    assert_one_line_error(run_cli("tls", "init", d, "--hosts", "b=10.1.2.4", check=False),
                          "already exists")
    assert (d / "ca.pem").read_bytes() == ca_before
    assert sorted(p.name for p in d.iterdir()) == ["a", "b", "ca-key.pem", "ca.pem", "replayer"]


@pytest.mark.parametrize("hosts,words", [
    ("bad:name", "bad host name"),
    ("a/b", "bad host name"),
    ("ca.pem", "bad host name"),
    ("x=1.2.3", "bad IP address"),
    ("x=", "bad IP address"),
    ("x=1.2.3.4+", "bad IP address"),
    ("a,a", "given twice"),
    (",", "no hosts"),
])
def test_init_bad_host_specs(tmp_path, hosts, words):
    cp = run_cli("tls", "init", tmp_path / "tls", "--hosts", hosts, check=False)
    assert_one_line_error(cp, words)
    assert not (tmp_path / "tls" / "ca.pem").exists()


def test_init_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "something").write_text("mine")
    assert_one_line_error(run_cli("tls", "init", tmp_path / "x", "--hosts", "a", check=False),
                          "not empty")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["something"]


@pytest.fixture
def hostdir(pki, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(pki / "hosta", d)
    return d


def _bad(d, *words):
    for make in (tlsconf.server_context, tlsconf.client_context):
        with pytest.raises(UserError) as ei:
            make(d)
        msg = str(ei.value)
        assert "\n" not in msg
        for w in words:
            assert w in msg, msg


def test_bad_tls_dirs(pki, other_pki, hostdir, tmp_path):
    _bad(tmp_path / "nope", "no such directory")
    _bad(pki, "cert.pem is missing", "CA directory")
    for name in ("ca.pem", "cert.pem", "key.pem"):
        d = tmp_path / f"missing-{name}"
        shutil.copytree(hostdir, d)
        (d / name).unlink()
        _bad(d, f"{name} is missing")
    # unreadable / garbage key
    d = tmp_path / "garbage"
    shutil.copytree(hostdir, d)
    (d / "key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    _bad(d, "key.pem is not")
    # key readable by others
    d = tmp_path / "open"
    shutil.copytree(hostdir, d)
    os.chmod(d / "key.pem", 0o644)
    _bad(d, "key.pem is accessible", "chmod 600")
    # a cert signed by another CA (with its own key, matching)
    d = tmp_path / "foreign"
    shutil.copytree(hostdir, d)
    shutil.copy(other_pki / "hosta" / "cert.pem", d / "cert.pem")
    shutil.copy(other_pki / "hosta" / "key.pem", d / "key.pem")
    _bad(d, "not signed by ca.pem")
    # key of another host
    d = tmp_path / "mismatch"
    shutil.copytree(hostdir, d)
    shutil.copy(pki / "hostb" / "key.pem", d / "key.pem")
    _bad(d, "key.pem does not match cert.pem")
    # a host cert given as the CA
    d = tmp_path / "notca"
    shutil.copytree(hostdir, d)
    shutil.copy(d / "cert.pem", d / "ca.pem")
    _bad(d, "not a CA")
    # garbage cert
    d = tmp_path / "garbagecert"
    shutil.copytree(hostdir, d)
    (d / "cert.pem").write_text("hello")
    _bad(d, "cert.pem is not a PEM certificate")
    # the good copy still works
    tlsconf.client_context(hostdir)


def test_own_host_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read cert.pem"):
        tlsconf.own_host(tmp_path)


@pytest.mark.parametrize("s,want", [
    ("127.0.0.1:7000", ("127.0.0.1", 7000)),
    ("replayer.example:1", ("replayer.example", 1)),
    ("[::1]:65535", ("::1", 65535)),
    ("[fe80::1%eth0]:7000", ("fe80::1%eth0", 7000)),
    ("localhost:7000", ("localhost", 7000)),
])
def test_parse_addr(s, want):
    assert tlsconf.parse_addr(s) == want


@pytest.mark.parametrize("s", ["", "host", "host:", ":7000", "host:0", "host:65536", "host:x",
                               "::1:7000", "[::1]7000", "[nothost]:7000", "[::1", "a b:1",
                               "host:-1"])
def test_parse_addr_bad(s):
    with pytest.raises(UserError) as ei:
        tlsconf.parse_addr(s)
    assert "\n" not in str(ei.value) and "bad address" in str(ei.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "localhost", "10.1.2.3",
                                  "172.16.0.1", "172.31.255.254", "192.168.1.1", "169.254.3.4",
                                  "::1", "fd00::5", "fc12::1", "fe80::1", "::ffff:192.168.1.1",
                                  "[::1]"])
def test_insecure_allowed(host):
    tlsconf.check_insecure_addr(host)


@pytest.mark.parametrize("host", ["8.8.8.8", "172.32.0.1", "100.64.0.1", "0.0.0.0", "::",
                                  "2001:db8::1", "::ffff:8.8.8.8", "192.0.2.1"])
def test_insecure_refused(host):
    with pytest.raises(UserError, match="--insecure refused"):
        tlsconf.check_insecure_addr(host)


def test_insecure_unresolvable():
    with pytest.raises(UserError, match="cannot resolve"):
        tlsconf.check_insecure_addr("no-such-host.invalid")
