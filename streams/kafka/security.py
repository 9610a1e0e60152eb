"""Kafka authentication (SASL) and encryption (TLS), from the settings, for every client.

Faust's clients and our own aiokafka clients (admin, replay producer and consumers) must
reach a secured cluster alike, so both read the same settings here. The settings are
checked when they are built (config.py); this module only turns them into client options.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import faust
from aiokafka.helpers import create_ssl_context
from faust.types.auth import CredentialsT

from streams.config import ConfigError, Settings

TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})


def sasl_password(settings: Settings) -> str:
    """The SASL password, from ACSR_SASL_PASSWORD or the file ACSR_SASL_PASSWORD_FILE names."""
    if settings.sasl_password_file:
        try:
            return Path(settings.sasl_password_file).read_text().rstrip("\r\n")
        except OSError as err:
            raise ConfigError(f"ACSR_SASL_PASSWORD_FILE cannot be read: {err.strerror}") from None
    return settings.sasl_password


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A TLS context verifying the brokers (and presenting our certificate), or None."""
    if settings.security_protocol not in TLS_PROTOCOLS:
        return None
    try:
        return create_ssl_context(cafile=settings.ssl_cafile or None,
                                  certfile=settings.ssl_certfile or None,
                                  keyfile=settings.ssl_keyfile or None)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"TLS files (ACSR_SSL_CAFILE, ACSR_SSL_CERTFILE, ACSR_SSL_KEYFILE) "
                          f"cannot be used: {err}") from None


def kafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for an aiokafka client (admin, producer, consumer)."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": protocol}
    context = ssl_context(settings)
    if context is not None:
        out["ssl_context"] = context
    if protocol.startswith("SASL_"):
        out.update(sasl_mechanism=settings.sasl_mechanism,
                   sasl_plain_username=settings.sasl_username,
                   sasl_plain_password=sasl_password(settings))
    return out


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """Faust's `broker_credentials`: None for plaintext, else SSL or SASL credentials."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    # With an SSL context the credentials speak SASL_SSL, without it SASL_PLAINTEXT.
    return faust.SASLCredentials(username=settings.sasl_username,
                                 password=sasl_password(settings),
                                 ssl_context=context, mechanism=settings.sasl_mechanism)
