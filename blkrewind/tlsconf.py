"""TLS for shipping: certificate generation, SSL contexts, peer identity, address policy.

A TLS directory made by `blkrewind tls init DIR --hosts NAME[=IP[+IP...]],...`:

    DIR/ca.pem, DIR/ca-key.pem (0600)      the CA; its key never leaves DIR
    DIR/NAME/ca.pem, cert.pem, key.pem     one per host: copy DIR/NAME to that host

`serve --tls` and `trace --tls` take a host directory (ca.pem, cert.pem, key.pem). The host's
name is the certificate's CN; its SANs are DNS:NAME and IP:each IP given. TLS 1.3 only, both
sides authenticated by the CA (docs/protocol.md, "Roles and identities").

Every problem with a TLS directory is a one-line UserError.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
import socket
import ssl
import tempfile
from pathlib import Path

from blkrewind.errors import UserError
from blkrewind.osutil import fsync_dir as _fsync_dir

CA_DAYS = 3650    # 10 years
HOST_DAYS = 730   # 2 years
SKEW = _dt.timedelta(minutes=5)  # certificates are valid from a little before "now"

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
HOST_FILES = ("ca.pem", "cert.pem", "key.pem")

# a host name: DNS-like labels; never ':' (device keys are host:name) nor '/'
_NAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_RESERVED = {CA_CERT, CA_KEY}

# addresses `--insecure` may use: loopback, RFC 1918, RFC 4193, link-local
_PRIVATE_NETS = [ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10")]


# --------------------------------------------------------------------------- host specs
def parse_host_spec(spec: str) -> tuple[str, list[str]]:
    """'NAME[=IP[+IP...]]' -> (NAME, [IP, ...]) with the IPs normalised."""
    spec = spec.strip()
    name, _, ips = spec.partition("=")
    if not _NAME_RE.match(name) or name in _RESERVED:
        raise UserError(f"bad host name {name!r} in {spec!r}: use letters, digits, '-' and '.' "
                        f"(a DNS name)")
    out: list[str] = []
    if _:
        for ip in ips.split("+"):
            try:
                a = ipaddress.ip_address(ip.strip().strip("[]"))
            except ValueError:
                raise UserError(f"bad IP address {ip!r} in host spec {spec!r}") from None
            if str(a) not in out:
                out.append(str(a))
    return name, out


# --------------------------------------------------------------------------- generation
def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - a dependency in pyproject.toml
        raise UserError("the Python package 'cryptography' is missing (pip install cryptography)") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a new file atomically with the given mode (never briefly more open)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _key_pem(key) -> bytes:
    _, _, serialization, *_ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    _, _, serialization, *_ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_ca(label: str):
    x509, hashes, _, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"blkrewind CA {label}"[:64])])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW)
            .not_valid_after(now + _dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_host_cert(ca_key, ca_cert, name: str, ips: list[str], *, days: int = HOST_DAYS,
                   not_before: _dt.datetime | None = None, key=None):
    """A host certificate (CN=name, SAN DNS:name + IP:ips) signed by the CA: (key, cert).
    Used by init(); tests use not_before/days to make expired certificates."""
    x509, hashes, _, ec, EKU, NameOID = _crypto()
    key = key or ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - SKEW)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    sans = [x509.DNSName(name)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH, EKU.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _sans(cert) -> tuple[list[str], list[str]]:
    x509, *_ = _crypto()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (san.get_values_for_type(x509.DNSName),
            [str(a) for a in san.get_values_for_type(x509.IPAddress)])


def init(dir, hosts: list[str]) -> list[str]:
    """Make (or extend) a TLS directory: a CA in DIR and, per host spec NAME[=IP[+IP...]],
    DIR/NAME/{ca.pem,cert.pem,key.pem}. Returns the names of the hosts created.

    An existing CA is never replaced: re-running with more hosts signs the new hosts with it.
    A host already present with the same SANs is left as it is; with other SANs it is an error
    (remove DIR/NAME to re-issue it). Nothing new to do at all is an error too."""
    x509, _, serialization, *_ = _crypto()
    d = Path(dir)
    specs: dict[str, list[str]] = {}
    for h in hosts:
        if not h.strip():
            continue
        name, ips = parse_host_spec(h)
        if name in specs:
            raise UserError(f"host {name!r} is given twice")
        specs[name] = ips
    if not specs:
        raise UserError("no hosts given (--hosts NAME[=IP[+IP...]],...)")

    if d.exists() and not d.is_dir():
        raise UserError(f"{d} exists and is not a directory")
    ca_cert_p, ca_key_p = d / CA_CERT, d / CA_KEY
    if d.is_dir() and ca_cert_p.exists():
        if not ca_key_p.exists():
            raise UserError(f"{d} has {CA_CERT} but not {CA_KEY}: cannot sign new hosts "
                            f"(the CA key stays in the directory made by `tls init`)")
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_cert_p.read_bytes())
            ca_key = serialization.load_pem_private_key(ca_key_p.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"cannot load the CA in {d}: {_one_line(e)}") from None
        if _pub(ca_key.public_key()) != _pub(ca_cert.public_key()):
            raise UserError(f"{ca_key_p} does not match {ca_cert_p}")
        created_ca = False
    else:
        if d.is_dir() and any(p.name not in specs for p in d.iterdir()):
            raise UserError(f"{d} exists, is not empty and holds no CA ({CA_CERT}): "
                            f"choose a new directory")
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        ca_key, ca_cert = _make_ca(d.resolve().name or "root")
        _write(ca_key_p, _key_pem(ca_key), 0o600)
        _write(ca_cert_p, _cert_pem(ca_cert), 0o644)
        created_ca = True

    new: list[str] = []
    for name, ips in specs.items():
        hd = d / name
        if (hd / "cert.pem").exists():
            try:
                old = x509.load_pem_x509_certificate((hd / "cert.pem").read_bytes())
            except (OSError, ValueError) as e:
                raise UserError(f"{hd / 'cert.pem'}: {_one_line(e)}") from None
            dns, old_ips = _sans(old)
            if dns != [name] or sorted(old_ips) != sorted(ips):
                raise UserError(f"host {name} already exists in {d} with other addresses "
                                f"({', '.join(old_ips) or 'none'}); remove {hd} to re-issue it")
            continue
        if hd.exists() and any(hd.iterdir()):
            raise UserError(f"{hd} exists without a cert.pem: remove it first")
        key, cert = make_host_cert(ca_key, ca_cert, name, ips)
        tmp = Path(tempfile.mkdtemp(dir=d, prefix=f".{name}."))
        try:
            _write(tmp / "key.pem", _key_pem(key), 0o600)
            _write(tmp / "cert.pem", _cert_pem(cert), 0o644)
            _write(tmp / "ca.pem", _cert_pem(ca_cert), 0o644)
            os.chmod(tmp, 0o700)
            if hd.exists():
                hd.rmdir()
            os.rename(tmp, hd)
        except BaseException:
            for p in tmp.glob("*"):
                p.unlink()
            tmp.rmdir()
            raise
        new.append(name)
    if not new and not created_ca:
        raise UserError(f"{d} already holds a CA and certificates for {', '.join(specs)}: "
                        f"nothing to add (remove DIR/NAME to re-issue a host)")
    _fsync_dir(d)
    return new


def _pub(public_key) -> bytes:
    _, _, serialization, *_ = _crypto()
    return public_key.public_bytes(serialization.Encoding.DER,
                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _one_line(e: BaseException) -> str:
    s = str(e) or type(e).__name__
    return " ".join(s.split())


# --------------------------------------------------------------------------- checking a host dir
def check_dir(tls_dir) -> tuple[Path, Path, Path]:
    """Check a --tls DIR (ca.pem, cert.pem, key.pem): present, readable, key private to its
    owner, cert signed by ca.pem, valid now, key matching cert. Returns the three paths."""
    x509, _, serialization, *_ = _crypto()
    d = Path(tls_dir)
    if not d.is_dir():
        raise UserError(f"--tls {d}: no such directory (make one with `blkrewind tls init`)")
    paths = tuple(d / n for n in HOST_FILES)
    for p in paths:
        if not p.is_file():
            hint = " (that is the CA directory; use DIR/HOSTNAME)" if (d / CA_KEY).exists() else ""
            raise UserError(f"--tls {d}: {p.name} is missing{hint}")
    ca_p, cert_p, key_p = paths

    def load(p: Path) -> bytes:
        try:
            return p.read_bytes()
        except OSError as e:
            raise UserError(f"--tls {d}: cannot read {p.name}: {e.strerror}") from None

    try:
        ca = x509.load_pem_x509_certificate(load(ca_p))
    except ValueError as e:
        raise UserError(f"--tls {d}: ca.pem is not a PEM certificate: {_one_line(e)}") from None
    try:
        cert = x509.load_pem_x509_certificate(load(cert_p))
    except ValueError as e:
        raise UserError(f"--tls {d}: cert.pem is not a PEM certificate: {_one_line(e)}") from None
    st = key_p.stat()
    if st.st_mode & 0o077:
        raise UserError(f"--tls {d}: key.pem is accessible by group/others "
                        f"(mode {st.st_mode & 0o777:o}); chmod 600 {key_p}")
    try:
        key = serialization.load_pem_private_key(load(key_p), password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"--tls {d}: key.pem is not an unencrypted PEM private key: "
                        f"{_one_line(e)}") from None
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise UserError(f"--tls {d}: ca.pem is not a CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as e:  # ValueError (issuer name), InvalidSignature (no message), TypeError
        raise UserError(f"--tls {d}: cert.pem is not signed by ca.pem "
                        f"({_one_line(e)})") from None
    now = _now()
    for what, c in (("ca.pem", ca), ("cert.pem", cert)):
        if now < c.not_valid_before_utc:
            raise UserError(f"--tls {d}: {what} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if now > c.not_valid_after_utc:
            raise UserError(f"--tls {d}: {what} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if _pub(key.public_key()) != _pub(cert.public_key()):
        raise UserError(f"--tls {d}: key.pem does not match cert.pem")
    if not _cn(cert):
        raise UserError(f"--tls {d}: cert.pem has no common name (CN)")
    return ca_p, cert_p, key_p


def _cn(cert) -> str:
    x509, *_, NameOID = _crypto()
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _context(purpose_server: bool, tls_dir) -> ssl.SSLContext:
    ca_p, cert_p, key_p = check_dir(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose_server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not purpose_server:
        ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cafile=str(ca_p))
        ctx.load_cert_chain(certfile=str(cert_p), keyfile=str(key_p))
    except ssl.SSLError as e:
        raise UserError(f"--tls {tls_dir}: {_one_line(e)}") from None
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def server_context(tls_dir) -> ssl.SSLContext:
    """TLS 1.3 server context: our cert.pem/key.pem; clients must present a certificate
    signed by ca.pem (CERT_REQUIRED)."""
    return _context(True, tls_dir)


def client_context(tls_dir) -> ssl.SSLContext:
    """TLS 1.3 client context: our cert.pem/key.pem as the client certificate; the server must
    present a certificate signed by ca.pem that is valid for the name/IP dialled (pass it as
    server_hostname to wrap_socket)."""
    return _context(False, tls_dir)


def peer_host(sslsock) -> str:
    """The host name (CN) of the peer's verified certificate."""
    cert = sslsock.getpeercert()
    if not cert:
        raise UserError("the peer presented no verified certificate")
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName" and v:
                return v
    raise UserError("the peer's certificate has no common name (CN)")


def own_host(tls_dir) -> str:
    """The CN of DIR/cert.pem: this host's name under TLS."""
    x509, *_ = _crypto()
    p = Path(tls_dir) / "cert.pem"
    try:
        cert = x509.load_pem_x509_certificate(p.read_bytes())
    except OSError as e:
        raise UserError(f"--tls {tls_dir}: cannot read cert.pem: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"--tls {tls_dir}: cert.pem is not a PEM certificate: {_one_line(e)}") from None
    cn = _cn(cert)
    if not cn:
        raise UserError(f"--tls {tls_dir}: cert.pem has no common name (CN)")
    return cn


# --------------------------------------------------------------------------- addresses
def parse_addr(s: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    s = (s or "").strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1:].startswith(":"):
            raise UserError(f"bad address {s!r}: expected [IPv6]:PORT")
        host, port = s[1:end], s[end + 2:]
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise UserError(f"bad address {s!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = s.rpartition(":")
        if not sep or not host:
            raise UserError(f"bad address {s!r}: expected HOST:PORT (or [IPv6]:PORT)")
        if ":" in host:
            raise UserError(f"bad address {s!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"bad address {s!r}: port must be 1..65535")
    if not host or any(c.isspace() or c in "/[]@" for c in host):
        raise UserError(f"bad address {s!r}: bad host {host!r}")
    return host, int(port)


def _allowed(ip: ipaddress._BaseAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in _PRIVATE_NETS)


def check_insecure_addr(host: str) -> None:
    """Refuse (UserError) an address for --insecure unless every address it resolves to is
    loopback, RFC 1918, RFC 4193 or link-local."""
    h = host.strip("[]")
    try:
        ips = [ipaddress.ip_address(h.split("%")[0])]
    except ValueError:
        try:
            infos = socket.getaddrinfo(h, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as e:
            raise UserError(f"--insecure: cannot resolve {host!r}: {_one_line(e)}") from None
        ips = [ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos]
        if not ips:
            raise UserError(f"--insecure: {host!r} resolves to no address")
    bad = [str(i) for i in ips if not _allowed(i)]
    if bad:
        raise UserError(f"--insecure refused for {host} ({', '.join(sorted(set(bad)))}): without "
                        f"TLS only loopback, private (RFC 1918/4193) or link-local addresses; "
                        f"use --tls DIR")
