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


def system_roots() -> Path:
    """The system's root certificates: OpenSSL's default file, a common system path, or
    certifi's bundle (what httpx and requests trust by default) where the system has none."""
    default = ssl.get_default_verify_paths().cafile
    for candidate in (default, *SYSTEM_BUNDLES):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    import certifi  # a mitmproxy dependency

    return Path(certifi.where())


def write_bundle(confdir: str | None, output: str | None = None) -> dict[str, str]:
    """Write the system's roots plus the gateway's CA to `output` (default
    CONFDIR/aigw-ca-bundle.pem), replacing it whole; what was written where."""
    ca = ensure_ca(confdir)
    roots = system_roots()
    target = Path(output) if output else ca.parent / BUNDLE_NAME
    text = roots.read_text(encoding="ascii", errors="replace").rstrip("\n")
    bundle = f"{text}\n# aigw gateway CA ({ca})\n{ca.read_text(encoding='ascii').strip()}\n"
    partial = target.with_name(f".{target.name}.tmp")
    partial.write_text(bundle, encoding="ascii")
    partial.replace(target)  # a client never reads half a bundle
    return {"bundle": str(target), "ca": str(ca), "system_roots": str(roots)}
