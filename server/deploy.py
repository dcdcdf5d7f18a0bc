"""``fedmutual-deploy``: certificates, node keys and secure-by-default Flower processes.

Flower provides the processes (SuperLink, SuperNode); this CLI gives them fedmutual's
defaults: TLS and SuperNode authentication on, runtime dependency installation off, state
in a database so registrations survive a restart, absolute paths everywhere. ``--insecure``
exists for the loopback demo only.

    fedmutual-deploy certs DIR --host 127.0.0.1 --host server.example.org
    fedmutual-deploy node-key DIR node1
    fedmutual-deploy superlink --certs DIR --state DIR [--port 9092]
    fedmutual-deploy connection NAME HOST:PORT --ca DIR/ca.crt
    fedmutual-deploy register NAME DIR/node1.pub
    fedmutual-deploy supernode --superlink HOST:PORT --ca ca.crt --key node1 --port 9094 \\
        --node-config 'data-path="/data/mine.npz" state-dir="/var/lib/fedmutual"'
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shutil
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certs(out: Path, hosts: Sequence[str], days: int = 365) -> dict[str, Path]:
    """A CA and a server certificate for ``hosts`` (IPs and DNS names in the SAN).

    Writes ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` (keys mode 0600). The CA
    key signs nothing else: keep it off the server if you can. Refuses to overwrite.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    paths = {n: out / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmutual CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    san = []
    for h in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            san.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    out.mkdir(parents=True, exist_ok=True)
    paths["ca.crt"].write_bytes(ca.public_bytes(pem))
    paths["server.crt"].write_bytes(cert.public_bytes(pem))
    for name, k in (("ca.key", ca_key), ("server.key", key)):
        _write_private(paths[name], k.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return paths


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair: ECDSA P-384 in OpenSSH format (as Flower reads
    it). The private key ``NAME`` stays on the node; ``NAME.pub`` is registered."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv, pub = out / name, out / f"{name}.pub"
    if priv.exists() or pub.exists():
        raise FileExistsError(f"refusing to overwrite {priv} / {pub}")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def flwr_home() -> Path:
    """Flower's config folder: ``$FLWR_HOME``, else ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser().resolve()


def write_connection(name: str, address: str, ca: Path | None, insecure: bool = False,
                     make_default: bool = False) -> Path:
    """Add or replace ``[superlink.NAME]`` in Flower's ``config.toml`` (other entries kept)."""
    import tomli_w

    path = flwr_home() / "config.toml"
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if insecure:
        entry["insecure"] = True
    else:
        if ca is None or not ca.is_file():
            raise FileNotFoundError(f"CA certificate {ca} not found (--ca)")
        entry["root-certificates"] = str(ca.resolve())
    links[name] = entry
    if make_default or "default" not in links:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def superlink_command(certs: Path | None, state: Path, host: str, port: int,
                      insecure: bool = False) -> list[str]:
    """The ``flower-superlink`` command line with TLS and node authentication."""
    cmd = [_exe("flower-superlink"), "--disable-runtime-dependency-installation",
           "--host", host, "--port", str(port), "--database", str(state.resolve() / "state.db")]
    if insecure:
        return [*cmd, "--insecure"]
    certs = certs.resolve()
    for f in ("ca.crt", "server.crt", "server.key"):
        if not (certs / f).is_file():
            raise FileNotFoundError(f"{certs / f} not found: run 'fedmutual-deploy certs' first")
    return [*cmd, "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile",
            str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth"]


def supernode_command(superlink: str, ca: Path | None, key: Path | None, host: str, port: int,
                      node_config: str, insecure: bool = False) -> list[str]:
    """The ``flower-supernode`` command line with TLS and its authentication key."""
    cmd = [_exe("flower-supernode"), "--superlink", superlink, "--host", host,
           "--port", str(port)]
    if node_config:
        cmd += ["--node-config", node_config]
    if insecure:
        return [*cmd, "--insecure"]
    for what, p in (("--ca", ca), ("--key", key)):
        if p is None or not p.is_file():
            raise FileNotFoundError(f"{what} {p} not found: TLS needs the CA certificate and "
                                    "node authentication the node's private key")
    return [*cmd, "--root-certificates", str(ca.resolve()), "--auth-supernode-private-key",
            str(key.resolve())]


def _exe(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    return found


def _exec(cmd: list[str]) -> None:
    env = {**os.environ, **ENV}
    print("+ " + " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``fedmutual-deploy``."""
    p = argparse.ArgumentParser(prog="fedmutual-deploy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("certs", help="make a CA and a server certificate")
    c.add_argument("out", type=Path)
    c.add_argument("--host", action="append", required=True,
                   help="address the nodes use to reach the SuperLink (repeatable)")
    c.add_argument("--days", type=int, default=365)
    k = sub.add_parser("node-key", help="make a SuperNode authentication key pair")
    k.add_argument("out", type=Path)
    k.add_argument("name")
    s = sub.add_parser("superlink", help="start the SuperLink (TLS + node authentication)")
    s.add_argument("--certs", type=Path)
    s.add_argument("--state", type=Path, required=True, help="folder for the SuperLink's database")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=9092)
    s.add_argument("--insecure", action="store_true", help="loopback demo only: no TLS, no auth")
    n = sub.add_parser("connection", help="save a SuperLink connection in Flower's config.toml")
    n.add_argument("name")
    n.add_argument("address", help="HOST:PORT")
    n.add_argument("--ca", type=Path)
    n.add_argument("--insecure", action="store_true")
    n.add_argument("--default", action="store_true")
    r = sub.add_parser("register", help="allow a SuperNode's public key (flwr supernode register)")
    r.add_argument("connection")
    r.add_argument("public_key", type=Path)
    m = sub.add_parser("supernode", help="start a SuperNode (TLS + its authentication key)")
    m.add_argument("--superlink", required=True, help="HOST:PORT")
    m.add_argument("--ca", type=Path)
    m.add_argument("--key", type=Path, help="the node's private key (from node-key)")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=9094, help="the node's local ClientApp port")
    m.add_argument("--node-config", default="")
    m.add_argument("--insecure", action="store_true", help="loopback demo only")
    a = p.parse_args(argv)
    try:
        if a.cmd == "certs":
            for path in make_certs(a.out.resolve(), a.host, a.days).values():
                print(path)
        elif a.cmd == "node-key":
            print("\n".join(map(str, make_node_key(a.out.resolve(), a.name))))
        elif a.cmd == "superlink":
            a.state.mkdir(parents=True, exist_ok=True)
            _exec(superlink_command(a.certs, a.state, a.host, a.port, a.insecure))
        elif a.cmd == "connection":
            print(write_connection(a.name, a.address, a.ca, a.insecure, a.default))
        elif a.cmd == "register":
            _exec([_exe("flwr"), "supernode", "register", str(a.public_key.resolve()),
                   a.connection])
        elif a.cmd == "supernode":
            _exec(supernode_command(a.superlink, a.ca, a.key, a.host, a.port, a.node_config,
                                    a.insecure))
    except (FileExistsError, FileNotFoundError) as exc:
        p.exit(2, f"fedmutual-deploy {a.cmd}: {exc}\n")


if __name__ == "__main__":
    main()
