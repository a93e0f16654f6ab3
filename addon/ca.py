"""The CA that mitmproxy intercepts TLS with: made once in its confdir before any worker starts
(several workers making their own at once would each sign with a different one), and the
combined bundle clients trust: the system's roots plus this CA, so pointing `SSL_CERT_FILE` at
it does not narrow a client's trust for every other host."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from mitmproxy import certs
from mitmproxy.options import CONF_BASENAME, CONF_DIR, KEY_SIZE

BUNDLE_NAME = "aigw-ca-bundle.pem"
# Where the common systems keep their roots, after what OpenSSL itself was built to read.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # macOS, the BSDs
)


def confdir_path(confdir: str | None) -> Path:
    """mitmproxy's confdir, `~` expanded (default ~/.mitmproxy)."""
    return Path(os.path.expanduser(confdir or CONF_DIR))


def ensure_ca(confdir: str | None) -> Path:
    """The CA certificate of `confdir` (PEM), made there first if there is none; the private
    key is written owner-readable only, as mitmproxy writes it."""
    path = confdir_path(confdir)
    certs.CertStore.from_store(path, CONF_BASENAME, KEY_SIZE)
    return path / f"{CONF_BASENAME}-ca-cert.pem"


BUNDLE_MARK = "# aigw gateway CA"


def system_roots(exclude: Path | None = None) -> Path:
    """The system's root certificates: OpenSSL's compiled-in default file, a common system path,
    or certifi's bundle (what httpx and requests trust by default) where the system has none.
    Never `$SSL_CERT_FILE` (the guide points it at the bundle itself), `exclude`, or any file
    holding an aigw bundle: the roots must not grow a copy of an old CA each time."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.openssl_cafile, *SYSTEM_BUNDLES):
        if not candidate or not Path(candidate).is_file():
            continue
        if exclude is not None and Path(candidate).resolve() == exclude.resolve():
            continue
        if BUNDLE_MARK in Path(candidate).read_text(encoding="ascii", errors="replace"):
            continue
        return Path(candidate)
    import certifi  # a mitmproxy dependency

    return Path(certifi.where())


def write_bundle(confdir: str | None, output: str | None = None) -> dict[str, str]:
    """Write the system's roots plus the gateway's CA to `output` (default
    CONFDIR/aigw-ca-bundle.pem), replacing it whole; what was written where. The CA is the one
    mitmproxy signs with (read from `mitmproxy-ca.pem`, as mitmproxy reads it), not a copy of
    its certificate that may be stale."""
    ensure_ca(confdir)
    path = confdir_path(confdir)
    store = certs.CertStore.from_store(path, CONF_BASENAME, KEY_SIZE)
    ca_pem = store.default_ca.to_pem().decode("ascii").strip()
    target = Path(output) if output else path / BUNDLE_NAME
    roots = system_roots(exclude=target)
    text = roots.read_text(encoding="ascii", errors="replace").rstrip("\n")
    signing = path / f"{CONF_BASENAME}-ca.pem"
    bundle = f"{text}\n{BUNDLE_MARK} ({signing})\n{ca_pem}\n"
    partial = target.with_name(f".{target.name}.tmp")
    partial.write_text(bundle, encoding="ascii")
    partial.replace(target)  # a client never reads half a bundle
    return {"bundle": str(target), "ca": str(path / f"{CONF_BASENAME}-ca-cert.pem"),
            "system_roots": str(roots)}
