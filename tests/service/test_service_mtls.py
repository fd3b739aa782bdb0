"""Mutual TLS: client certificates verified against ``tls_client_ca`` map to principals
by their commonName; tokens still work beside them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme
from conftest import ServiceFactory

from packetstack import (
    AuthenticationFailed,
    Client,
    ConfigError,
    ConnectionFailed,
    Packet,
    PermissionDenied,
    Principal,
    Service,
)
from packetstack.service.auth import Gate, Refused, common_name
from packetstack.service.config import ServiceConfig, load
from packetstack.service.configcheck import check_text, summary

WAIT = 3.0


class Job(Packet):
    packet_tag: ClassVar[str] = "tst.mtls.job"
    n: int


WORKERS = Principal(name="workers", certificate="worker-*", endings=["worker-*"], send=["boss"])
BOSS = Principal(name="boss", token="boss-secret", endings=["boss"])


def pem_files(folder: Path, name: str, cert: trustme.LeafCert) -> tuple[str, str]:
    """The certificate chain and the key of ``cert`` as two PEM files."""
    certfile, keyfile = folder / f"{name}.pem", folder / f"{name}.key"
    certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    return str(certfile), str(keyfile)


class Pki:
    """A CA, the service's certificate, and client certificates of that CA and another."""

    def __init__(self, folder: Path, ca: trustme.CA, server_cert: trustme.LeafCert) -> None:
        self.folder = folder
        self.cafile = str(folder / "ca.pem")
        ca.cert_pem.write_to_path(self.cafile)
        self.server = pem_files(folder, "server", server_cert)
        self.worker = pem_files(folder, "worker-1", ca.issue_cert(common_name="worker-1"))
        self.intruder = pem_files(folder, "intruder", ca.issue_cert(common_name="intruder"))
        stranger = trustme.CA().issue_cert(common_name="worker-2")
        self.stranger = pem_files(folder, "stranger", stranger)

    def settings(self, **more: Any) -> dict[str, Any]:
        certfile, keyfile = self.server
        return {"tls_cert": certfile, "tls_key": keyfile, "tls_client_ca": self.cafile, **more}

    def client(self, name: str, url: str, files: tuple[str, str] | None, **options: Any) -> Client:
        certfile, keyfile = files if files is not None else (None, None)
        return Client(name, url, cafile=self.cafile, certfile=certfile, keyfile=keyfile, **options)


@pytest.fixture
def pki(tmp_path: Path, ca: trustme.CA, server_cert: trustme.LeafCert) -> Pki:
    return Pki(tmp_path, ca, server_cert)


async def test_a_certificate_maps_to_its_principal_and_its_acl_applies(
    make_service: ServiceFactory, pki: Pki
) -> None:
    service = await make_service(principals=[WORKERS, BOSS], **pki.settings())
    async with (
        pki.client("boss", service.url, None, token="boss-secret") as boss,
        pki.client("worker-1", service.url, pki.worker) as worker,
    ):
        got: list[tuple[int, str]] = []
        boss.on(Job)(lambda job, ctx: got.append((job.n, ctx.sender)))
        await worker.send("boss", Job(1), ack=True)  # allowed
        with pytest.raises(PermissionDenied, match="may not send to 'worker-2'"):
            await worker.send("worker-2", Job(2), ack=True)
        assert service.endings["worker-1"].principal.name == "workers"
        assert service.endings["boss"].principal.name == "boss"  # token only, still fine
    assert got == [(1, "worker-1")]


async def test_the_certificate_principal_limits_the_names_it_connects_as(
    make_service: ServiceFactory, pki: Pki
) -> None:
    service = await make_service(principals=[WORKERS, BOSS], **pki.settings())
    client = pki.client("boss", service.url, pki.worker, reconnect=False)
    with pytest.raises(PermissionDenied, match="principal 'workers' may not connect as 'boss'"):
        await client.connect()
    await client.close()


async def test_a_certificate_of_another_ca_fails_the_tls_handshake(
    make_service: ServiceFactory, pki: Pki
) -> None:
    service = await make_service(principals=[WORKERS, BOSS], **pki.settings())
    client = pki.client("worker-2", service.url, pki.stranger, connect_timeout=1.0)
    with pytest.raises(ConnectionFailed):
        await client.connect()
    await client.close()
    assert "worker-2" not in service.endings


async def test_a_certificate_matching_no_principal_without_a_token_is_refused(
    make_service: ServiceFactory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    service = await make_service(principals=[WORKERS, BOSS], **pki.settings())
    client = pki.client("worker-9", service.url, pki.intruder)
    with caplog.at_level(logging.WARNING), pytest.raises(AuthenticationFailed):
        await client.connect()
    await client.close()
    assert service.stats["auth_failures"] == 1
    assert "no principal for certificate 'intruder'" in caplog.text


async def test_certificate_and_token_of_different_principals_are_refused(
    make_service: ServiceFactory, pki: Pki
) -> None:
    service = await make_service(principals=[WORKERS, BOSS], **pki.settings())
    client = pki.client("worker-1", service.url, pki.worker, token="boss-secret")
    with pytest.raises(AuthenticationFailed, match="certificate and token name different"):
        await client.connect()
    await client.close()
    assert "worker-1" not in service.endings


async def test_a_certificate_with_a_wrong_token_is_refused(
    make_service: ServiceFactory, pki: Pki
) -> None:
    service = await make_service(principals=[WORKERS, BOSS], **pki.settings())
    client = pki.client("worker-1", service.url, pki.worker, token="guess")
    with pytest.raises(AuthenticationFailed, match="wrong or missing token"):
        await client.connect()
    await client.close()


async def test_a_principal_with_a_certificate_and_a_token_takes_either(
    make_service: ServiceFactory, pki: Pki
) -> None:
    both = Principal(name="workers", token="workers-secret", certificate="worker-*")
    service = await make_service(principals=[both], **pki.settings())
    async with (
        pki.client("worker-1", service.url, pki.worker, token="workers-secret") as a,
        pki.client("worker-2", service.url, None, token="workers-secret") as b,
        pki.client("worker-3", service.url, pki.worker) as c,
    ):
        assert a.connected and b.connected and c.connected


async def test_required_client_certificates_refuse_a_client_without_one(
    make_service: ServiceFactory, pki: Pki
) -> None:
    settings = pki.settings(tls_client_cert_required=True)
    service = await make_service(principals=[WORKERS, BOSS], **settings)
    client = pki.client("boss", service.url, None, token="boss-secret", connect_timeout=1.0)
    with pytest.raises(ConnectionFailed) as refused:
        await client.connect()
    assert "give certfile=" in str(refused.value)
    await client.close()
    assert "boss" not in service.endings
    async with pki.client("worker-1", service.url, pki.worker) as worker:
        assert worker.connected


def test_the_gate_resolves_certificates_before_tokens() -> None:
    gate = Gate(["operator"], [WORKERS, BOSS])
    assert gate.principal(None, "worker-7").name == "workers"
    assert gate.principal("boss-secret", None).name == "boss"
    assert gate.principal("boss-secret", "intruder").name == "boss"
    assert gate.principal("operator", None).name == "token-1"
    for token, name in [(None, "intruder"), (None, None), ("nope", "worker-1")]:
        with pytest.raises(Refused):
            gate.principal(token, name)
    with pytest.raises(Refused, match="different principals"):
        gate.principal("operator", "worker-1")
    assert Gate([], [WORKERS]).open is False


def test_common_name_of_a_peer_certificate() -> None:
    def cert(*names: str) -> dict[str, Any]:
        return {"subject": ((("organizationName", "x"),), *((("commonName", n),) for n in names))}

    assert common_name(cert("worker-1")) == "worker-1"
    assert common_name(None) is None
    assert common_name({}) is None  # not verified
    assert common_name(cert()) is None
    assert common_name(cert("a", "b")) is None  # ambiguous


def test_client_certificate_arguments(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="keyfile needs certfile"):
        Client("a", "pss://127.0.0.1:1", keyfile=pki.worker[1])
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        Client("a", "pss://127.0.0.1:1", certfile=str(pki.folder / "missing.pem"))
    with pytest.raises(ConfigError, match="not both"):
        Client("a", "pss://127.0.0.1:1", ssl_context=object(), certfile=pki.worker[0])  # type: ignore[arg-type]


def test_an_unreadable_client_ca_is_a_config_error(tmp_path: Path, pki: Pki) -> None:
    settings = pki.settings(tls_client_ca=str(tmp_path / "missing-ca.pem"))
    with pytest.raises(ConfigError, match="cannot load the TLS client CA file"):
        Service("127.0.0.1", 0, data_dir=tmp_path / "data", **settings)


# ------------------------------------------------------------------ settings


def test_principal_needs_a_token_or_a_certificate() -> None:
    ServiceConfig(principals=[Principal(name="a", certificate="a-*")])
    ServiceConfig(principals=[Principal(name="a", token="t", certificate="a-*")])
    # Empty tokens beside certificates are not duplicates of each other.
    ServiceConfig(principals=[WORKERS, Principal(name="b", certificate="b")])
    with pytest.raises(ConfigError, match="needs a token, a certificate pattern or both"):
        load(overrides={"principals": [{"name": "a"}]}, environ={})
    with pytest.raises(ConfigError, match="share a token"):
        load(
            overrides={
                "principals": [
                    {"name": "a", "token": "t", "certificate": "a"},
                    {"name": "b", "token": "t"},
                ]
            },
            environ={},
        )


def test_mutual_tls_settings_need_their_prerequisites() -> None:
    with pytest.raises(ConfigError, match="tls_client_ca needs tls_cert"):
        load(overrides={"tls_client_ca": "ca.pem"}, environ={})
    with pytest.raises(ConfigError, match="tls_client_cert_required needs tls_client_ca"):
        load(overrides={"tls_cert": "c", "tls_key": "k", "tls_client_cert_required": True})
    found = load(
        environ={
            "PACKETSTACK_TLS_CERT": "c",
            "PACKETSTACK_TLS_KEY": "k",
            "PACKETSTACK_TLS_CLIENT_CA": "ca.pem",
            "PACKETSTACK_TLS_CLIENT_CERT_REQUIRED": "true",
        }
    )
    assert found.tls_client_ca == "ca.pem" and found.tls_client_cert_required
    assert "TLS: on (client certificates required)" in summary(found)


def test_config_check_accepts_certificate_principals() -> None:
    text = (
        "[service]\n"
        'tls_cert = "c.pem"\n'
        'tls_key = "k.pem"\n'
        'tls_client_ca = "ca.pem"\n'
        "[[service.principals]]\n"
        'name = "workers"\n'
        'certificate = "worker-*"\n'
        "[[service.principals]]\n"
        'name = "boss"\n'
        'token = ""\n'
        'certificate = "boss"\n'
    )
    assert check_text(text) == []


def test_config_check_reports_certificate_problems_at_their_lines() -> None:
    text = (
        "[service]\n"  # 1
        "tls_client_cert_required = true\n"  # 2
        "[[service.principals]]\n"  # 3
        'name = "workers"\n'  # 4
        'certificate = "worker-*"\n'  # 5
        "[[service.principals]]\n"  # 6
        'name = "nobody"\n'  # 7
        "[[service.principals]]\n"  # 8
        'name = "empty"\n'  # 9
        'token = ""\n'  # 10
    )
    assert [(p.line, p.message) for p in check_text(text)] == [
        (2, "tls_client_cert_required needs tls_client_ca to verify them with"),
        (
            5,
            "principal 'workers': its certificate pattern can match nothing: the service "
            "asks for client certificates only with tls_client_ca",
        ),
        (6, "principal 'nobody' has no token or certificate"),
        (10, "principal 'empty': the token is empty"),
    ]
