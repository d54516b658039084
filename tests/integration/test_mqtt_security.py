"""TLS, passwords and ACLs with mosquitto: the controller and an orchestrator each get only what they need.

The test makes a CA and a server certificate with ``openssl``, a password file with ``mosquitto_passwd`` and the
ACL of ``contrib/mosquitto/acl.example`` (controller ``h1`` writes under ``qmpnet/h1/``; the orchestrator role may
publish requests and read everything; ``viewer`` may only read). Then: the controller serves over ``mqtts://``
with a password; the orchestrator's requests are executed; the viewer's are dropped by the broker and never reach
the controller; an anonymous client and a wrong password are refused.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import pytest
from mqtt_fixtures import Mosquitto, Probe, Qemu, Serve, scratch, wait_online

import qmpnet
from qmpnet.client import Client
from qmpnet.settings import MqttSettings

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration]

CONTRIB = Path(__file__).parents[2] / "contrib" / "mosquitto"
ACL = CONTRIB / "acl.example"
PASSWORDS = {"h1": "controller-secret", "orchestrator": "orch-secret", "viewer": "view-secret"}


@dataclass
class Secured:
    broker: Mosquitto
    serve: Serve
    ca: Path

    def settings(self, user: str | None, password: str | None = None) -> MqttSettings:
        return MqttSettings.model_validate(
            {"broker": self.broker.url, "username": user, "password": password, "ca_file": self.ca}
        )

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it; returns the CA certificate."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=qmpnet test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=directory)  # fmt: skip
    return directory / "ca.crt"


def contrib_conf(work: Path, passwords: Path) -> str:
    """contrib/mosquitto/mosquitto.conf with the test's files, port and no persistence."""
    conf = (CONTRIB / "mosquitto.conf").read_text()
    for installed, here in [
        ("/etc/mosquitto/certs/", f"{work}/"),
        ("/etc/mosquitto/qmpnet.passwd", str(passwords)),
        ("/etc/mosquitto/qmpnet.acl", str(ACL)),
        ("/var/lib/mosquitto/", f"{work}/"),
        ("persistence true", "persistence false"),
        ("listener 8883", "listener {port} 127.0.0.1"),
    ]:
        assert installed in conf, installed
        conf = conf.replace(installed, here)
    return conf


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    with scratch("qmpnet-mqtt-tls-") as work:
        ca = make_certificates(work)
        passwords = work / "passwd"
        for user, password in PASSWORDS.items():
            create = ["-c"] if not passwords.exists() else []
            subprocess.run(["mosquitto_passwd", *create, "-b", str(passwords), user, password], check=True)
        broker = Mosquitto(work, template=contrib_conf(work, passwords), tls=True)
        vm = Qemu(work / "vm1.qmp")
        env = {"QMPNET_MQTT__USERNAME": "h1", "QMPNET_MQTT__PASSWORD": PASSWORDS["h1"], "QMPNET_MQTT__CA_FILE": str(ca)}
        serve = Serve(work, broker.url, "h1", {"vm1": vm.qmp}, env=env)
        try:
            broker.start()
            vm.start()
            serve.start()
            tls = ssl.create_default_context(cafile=ca)
            probe_args: dict[str, Any] = {"username": "viewer", "password": PASSWORDS["viewer"], "tls_context": tls}
            asyncio.run(wait_online(serve, broker.url, guests_connected=["vm1"], **probe_args))
            yield Secured(broker, serve, ca)
        finally:
            for process in (serve, vm, broker):
                process.stop()


async def test_orchestrator_is_served_over_tls_with_a_password(secured: Secured) -> None:
    async with Client(settings=secured.settings("orchestrator", PASSWORDS["orchestrator"]), timeout=10) as client:
        nic = await client.add_nic("h1", "vm1", {"model": "e1000", "id": "sec1"})
        assert nic.id == "sec1"
        assert [n.id for n in await client.list_nics("h1", "vm1")] == ["sec1"]


async def test_a_client_the_acl_forbids_cannot_get_a_request_executed(secured: Secured) -> None:
    async with Probe(
        secured.broker.url, username="viewer", password=PASSWORDS["viewer"], tls_context=secured.tls()
    ) as viewer:
        await viewer.subscribe(viewer.response_topic, "qmpnet/h1/guest/vm1/event/#", "qmpnet/h1/guest/vm1/response/#")
        since = viewer.mark()
        await viewer.publish("qmpnet/h1/guest/vm1/request/nic/add", {"nic": {"id": "evil"}})
        await viewer.publish(
            "qmpnet/h1/guest/vm1/request/nic/add", {"nic": {"id": "evil2"}}, response_topic=viewer.response_topic
        )
        await asyncio.sleep(1.0)
        assert viewer.received("#", since) == []
    async with Client(settings=secured.settings("orchestrator", PASSWORDS["orchestrator"]), timeout=10) as client:
        ids = {n.id for n in await client.list_nics("h1", "vm1")}
    assert not ids & {"evil", "evil2"}


async def test_the_orchestrator_cannot_forge_controller_state(secured: Secured) -> None:
    async with Probe(
        secured.broker.url, username="orchestrator", password=PASSWORDS["orchestrator"], tls_context=secured.tls()
    ) as orchestrator:
        await orchestrator.subscribe("qmpnet/h1/status")
        await orchestrator.one("qmpnet/h1/status")
        since = orchestrator.mark()
        await orchestrator.publish("qmpnet/h1/status", {"state": "offline"}, retain=True)
        await asyncio.sleep(0.5)
        assert orchestrator.received("qmpnet/h1/status", since) == []


async def test_anonymous_and_wrong_password_are_refused(secured: Secured) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with Probe(secured.broker.url, tls_context=secured.tls()):
            pass
    with pytest.raises(qmpnet.GuestUnavailable):
        async with Client(settings=secured.settings("orchestrator", "wrong")):
            pass
