"""The MQTT client's TLS context from mqtt.tls, built one way for `pvgate check` and the publisher.

The key password is always passed (empty if none): with none, OpenSSL would prompt on a terminal
for the pass phrase of an encrypted key and hang the service (limits.md §3).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from agent.uplink.settings import TlsConfig
from drivers.errors import PvgateError


class TlsSetupError(PvgateError):
    """A file of mqtt.tls cannot be used; `key` names the site-file key, the message the fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A client context that verifies the broker against ca_file and presents cert_file/key_file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    # ssl.SSLError derives from OSError: it is caught first.
    try:
        ctx.load_verify_locations(cafile=tls.ca_file)
    except (ssl.SSLError, ValueError) as err:
        raise TlsSetupError("ca_file", f"mqtt.tls.ca_file {tls.ca_file}: cannot load a CA certificate from it: it is "
                                       f"not a PEM certificate (-----BEGIN CERTIFICATE-----): {reason(err)}") from err
    except OSError as err:
        raise TlsSetupError("ca_file", f"mqtt.tls.ca_file {tls.ca_file}: cannot read it: {err.strerror}") from err
    if tls.cert_file is None or tls.key_file is None:
        return ctx
    encrypted = looks_encrypted(tls.key_file)
    if encrypted and not tls.key_password:
        raise TlsSetupError("key_file", f"mqtt.tls.key_file {tls.key_file}: the key is encrypted; set "
                                        "mqtt.tls.key_password_file (or key_password: ${ENV_NAME})")
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: tls.key_password or "")
    except (ssl.SSLError, ValueError) as err:
        hint = ("wrong key password, or the key does not belong to the certificate" if encrypted
                else "not a PEM certificate and matching private key")
        raise TlsSetupError("cert_file", f"mqtt.tls.cert_file {tls.cert_file} / key_file {tls.key_file}: "
                                         f"{hint} ({reason(err)})") from err
    except OSError as err:
        raise TlsSetupError("cert_file", f"mqtt.tls: cannot read {err.filename or tls.cert_file}: {err.strerror}") from err
    return ctx


def looks_encrypted(path: str) -> bool:
    """PKCS#8 and traditional PEM keys both say ENCRYPTED in their armour."""
    try:
        return b"ENCRYPTED" in Path(path).read_bytes()[:8192]
    except OSError:
        return False


def reason(err: Exception) -> str:
    """OpenSSL's reason in words: "key values mismatch" rather than "[X509: KEY_VALUES_MISMATCH] ... (_ssl.c:4012)"."""
    text = str(getattr(err, "reason", None) or err)
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", text).replace("_", " ").lower()
