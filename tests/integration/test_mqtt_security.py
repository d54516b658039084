"""TLS, passwords and ACLs with mosquitto, in MQTT 5 and 3.1.1: each party gets only what it needs, and no secret leaks.

The test makes a CA and a server certificate with ``openssl``, a password file with ``mosquitto_passwd`` and the
ACL of ``contrib/mosquitto/acl.example`` (controller ``h1`` writes under ``qmpnet/h1/``; the orchestrator role may
publish requests and read everything; ``viewer`` may only read). Then: the controller serves over ``mqtts://``
with the password in its broker URL (which it never logs); the orchestrator's requests are executed; the viewer's
are dropped by the broker and never reach the controller; an anonymous client and a wrong password are refused
with the broker's reason, and a controller with a wrong password gives up with one line instead of retrying for
ever.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import ssl
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import pytest
from mqtt_fixtures import (
    MOSQUITTO_5,
    MOSQUITTO_311,
    Mode,
    Mosquitto,
    Probe,
    Qemu,
    RabbitMQ,
    Serve,
    scratch,
    wait_online,
)

import qmpnet
from qmpnet.client import Client
from qmpnet.settings import MqttSettings
from qmpnet.testguest.services import RABBITMQ_BIN

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration]

CONTRIB = Path(__file__).parents[2] / "contrib" / "mosquitto"
ACL = CONTRIB / "acl.example"
PASSWORDS = {"h1": "controller-secret", "orchestrator": "orch-secret", "viewer": "view-secret"}


@dataclass
class Secured:
    mode: Mode
    broker: Mosquitto
    serve: Serve
    ca: Path
    work: Path

    def settings(self, user: str | None, password: str | None = None, **more: Any) -> MqttSettings:
        return MqttSettings.model_validate(
            {"broker": self.broker.url, "username": user, "password": password, "ca_file": self.ca,
             "protocol": self.mode.protocol, **more}
        )  # fmt: skip

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def probe(self, user: str | None, password: str | None = None) -> Probe:
        tls = self.tls()
        return Probe(self.broker.url, protocol=self.mode.probe, username=user, password=password, tls_context=tls)

    def url_with(self, user: str, password: str) -> str:
        return self.broker.url.replace("mqtts://", f"mqtts://{user}:{password}@")


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


@pytest.fixture(scope="module", params=[MOSQUITTO_5, MOSQUITTO_311], ids=str)
def secured(request: pytest.FixtureRequest) -> Iterator[Secured]:
    mode: Mode = request.param
    with scratch("qmpnet-mqtt-tls-") as work:
        ca = make_certificates(work)
        passwords = work / "passwd"
        for user, password in PASSWORDS.items():
            create = ["-c"] if not passwords.exists() else []
            subprocess.run(["mosquitto_passwd", *create, "-b", str(passwords), user, password], check=True)
        broker = Mosquitto(work, template=contrib_conf(work, passwords), tls=True)
        vm = Qemu(work / "vm1.qmp")
        serve = Serve(work, "", "h1")
        try:
            broker.start()
            vm.start()
            # The password rides in the broker URL, the way a user might give it: it must never be logged.
            url = broker.url.replace("mqtts://", f"mqtts://h1:{PASSWORDS['h1']}@")
            env = {"QMPNET_MQTT__CA_FILE": str(ca)}
            serve = Serve(work, url, "h1", {"vm1": vm.qmp}, env=env, protocol=mode.protocol).start()
            tls = ssl.create_default_context(cafile=ca)
            probe_args: dict[str, Any] = {
                "username": "viewer", "password": PASSWORDS["viewer"], "tls_context": tls, "protocol": mode.probe,
            }  # fmt: skip
            asyncio.run(wait_online(serve, broker.url, guests_connected=["vm1"], **probe_args))
            yield Secured(mode, broker, serve, ca, work)
        finally:
            for process in (serve, vm, broker):
                process.stop()


async def test_orchestrator_is_served_over_tls_with_a_password(secured: Secured) -> None:
    async with Client(settings=secured.settings("orchestrator", PASSWORDS["orchestrator"]), timeout=10) as client:
        nic = await client.add_nic("h1", "vm1", {"model": "e1000", "id": "sec1"})
        assert nic.id == "sec1"
        assert [n.id for n in await client.list_nics("h1", "vm1")] == ["sec1"]


async def test_a_client_the_acl_forbids_cannot_get_a_request_executed(secured: Secured) -> None:
    async with secured.probe("viewer", PASSWORDS["viewer"]) as viewer:
        answers = ["qmpnet/h1/guest/vm1/response/#", "qmpnet/h1/client/+/response", viewer.response_topic]
        await viewer.subscribe(*answers, "qmpnet/h1/guest/vm1/event/#")
        since = viewer.mark()
        await viewer.publish("qmpnet/h1/guest/vm1/request/nic/add", {"transaction": "evil", "nic": {"id": "evil"}})
        if secured.mode.v5:
            await viewer.publish(
                "qmpnet/h1/guest/vm1/request/nic/add", {"transaction": "evil2", "nic": {"id": "evil2"}},
                response_topic=viewer.response_topic,
            )  # fmt: skip
        # The orchestrator's request reaches h1 after the viewer's (had the broker passed those on), and h1
        # answers requests for one guest in order: its answer is the positive signal that nothing else came.
        async with secured.probe("orchestrator", PASSWORDS["orchestrator"]) as orchestrator:
            await orchestrator.publish("qmpnet/h1/guest/vm1/request/nic/list", {"transaction": "marker"})
            await viewer.one("qmpnet/h1/guest/vm1/response/nic/list", since=since)
        assert [m.json.get("transaction") for m in viewer.received("#", since)] == ["marker"]
    async with Client(settings=secured.settings("orchestrator", PASSWORDS["orchestrator"]), timeout=10) as client:
        ids = {n.id for n in await client.list_nics("h1", "vm1")}
    assert not ids & {"evil", "evil2"}


async def test_the_orchestrator_cannot_forge_controller_state(secured: Secured) -> None:
    async with secured.probe("orchestrator", PASSWORDS["orchestrator"]) as orchestrator:
        await orchestrator.subscribe("qmpnet/h1/status", "qmpnet/h1/guest/vm1/response/#")
        await orchestrator.one("qmpnet/h1/status")
        since = orchestrator.mark()
        await orchestrator.publish("qmpnet/h1/status", {"state": "offline"}, retain=True)
        # Had the broker taken the forged status, it would have reached us before this later request's answer.
        await orchestrator.publish("qmpnet/h1/guest/vm1/request/nic/list", {"transaction": "marker"})
        await orchestrator.one("qmpnet/h1/guest/vm1/response/nic/list", since=since)
        assert orchestrator.received("qmpnet/h1/status", since) == []


async def test_anonymous_and_wrong_password_are_refused_with_the_brokers_reason(secured: Secured) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with secured.probe(None):
            pass
    with pytest.raises(qmpnet.BrokerUnavailable) as caught:
        async with Client(settings=secured.settings("orchestrator", "wrong")):
            pass
    assert caught.value.problem == "credentials"
    assert "the broker refused our credentials" in caught.value.message
    assert "wrong" not in caught.value.message


async def test_tls_failures_say_so(secured: Secured) -> None:
    settings = secured.settings("orchestrator", PASSWORDS["orchestrator"], ca_file=None)  # system CAs: unknown CA
    with pytest.raises(qmpnet.BrokerUnavailable) as caught:
        async with Client(settings=settings):
            pass
    assert caught.value.problem == "tls"
    assert "TLS failed" in caught.value.message


def test_the_controller_never_logs_its_password(secured: Secured) -> None:
    log = secured.serve.log.read_text()
    assert "serving as h1 on mqtts://h1:***@127.0.0.1:" in log
    assert PASSWORDS["h1"] not in log


def test_a_controller_with_a_wrong_password_gives_up_with_one_line(secured: Secured) -> None:
    work = secured.work / "wrong"  # a log and a state directory of its own
    work.mkdir(exist_ok=True)
    serve = Serve(
        work, secured.url_with("h1", "not-the-password"), "h1",
        env={"QMPNET_MQTT__CA_FILE": str(secured.ca), "QMPNET_MQTT__MAX_REFUSALS": "2"},
        protocol=secured.mode.protocol,
    ).start()  # fmt: skip
    try:
        assert serve.wait(30) == 1, serve.describe()
    finally:
        serve.kill()
    lines = serve.log.read_text().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert errors[0].startswith("error: guest_unavailable: cannot connect to the broker at mqtts://h1:***@")
    assert "the broker refused our credentials" in errors[0]
    assert "not-the-password" not in serve.log.read_text()


def test_the_cli_with_a_wrong_password_prints_one_line_without_it(secured: Secured) -> None:
    argv = [sys.executable, "-m", "qmpnet", "nic", "list", "--broker", secured.url_with("orchestrator", "nope-nope"),
            "--controller", "h1", "--guest", "vm1", "--mqtt-protocol", secured.mode.protocol]  # fmt: skip
    env = {**os.environ, "QMPNET_MQTT__CA_FILE": str(secured.ca)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: guest_unavailable: cannot connect to the broker at mqtts://orchestrator:***@")
    assert "nope-nope" not in done.stderr + done.stdout


async def test_contrib_rabbitmq_permissions_let_each_party_do_only_its_part(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """contrib/rabbitmq/permissions.sh on a real node: the controller serves, the orchestrator drives, the viewer
    cannot get a request through (RabbitMQ closes its connection), and nobody needs anonymous access."""
    node: RabbitMQ = request.getfixturevalue("rabbitmq")
    suffix = uuid.uuid4().hex[:6]
    users = {"controller": f"acl{suffix}", "orchestrator": f"orch{suffix}", "viewer": f"view{suffix}"}
    secrets = {name: f"pw-{name}-{suffix}" for name in users.values()}
    wrapper = tmp_path / "rabbitmqctl"
    exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in node.env.items() if key.isupper())
    wrapper.write_text(f"#!/bin/sh\n{exports}exec {RABBITMQ_BIN / 'rabbitmqctl'} -n {node.node} \"$@\"\n")
    wrapper.chmod(0o755)
    script = CONTRIB.parent / "rabbitmq" / "permissions.sh"
    answers = "".join(f"{secrets[name]}\n" for name in users.values())
    await asyncio.to_thread(
        subprocess.run, ["sh", str(script), *users.values()], input=answers, text=True, check=True,
        capture_output=True, env={**os.environ, "RABBITMQCTL": str(wrapper)}, timeout=120,
    )  # fmt: skip
    controller, orchestrator, viewer = users.values()
    url = node.url.replace("mqtt://", f"mqtt://{controller}:{secrets[controller]}@")
    vm = Qemu(tmp_path / "vm.qmp")
    serve = Serve(tmp_path, url, controller, {"vm": vm.qmp})  # topic root "qmpnet", as the script expects
    try:
        vm.start()
        serve.start()
        creds: dict[str, Any] = {"username": orchestrator, "password": secrets[orchestrator], "protocol": 3}
        await wait_online(serve, node.url, guests_connected=["vm"], **creds)
        settings = MqttSettings.model_validate({"broker": node.url, "username": orchestrator,
                                                "password": secrets[orchestrator]})  # fmt: skip
        async with Client(settings=settings, timeout=10) as client:
            assert (await client.add_nic(controller, "vm", {"id": "allowed"})).id == "allowed"
            async with Probe(node.url, protocol=3, username=viewer, password=secrets[viewer]) as view:
                await view.subscribe(f"qmpnet/{controller}/status")  # reading is allowed
                await view.one(f"qmpnet/{controller}/status")
                evil = {"nic": {"id": "evil"}}
                with pytest.raises(aiomqtt.MqttError):  # RabbitMQ closes a connection whose publish it refuses
                    await view.publish(f"qmpnet/{controller}/guest/vm/request/nic/add", evil, timeout=3)
            assert [n.id for n in await client.list_nics(controller, "vm")] == ["allowed"]
        assert serve.running, serve.describe()
    finally:
        serve.stop()
        vm.stop()
        for name in users.values():
            node.ctl("delete_user", name)
