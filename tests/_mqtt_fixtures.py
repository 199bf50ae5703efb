"""Fixtures for a real mosquitto broker on 127.0.0.1, started per test from a config in tmp.

``mosquitto`` is a running broker with anonymous access; ``start_mosquitto(...)`` starts more
(persistence, a password file, a TLS listener). Each is a :class:`Broker` that can be stopped,
started and restarted on the same port, with small synchronous helpers to publish and watch.
``tcp_proxy`` puts a severable TCP hop in front of a broker, to drop a client's connection
abruptly (no DISCONNECT) as a network failure would.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import queue
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from _ports import free_port as _free_port

__all__ = [
    "Broker",
    "StartMosquitto",
    "TcpProxy",
    "Watcher",
    "mosquitto",
    "start_mosquitto",
    "tcp_proxy",
]

_STARTUP_TIMEOUT = 5.0


def _mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(
        "mosquitto not found (neither on PATH nor /usr/sbin/mosquitto): the MQTT tests need a "
        "real broker; install it with `apt-get install mosquitto mosquitto-clients`"
    )


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _make_certificates(directory: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    days = ["-days", "2"]
    commands = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, *days,
         "-subj", "/CN=ca"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
         "-out", crt, *days, "-extfile", ext],
    ]  # fmt: skip
    for command in commands:
        subprocess.run([str(c) for c in command], check=True, capture_output=True)
    return {"ca": ca_crt, "cert": crt, "key": key}


@dataclass
class Broker:
    """One mosquitto process and its config; ``start``/``stop``/``restart`` keep the ports."""

    directory: Path
    port: int
    tls_port: int | None = None
    persistence: bool = False
    users: dict[str, str] = field(default_factory=dict)
    certificates: dict[str, Path] = field(default_factory=dict)
    host: str = "127.0.0.1"
    _process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None, "started without tls=True"
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def conf(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def log_text(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def write_conf(self) -> None:
        lines = [
            # As root, mosquitto would drop to user "mosquitto", who cannot write into tmp.
            f"user {getpass.getuser()}",
            "per_listener_settings false",
            f"allow_anonymous {'false' if self.users else 'true'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.directory}/",
            "log_type all",
            f"listener {self.port} {self.host}",
        ]
        if self.users:
            passwd = self.directory / "passwd"
            passwd.unlink(missing_ok=True)
            for name, password in self.users.items():
                create = ["-c"] if not passwd.exists() else []
                subprocess.run(
                    ["mosquitto_passwd", *create, "-b", str(passwd), name, password],
                    check=True,
                    capture_output=True,
                )
            lines.insert(3, f"password_file {passwd}")
        if self.tls_port is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.certificates['ca']}",
                f"certfile {self.certificates['cert']}",
                f"keyfile {self.certificates['key']}",
            ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        assert self._process is None, "already running"
        self._log = (self.directory / "mosquitto.log").open("ab")
        self._process = subprocess.Popen(
            [_mosquitto_binary(), "-c", str(self.conf)], stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        ports = [self.port] + ([self.tls_port] if self.tls_port is not None else [])
        while not all(_accepts(p) for p in ports):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mosquitto did not start on {ports}:\n{self.log_text}")
            time.sleep(0.01)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker (SIGTERM saves a persistent database; SIGKILL does not)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Publish one message and wait for the broker's ack (blocking; a test helper)."""
        client = self._client("pub")
        properties = None
        if user_properties:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = list(user_properties)
        client.connect(self.host, self.port)
        client.loop_start()
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            info.wait_for_publish(5)
        finally:
            client.disconnect()
            client.loop_stop()

    def watch(self, topic: str) -> Watcher:
        """A subscriber on its own thread; use as a context manager."""
        return Watcher(self, topic)

    def _client(self, role: str) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{role}-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if self.users:
            name, password = next(iter(self.users.items()))
            client.username_pw_set(name, password)
        return client


class Watcher:
    """Collects the messages on a topic filter (retained ones included) from a paho thread."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self._messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._client = broker._client("watch")
        self._subscribed = queue.Queue[bool]()
        self._client.on_message = lambda client, userdata, message: self._messages.put(message)
        self._client.on_subscribe = lambda *args: self._subscribed.put(True)
        self._broker = broker
        self._topic = topic

    def __enter__(self) -> Watcher:
        self._client.connect(self._broker.host, self._broker.port)
        self._client.loop_start()
        self._client.subscribe(self._topic, qos=1)
        self._subscribed.get(timeout=5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    async def next(self, timeout: float = 5.0) -> paho.MQTTMessage:
        """The next message; fails the test after ``timeout`` seconds without one."""
        try:
            return await asyncio.to_thread(self._messages.get, True, timeout)
        except queue.Empty:
            pytest.fail(f"no message on {self._topic!r} within {timeout} s")


StartMosquitto = Callable[..., Broker]


@pytest.fixture
def start_mosquitto(tmp_path: Path) -> Iterator[StartMosquitto]:
    """``start_mosquitto(persistence=False, users={name: password}, tls=False)`` -> a running
    broker on free 127.0.0.1 ports, stopped after the test."""
    brokers: list[Broker] = []

    def start(
        *, persistence: bool = False, users: dict[str, str] | None = None, tls: bool = False
    ) -> Broker:
        if users and shutil.which("mosquitto_passwd") is None:
            pytest.skip("mosquitto_passwd is not installed")
        directory = tmp_path / f"mosquitto-{len(brokers)}"
        directory.mkdir()
        broker = Broker(
            directory,
            _free_port(),
            tls_port=_free_port() if tls else None,
            persistence=persistence,
            users=dict(users or {}),
            certificates=_make_certificates(directory) if tls else {},
        )
        broker.write_conf()
        brokers.append(broker)
        broker.start()
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(start_mosquitto: StartMosquitto) -> Broker:
    """A running mosquitto with anonymous access and no persistence."""
    return start_mosquitto()


class TcpProxy:
    """A TCP hop to ``target_port`` whose connections :meth:`sever` aborts (RST, no DISCONNECT)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def sever(self) -> None:
        """Abort every connection through the proxy, both ways."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink, (writer, up_writer)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        for writer in pair:
            writer.transport.abort()
            self._writers.discard(writer)


@pytest.fixture
async def tcp_proxy() -> AsyncIterator[Callable[[int], Awaitable[TcpProxy]]]:
    """``proxy = await tcp_proxy(broker.port)``: a running proxy, closed after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(port: int) -> TcpProxy:
            return await stack.enter_async_context(TcpProxy(port))

        yield make
