"""TLS contexts for the server, the client and the load tester.

Both sides start from the ssl module's secure defaults and refuse anything
older than TLS 1.2.  Errors are :class:`~aecho.config.ConfigError` with one
line that names the file and what is wrong with it.
"""

from __future__ import annotations

import os
import ssl

from aecho.config import ConfigError


def _check_readable(option: str, path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{option} {path}: no such file")
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path}: is a directory, not a PEM file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {path}: permission denied")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context from a PEM certificate chain and its private key.

    Raises:
        ConfigError: a file is missing or unreadable, not PEM, or the key does
            not match the certificate.
    """
    _check_readable("--tls-cert", cert)
    _check_readable("--tls-key", key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The server runs the record layer itself (server.tlsstream): a TLS 1.2 peer asking
    # to renegotiate is refused rather than served by a handshake in mid-stream.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise ConfigError(f"--tls-key {key} does not match --tls-cert {cert}") from None
        raise ConfigError(
            f"cannot load --tls-cert {cert} / --tls-key {key}: {reason} "
            "(both must be PEM; the key unencrypted)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read --tls-cert {cert} / --tls-key {key}: {exc}") from None
    return ctx


def client_context(cafile: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """A client context that verifies the server against ``cafile`` (or the system store).

    ``insecure`` turns verification off: for self-signed test servers only.

    Raises:
        ConfigError: ``cafile`` is missing, unreadable or holds no certificate.
    """
    if cafile is not None:
        _check_readable("--cafile", cafile)
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load --cafile {cafile}: {exc} (expected PEM)") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def describe_handshake_error(where: str, exc: ssl.SSLError) -> str:
    """The one line a user sees when a client handshake fails."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return (
            f"TLS handshake with {where} failed: certificate not trusted ({detail}); "
            "pass the server's CA with --cafile, or --insecure for a test server"
        )
    return f"TLS handshake with {where} failed: {exc.reason or exc} (is the server using TLS?)"
