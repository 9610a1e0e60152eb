"""Kafka SASL/TLS settings, secrets kept out of reprs and logs, no customer data in logs."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import certifi
import faust
import orjson
import pytest
from faust.types.auth import AuthProtocol, SASLMechanism

from streams.config import ConfigError, Settings, from_env
from streams.kafka.broker import BrokerUnavailable, ensure_topics
from streams.kafka.security import faust_credentials, kafka_client_kwargs, sasl_password
from streams.tools.cli import build_parser
from streams.tools.replay import run_replay

from .conftest import BrokerInfo
from .traffic import generate

SECRET = "pw-" + uuid.uuid4().hex
SASL_ENV = {"ACSR_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "ACSR_SASL_USERNAME": "acsr-worker",
            "ACSR_SASL_PASSWORD": SECRET}


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed client certificate and its key (PEM)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "client.pem", folder / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=acsr-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


# --- the secret stays secret ----------------------------------------------------------------


def test_password_is_not_in_the_settings_repr() -> None:
    settings = from_env(SASL_ENV)
    assert settings.sasl_password == SECRET
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert "acsr-worker" in repr(settings)  # the rest of the repr is still there


def test_password_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")  # a trailing newline as `echo` leaves it
    env = {**SASL_ENV, "ACSR_SASL_PASSWORD": "", "ACSR_SASL_PASSWORD_FILE": str(secret_file)}
    settings = from_env(env)
    assert sasl_password(settings) == SECRET
    assert kafka_client_kwargs(settings)["sasl_plain_password"] == SECRET
    assert SECRET not in repr(settings)


@pytest.mark.integration
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
async def test_sasl_reaches_the_broker_and_the_password_no_log(
    kafka: BrokerInfo, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Our clients speak SASL with the configured mechanism (seen on the wire at debug
    level); the broker here has no SASL users, so the start fails, and says so, without
    the password in any log line."""
    caplog.set_level(logging.DEBUG)
    settings = from_env({**SASL_ENV, "ACSR_SASL_MECHANISM": mechanism,
                         "ACSR_BROKER": kafka.bootstrap})
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker"):
        await ensure_topics(kafka.bootstrap, {"acsr.sasl-probe": 1}, timeout_s=1.5,
                            client=kafka_client_kwargs(settings))
    assert f"SaslHandShakeRequest_v1(mechanism='{mechanism}')" in caplog.text
    assert "unreachable, retrying" in caplog.text
    assert SECRET not in caplog.text


# --- validation at start ----------------------------------------------------------------------


@pytest.mark.parametrize(("env", "message"), [
    ({"ACSR_SECURITY_PROTOCOL": "TLS"}, "ACSR_SECURITY_PROTOCOL='TLS' must be one of"),
    ({**SASL_ENV, "ACSR_SASL_MECHANISM": "GSSAPI"}, "ACSR_SASL_MECHANISM='GSSAPI' must be"),
    ({**SASL_ENV, "ACSR_SASL_USERNAME": ""}, "SASL_PLAINTEXT needs ACSR_SASL_USERNAME"),
    ({**SASL_ENV, "ACSR_SASL_PASSWORD": ""}, "needs ACSR_SASL_PASSWORD or ACSR_SASL_PASSWORD_FILE"),
    ({**SASL_ENV, "ACSR_SASL_PASSWORD_FILE": "/etc/hostname"}, "not both"),
    ({"ACSR_SASL_USERNAME": "u", "ACSR_SASL_PASSWORD": "p"}, "SASL credentials are set but"),
    ({"ACSR_SECURITY_PROTOCOL": "SSL", "ACSR_SSL_CAFILE": "/nonexistent/ca.pem"},
     "ACSR_SSL_CAFILE='/nonexistent/ca.pem' is not a readable file"),
    ({"ACSR_SSL_CAFILE": certifi.where()}, "TLS files are set but ACSR_SECURITY_PROTOCOL is"),
    ({"ACSR_SECURITY_PROTOCOL": "SSL", "ACSR_SSL_KEYFILE": certifi.where()},
     "ACSR_SSL_KEYFILE needs ACSR_SSL_CERTFILE"),
    ({**SASL_ENV, "ACSR_SASL_PASSWORD": "", "ACSR_SASL_PASSWORD_FILE": "/nonexistent/pw"},
     "ACSR_SASL_PASSWORD_FILE='/nonexistent/pw' is not a readable file"),
])
def test_half_configured_security_fails_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_env(env)


def test_the_worker_command_names_the_bad_setting(tmp_path: Path) -> None:
    env = {**os.environ, **SASL_ENV, "ACSR_SASL_USERNAME": ""}
    done = subprocess.run([sys.executable, "-m", "streams", "worker"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert "configuration error: SASL_PLAINTEXT needs ACSR_SASL_USERNAME" in done.stderr
    assert SECRET not in done.stderr


def test_a_ca_file_that_is_not_a_certificate_fails_with_a_message(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    settings = from_env({"ACSR_SECURITY_PROTOCOL": "SSL", "ACSR_SSL_CAFILE": str(bogus)})
    with pytest.raises(ConfigError, match=r"TLS files .* cannot be used"):
        kafka_client_kwargs(settings)


# --- what the clients get -------------------------------------------------------------------


def test_plaintext_changes_no_client() -> None:
    assert kafka_client_kwargs(Settings()) == {}
    assert faust_credentials(Settings()) is None


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_over_tls(mechanism: str) -> None:
    settings = from_env({**SASL_ENV, "ACSR_SECURITY_PROTOCOL": "SASL_SSL",
                         "ACSR_SASL_MECHANISM": mechanism, "ACSR_SSL_CAFILE": certifi.where()})
    kwargs: dict[str, Any] = kafka_client_kwargs(settings)
    context = kwargs.pop("ssl_context")
    assert kwargs == {"security_protocol": "SASL_SSL", "sasl_mechanism": mechanism,
                      "sasl_plain_username": "acsr-worker", "sasl_plain_password": SECRET}
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.get_ca_certs()  # the CA file was loaded

    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol is AuthProtocol.SASL_SSL
    assert credentials.mechanism is SASLMechanism(mechanism)
    assert (credentials.username, credentials.password) == ("acsr-worker", SECRET)
    assert SECRET not in repr(credentials)


def test_sasl_without_tls() -> None:
    credentials = faust_credentials(from_env(SASL_ENV))
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol is AuthProtocol.SASL_PLAINTEXT
    assert "ssl_context" not in kafka_client_kwargs(from_env(SASL_ENV))


def test_mutual_tls(key_pair: tuple[Path, Path]) -> None:
    cert, key = key_pair
    settings = from_env({"ACSR_SECURITY_PROTOCOL": "SSL", "ACSR_SSL_CAFILE": str(cert),
                         "ACSR_SSL_CERTFILE": str(cert), "ACSR_SSL_KEYFILE": str(key)})
    kwargs = kafka_client_kwargs(settings)
    assert kwargs["security_protocol"] == "SSL"
    assert "sasl_mechanism" not in kwargs
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.protocol is AuthProtocol.SSL


def test_a_key_that_does_not_match_the_certificate_fails(key_pair: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    cert, _ = key_pair
    other_key = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other_key), "2048"], check=True,
                   capture_output=True)
    settings = from_env({"ACSR_SECURITY_PROTOCOL": "SSL", "ACSR_SSL_CERTFILE": str(cert),
                         "ACSR_SSL_KEYFILE": str(other_key)})
    with pytest.raises(ConfigError, match="cannot be used"):
        faust_credentials(settings)


def test_security_settings_reach_the_worker_processes() -> None:
    """Replay and tests start workers through `to_env`: security must survive the trip."""
    settings = from_env({**SASL_ENV, "ACSR_SASL_MECHANISM": "SCRAM-SHA-256"})
    assert from_env(settings.to_env()) == settings


# --- exposure -------------------------------------------------------------------------------


def test_metrics_endpoint_binds_to_loopback_by_default() -> None:
    assert ipaddress.ip_address(Settings().web_host).is_loopback
    assert ipaddress.ip_address(from_env({}).web_host).is_loopback
    args = build_parser().parse_args(["worker"])
    assert args.web_host is None  # no flag: the loopback default stands


def _with_personal_data(lines: list[bytes], marker: str) -> list[bytes]:
    """The traffic with a customer id and free text wherever the contract allows them."""
    out = []
    for line in lines:
        doc = orjson.loads(line)
        if doc["type"] == "case_opened":
            doc["customer_id"] = f"cust-{marker}-{doc['case_id']}"
        elif doc["type"] == "case_escalated":
            doc["note"] = f"text-{marker} customer is angry about order 4711"
        elif doc["type"] == "human_override":
            doc["rationale"] = f"text-{marker} refund over limit"
        elif doc["type"] == "action_executed" and not doc["success"]:
            doc["error"] = f"text-{marker} card declined"
        out.append(orjson.dumps(doc))
    # Invalid messages carry personal data too, and are logged about (dead-lettered).
    out.append(orjson.dumps({"event_id": f"text-{marker}", "type": "csat_submitted",
                             "case_id": f"case-{marker}-bad", "ts": 1, "score": 99}))
    return out


@pytest.mark.integration
async def test_info_log_holds_no_case_customer_or_free_text(kafka: BrokerInfo,
                                                           tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:10]
    lines = _with_personal_data(list(generate(40, seed=31)), marker)
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    settings = kafka.settings(partitions=2, log_level="info")

    result = await run_replay(source, settings, start_broker=False, log_dir=tmp_path / "logs")

    assert result.report["events"]["invalid"] >= 1
    logs = "\n".join(path.read_text(errors="replace")
                     for path in (tmp_path / "logs").glob("worker-*.log"))
    assert "[INFO]" in logs  # info lines were written: the check below means something
    assert marker not in logs
    assert not re.search(r"case-31-\d+", logs), "a case id is in the worker log"
    assert "cust-" not in logs and "order 4711" not in logs
