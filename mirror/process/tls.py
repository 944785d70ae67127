"""HTTPS for the listening socket: `[server] tls_cert` / `tls_key` (PEM files; the certificate
file may hold the whole chain).

The certificate is reloaded on SIGHUP by loading the files again into the live SSLContext: new
handshakes get the new certificate, established connections keep theirs and are not dropped.
A reload that fails (a half-written file) keeps the old certificate and logs why.
"""

from __future__ import annotations

import logging
import ssl

log = logging.getLogger("mirror.tls")


class TLSError(Exception):
    pass


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
    return ctx


def reload(ctx: ssl.SSLContext, cert: str, key: str) -> bool:
    try:
        # Checked on a scratch context first: a key not matching the certificate would
        # otherwise leave the live context with the new certificate and the old key.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        log.error("certificate reload failed: keeping the current one",
                  extra={"tls_cert": cert, "tls_key": key, "error": str(exc)})
        return False
    log.info("certificate reloaded", extra={"tls_cert": cert})
    return True
