"""The configuration: pydantic models of ``phonepush.toml`` and :func:`load_config`.

Sources, lowest priority first: the TOML file, then environment variables named ``PHONEPUSH_``
plus the key path joined with ``__`` (``PHONEPUSH_MQTT__PASSWORD``, ``PHONEPUSH_WEBHOOK__TOKEN``,
``PHONEPUSH_SERVER__LISTEN``). Every secret may instead be read from a file (``password_file``,
``token_file``, ``hmac_secret_file``); a relative file name is looked up in
``$CREDENTIALS_DIRECTORY`` first (systemd ``LoadCredential=``), then next to the config file.
Setting a secret in the environment overrides both the value and the file given in TOML.

Everything is checked at start-up and every problem is reported at once, one line each, naming
where it is: ``rules[doorbell].when: ...``, ``phones[office].host: Invalid port: 99999``. Secret
values never appear in messages or in ``repr``, nor does the user information or a query value
of any URL a message quotes (:func:`phonepush.redact.url_for_log`). Unknown keys are errors, so a
typo cannot silently switch a feature off.

Choices made here:

* ``server.public_url`` defaults to ``http://<listen>``; a wildcard listen address
  (``0.0.0.0``, ``::``) needs an explicit one, since phones cannot fetch pages from it.
* Listening on a non-loopback address requires ``webhook.token``: ``/hooks/*`` would otherwise
  let anyone on the network make desk phones ring.
* Paths (spool, certificates) are used as written; only secret files are resolved as above.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from phonepush.config.quiet_hours import QuietHoursConfig, parse_zone
from phonepush.config.timetable import Timetable, parse_cron
from phonepush.errors import ConfigError, InvalidTarget, WireError
from phonepush.redact import url_for_log
from phonepush.templates import Templates
from phonepush.wire.target import PhoneTarget, parse_host
from phonepush.wire.uri import is_http, parse_priority, parse_target, validate_uri

__all__ = [
    "DEFAULT_KEEP_HEADERS",
    "ENV_PREFIX",
    "RESERVED_RULE_KEYS",
    "AckConfig",
    "ActionConfig",
    "ActionMqttConfig",
    "ActionWebhookConfig",
    "AudioConfig",
    "AuthUserConfig",
    "AuthenticationConfig",
    "ClusterConfig",
    "Config",
    "DispatchConfig",
    "EscalateConfig",
    "HomeAssistantConfig",
    "LogConfig",
    "MessageConfig",
    "MqttConfig",
    "PhoneConfig",
    "RuleAudioConfig",
    "RuleConfig",
    "ScheduleConfig",
    "ServerConfig",
    "SpoolConfig",
    "WebhookConfig",
    "discovery_id",
    "format_duration",
    "is_template",
    "load_config",
    "parse_config",
    "parse_duration",
    "split_priority",
    "validate_topic_filter",
]

ENV_PREFIX: Final = "PHONEPUSH_"

#: Rule keys that later versions will add. Until they are implemented they are refused with a
#: message saying so, instead of the generic unknown-key error, and never silently ignored.
RESERVED_RULE_KEYS: Final = frozenset[str]()

_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")
#: Home Assistant's grammar for the node and object ids of a discovery topic.
_DISCOVERY_ID: Final = re.compile(r"[A-Za-z0-9_-]+")
_DURATION: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)?\s*")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_PRIORITY_SUFFIX: Final = re.compile(r"@([^@{}]*)\Z")
_MQTT_MAX_TOPIC_BYTES: Final = 65535
#: The largest remaining length an MQTT packet can declare (four length bytes).
_MQTT_MAX_PACKET: Final = 268_435_455
#: Request headers a webhook event keeps in the spool by default: what tells a sender's events
#: apart, nothing that can carry a credential.
DEFAULT_KEEP_HEADERS: Final = (
    "content-type",
    "user-agent",
    "x-github-event",
    "x-github-delivery",
    "x-gitlab-event",
    "x-event-key",
    "x-request-id",
)
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


# --- value types --------------------------------------------------------------------------------


def parse_duration(value: object) -> float:
    """``"500ms"``, ``"15s"``, ``"5m"``, ``"1h"``, ``"1d"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 15s, 5m, 1h, 1d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 500ms, 15s, 5m, 1h, 1d")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError("a duration must be a finite number of seconds >= 0")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest of the forms :func:`parse_duration` reads that says ``seconds`` exactly."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    millis = round(seconds * 1000)
    if abs(millis / 1000 - seconds) < 1e-9:
        return f"{millis}ms"
    return f"{seconds!r}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be more than 0s")
    return seconds


#: A duration that must be more than zero (timeouts, TTLs, windows).
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]


def _some_targets(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("name at least one phone, group or 'all'")
    return value


#: Who a page goes to (a rule's, an escalation's or a schedule's ``to``): phone names, group
#: names or ``all``; one name alone is taken as a list of one.
Targets = Annotated[
    list[str],
    BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
    AfterValidator(_some_targets),
]


def _empty_to_none(value: object) -> object:
    return None if value == "" else value


OptionalPath = Annotated[str | None, BeforeValidator(_empty_to_none)]


def is_template(source: str) -> bool:
    """True if ``source`` holds Jinja2 syntax (a literal is checked once, at start-up)."""
    return "{{" in source or "{%" in source or "{#" in source


def split_priority(entry: str) -> tuple[str, int | None]:
    """Split an ``execute`` entry into its URL (maybe a template) and its ``@PRIORITY``.

    The suffix is taken from the configured text, never from rendered event data, so an event
    cannot choose a priority. As in the reference client, the last ``@`` starts the priority
    when what follows it is not template syntax; ``None`` means "the rule's priority".
    """
    m = _PRIORITY_SUFFIX.search(entry)
    if m is None:
        return entry, None
    text = m.group(1)
    if not text.isdigit() and "/" in text:
        # "http://user@host/path": the @ belongs to the URL, not to a priority.
        return entry, None
    return entry[: m.start()], parse_priority(text)


def validate_topic_filter(topic_filter: str) -> str:
    """Check an MQTT topic filter: ``+`` and ``#`` fill whole levels, ``#`` only last."""
    if not topic_filter:
        raise ValueError("an MQTT topic filter cannot be empty")
    if len(topic_filter.encode("utf-8")) > _MQTT_MAX_TOPIC_BYTES:
        raise ValueError("an MQTT topic filter is at most 65535 bytes")
    if "\x00" in topic_filter:
        raise ValueError("an MQTT topic filter cannot hold NUL")
    if topic_filter.startswith("$share/"):
        raise ValueError("shared subscriptions are set with mqtt.share_group, not in a rule")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be a whole level and the last one: {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r}")
    return topic_filter


def _validate_topic_name(topic: str) -> str:
    if topic and ("+" in topic or "#" in topic or "\x00" in topic):
        raise ValueError("a topic to publish to cannot hold '+', '#' or NUL")
    return topic


#: Tokens printed in our examples and docs, refused on anything but loopback.
PLACEHOLDER_TOKENS: Final = frozenset({"change-me", "demo-token"})


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"Invalid port: {port}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host, port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    return value.rstrip("/")


# --- sections -----------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    """``[server]``: the daemon's own HTTP side (hooks, metrics, health, pages for phones)."""

    listen: str = "127.0.0.1:8080"
    public_url: str = ""
    max_body: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)
    #: Concurrent connections served; beyond it new requests get 503 instead of queueing.
    #: At the limit a new connection closes the longest-idle one (no request in progress).
    max_connections: int = Field(default=1000, ge=1, le=100_000)
    #: A connection whose request head is not complete this long after it opened (on a kept-alive
    #: connection: after the next request's first byte) is closed: slow or silent clients.
    header_timeout: PositiveDuration = 10.0
    #: An idle keep-alive connection is closed this long after its last response.
    keepalive_timeout: PositiveDuration = 15.0
    #: Reverse proxies (addresses or networks) whose ``X-Forwarded-For``/``-Proto`` are
    #: believed. Empty: those headers are ignored and the client is the TCP peer.
    trusted_proxies: list[str] = Field(default_factory=list)

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        networks = []
        for entry in value:
            try:
                networks.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (e.g. 10.0.0.5, 10.0.0.0/8)"
                ) from None
        return networks

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        _split_listen(value)
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        return _check_http_url(value) if value else value

    @model_validator(mode="after")
    def _default_public_url(self) -> ServerConfig:
        if not self.public_url:
            host, _ = self.address
            if _is_wildcard(host):
                raise ValueError(
                    "public_url: required when listening on a wildcard address (phones fetch "
                    "pages from it)"
                )
            object.__setattr__(self, "public_url", f"http://{self.listen}")
        return self

    @property
    def address(self) -> tuple[str, int]:
        """``listen`` as (host, port); IPv6 brackets removed."""
        return _split_listen(self.listen)


class SpoolConfig(_Section):
    """``[spool]``: the store accepted events wait in: an SQLite file (``path``, the default) or
    a PostgreSQL database (``url``)."""

    path: Path = Path("/var/lib/phonepush/spool.db")
    #: A PostgreSQL database to keep everything in instead of the SQLite file at ``path``
    #: (``postgresql://USER@HOST[:PORT]/DATABASE``, libpq's URL: ``?sslmode=verify-full`` and
    #: the like work too). Needs ``pip install 'phonepush[postgres]'``. The password goes in
    #: ``password`` or ``password_file``, never in the URL. Not together with ``path``.
    url: str = ""
    password: SecretStr | None = None
    password_file: str | None = None
    #: With ``url``: how many connections to the database are open at most.
    pool_size: int = Field(default=10, ge=1, le=1000)
    max_pending: int = Field(default=100_000, ge=1)
    synchronous: Literal["normal", "full"] = "normal"
    #: How long finished events (every delivery done), their deliveries and pages are kept for
    #: status queries before they are purged.
    retention: PositiveDuration = 7 * 86400.0
    #: Largest size of the spool database's pages in use, in bytes (the write-ahead log adds a
    #: few MiB between checkpoints). Past it the oldest finished events are purged first; if
    #: pending work alone fills it, events are refused (503, MQTT left unacknowledged) until
    #: deliveries finish. At least 1 MiB.
    max_size: int = Field(default=1 << 30, ge=1 << 20)
    #: Open ``path`` even when it, or the folder it is in, is a symbolic link. Off, such a path
    #: is refused at start-up: a link planted there would make the daemon write where it points.
    #: The folder systemd made for the service is taken all the same (``$STATE_DIRECTORY``: under
    #: ``DynamicUser=`` a root-owned link to ``private/<name>`` that only root could have made).
    follow_symlinks: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value:
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            # Not urllib's message: it may quote the text after a ":", a password.
            raise ValueError(
                "not a valid URL (expected postgresql:// with the user, host, port and database)"
            ) from None
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("only PostgreSQL is supported (a postgresql:// URL)")
        if parts.password is not None:
            # Said without echoing the URL: it holds a password.
            raise ValueError(
                "put the password in spool.password or spool.password_file, not the URL"
            )
        return value


class MqttConfig(_Section):
    """``[mqtt]``: the broker to take events from. Without the section there is no MQTT source."""

    url: str
    username: str = ""
    password: SecretStr | None = None
    password_file: str | None = None
    client_id: str = Field(default_factory=lambda: f"phonepush-{socket.gethostname()}")
    share_group: str = ""
    ca_file: OptionalPath = None
    cert_file: OptionalPath = None
    key_file: OptionalPath = None
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(str)] = "5"
    keepalive: int = Field(default=60, ge=5, le=65535)
    session_expiry: int = Field(default=86400, ge=0, le=0xFFFFFFFF)
    receive_maximum: int = Field(default=100, ge=1, le=65535)
    qos: Literal[0, 1, 2] = 1
    status_topic: str = "phonepush/status"
    outcome_topic: str = ""
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 60.0
    #: Largest MQTT payload taken, in bytes. Larger messages are acknowledged and dropped unread,
    #: counted in ``phonepush_events_rejected_total{reason="too_large"}`` and logged once per topic
    #: a minute; MQTT 5 also asks the broker (Maximum Packet Size) not to send packets over 16
    #: times this (at least 1 MiB), which the broker then drops itself.
    max_payload: int = Field(default=65536, ge=1, le=_MQTT_MAX_PACKET)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            # Not urllib's message: it quotes the text after the last ":", which in a mistyped
            # "mqtt://user:password" is the password.
            raise ValueError("not a valid URL (expected mqtt[s]://HOST[:PORT])") from None
        if parts.username is not None or parts.password is not None:
            # Said without echoing the URL: it holds a password.
            raise ValueError("put credentials in mqtt.username and mqtt.password, not the URL")
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"expected mqtt:// or mqtts://, got {parts.scheme or 'no'} scheme")
        if not parts.hostname:
            raise ValueError("the URL names no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("expected mqtt[s]://HOST[:PORT] with nothing after it")
        if port == 0:
            raise ValueError("Invalid port: 0")
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if not value or len(value.encode("utf-8")) > 65535:
            raise ValueError("must be 1-65535 bytes")
        return value

    @field_validator("share_group")
    @classmethod
    def _share_group(cls, value: str) -> str:
        if value and not _NAME.fullmatch(value):
            raise ValueError("a share group name is letters, digits, '_', '.', '-'")
        return value

    @field_validator("status_topic", "outcome_topic")
    @classmethod
    def _topics(cls, value: str) -> str:
        return _validate_topic_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min: must not exceed reconnect_max")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file: a client certificate needs both cert_file and key_file")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def endpoint(self) -> str:
        """``mqtt[s]://host:port``, safe to print and log."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


class WebhookConfig(_Section):
    """``[webhook]``: the ``POST /hooks/<name>`` side."""

    token: SecretStr | None = None
    token_file: str | None = None
    hmac_secret: SecretStr | None = None
    hmac_secret_file: str | None = None
    #: Accept hooks without a token. Only on a loopback listen address, and only when asked for:
    #: a reverse proxy on the same host would otherwise open the phones to whoever reaches it.
    allow_anonymous: bool = False
    #: Request headers stored with a webhook event (names, any case). Rules see every header
    #: but the credentials (``Authorization``, ``Cookie``, the signature); the spool keeps only
    #: these, so a custom credential header (``X-Api-Key``, ``X-Gitlab-Token``) is not kept for
    #: the retention time.
    keep_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_HEADERS))

    @field_validator("keep_headers")
    @classmethod
    def _keep_headers(cls, value: list[str]) -> list[str]:
        names = [name.strip().lower() for name in value]
        for name in names:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"not an HTTP header name: {name!r}")
        return list(dict.fromkeys(names))


class PhoneConfig(_Section):
    """One ``[[phones]]`` entry."""

    name: str
    host: str
    scheme: Literal["http", "https"] | None = None
    username: str = ""
    password: SecretStr | None = None
    password_file: str | None = None
    certificate: OptionalPath = None
    ca_file: OptionalPath = None
    timeout: PositiveDuration = 10.0
    groups: list[str] = Field(default_factory=list)
    quiet_hours: QuietHoursConfig | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("a phone name is letters, digits, '_', '.', '-'")
        if value == "all":
            raise ValueError("'all' is reserved (it means every phone)")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if "@" in value:
            # Said without echoing the value: "user:password@host" holds a password.
            raise ValueError(
                "HOST[:PORT] only: put credentials in username and password (or password_file)"
            )
        try:
            parse_host(value)
        except InvalidTarget as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        for group in value:
            if not _NAME.fullmatch(group):
                raise ValueError(f"a group name is letters, digits, '_', '.', '-': {group!r}")
            if group == "all":
                raise ValueError("'all' is reserved (it means every phone)")
        return value

    @model_validator(mode="after")
    def _scheme(self) -> PhoneConfig:
        pinned = self.certificate is not None or self.ca_file is not None
        if self.scheme is None:
            object.__setattr__(self, "scheme", "https" if pinned else "http")
        elif self.scheme == "http" and pinned:
            raise ValueError("scheme: certificate and ca_file need https")
        return self


class MessageConfig(_Section):
    """A rule's ``message``: the text page phones fetch (templates)."""

    title: str = ""
    text: str = ""
    prompt: str = ""


class BackgroundConfig(_Section):
    """A rule's ``background``: icon and image URLs (templates)."""

    icon: str
    image: str


def _check_rtp_port(value: int) -> int:
    if value % 2 or not 20480 <= value <= 32768:
        raise ValueError("an RTP port phones take is even, 20480-32768")
    return value


class RuleAudioConfig(_Section):
    """A rule's ``audio``: an announcement streamed to the rule's phones over RTP
    (:mod:`phonepush.announce`). ``say`` is a template spoken by text-to-speech; ``file`` a WAV
    or raw µ-law file (relative to the config file's directory), loaded at start-up."""

    say: str = ""
    file: str = ""
    chime: str = ""
    #: ``GROUP:PORT`` for one multicast stream to every phone; unicast when empty.
    multicast: str = ""
    #: Router hops the multicast stream may cross (IP TTL); unset: ``[audio] multicast_ttl``.
    multicast_ttl: int | None = Field(default=None, ge=1, le=255)
    volume: int | None = Field(default=None, ge=0, le=100)
    repeat: int = Field(default=1, ge=1, le=10)

    @field_validator("multicast")
    @classmethod
    def _multicast(cls, value: str) -> str:
        if not value:
            return value
        group, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError("expected GROUP:PORT, such as 239.10.0.1:20480")
        try:
            validate_uri(f"RTPMRx:{group}:{int(port)}")
        except WireError as exc:
            raise ValueError(str(exc).replace("RTPMRx:", "")) from None
        return value

    @model_validator(mode="after")
    def _source(self) -> RuleAudioConfig:
        if bool(self.say.strip()) == bool(self.file):
            raise ValueError("give either say (text to speak) or file (a recording), not both")
        return self

    @property
    def group(self) -> tuple[str, int] | None:
        """``multicast`` as (group, port), or None for unicast."""
        if not self.multicast:
            return None
        group, _, port = self.multicast.rpartition(":")
        return group, int(port)


class EscalateConfig(_Section):
    """A rule's ``escalate``: after ``after`` unacknowledged rounds, repeats also go to ``to``."""

    after: int = Field(ge=1, le=1000)
    to: Targets


#: The HTTP methods an action's webhook may use.
ActionMethod = Literal["POST", "PUT", "PATCH", "GET", "DELETE"]


class ActionMqttConfig(_Section):
    """An action's ``mqtt = { topic, payload, qos, retain }``: published on the daemon's own
    connection. ``topic`` and ``payload`` are templates."""

    topic: str = Field(min_length=1)
    payload: str = ""
    qos: Literal[0, 1, 2] = 1
    retain: bool = False

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not is_template(value) and ("+" in value or "#" in value or "\0" in value):
            raise ValueError("a topic to publish to cannot hold '+', '#' or NUL")
        return value


class ActionWebhookConfig(_Section):
    """An action's ``webhook = { url, method, body, headers }``; ``url`` and ``body`` are
    templates."""

    url: str
    method: ActionMethod = "POST"
    body: str = ""
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not is_template(value) and not is_http(value):
            raise ValueError("must be an http:// or https:// URL")
        return value


class ActionConfig(_Section):
    """One entry of a rule's ``actions``: a softkey on its page that does something."""

    label: str = Field(min_length=1, max_length=32)
    confirm: bool = False
    repeatable: bool = False
    mqtt: ActionMqttConfig | None = None
    webhook: ActionWebhookConfig | None = None
    dial: str = ""

    @field_validator("dial")
    @classmethod
    def _dial(cls, value: str) -> str:
        if value:
            try:
                validate_uri(f"Dial:{value}")
            except WireError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ActionConfig:
        given = [k for k in ("mqtt", "webhook", "dial") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of mqtt, webhook or dial"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def kind(self) -> Literal["mqtt", "webhook", "dial"]:
        return (
            "mqtt" if self.mqtt is not None else "webhook" if self.webhook is not None else "dial"
        )


class RuleConfig(_Section):
    """One ``[[rules]]`` entry. Template checks happen in :class:`phonepush.rules.RuleSet`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str
    on: str
    when: str = ""
    to: Targets
    execute: list[str] = Field(default_factory=list)
    priority: int = Field(default=0, ge=0, le=2)
    message: MessageConfig | None = None
    background: BackgroundConfig | None = None
    ringtone: str = ""
    dedupe: str = ""
    cooldown: Duration | None = None
    ttl: PositiveDuration = 300.0
    # Send again a request that was written but got no answer (docs/design.md, "Delivery
    # guarantees"): only for content that does no harm twice (Display:, text pages).
    retry_unconfirmed: bool = False
    # Acknowledgements and repeats (docs/design.md, "Acknowledgements and repeats").
    repeat: Duration | None = None
    max_repeats: int | None = Field(default=None, ge=1, le=1000)
    escalate: EscalateConfig | None = None
    resolve_when: str = ""
    ack: bool | None = None
    ack_scope: Literal["any", "phone"] = "any"
    # Grouping and quiet hours (docs/design.md, "Grouping, silences and quiet hours").
    group_by: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = (
        Field(default_factory=list)
    )
    group_wait: Duration | None = None
    quiet_hours: QuietHoursConfig | None = None
    # Audio paging (docs/design.md, "Audio paging").
    audio: RuleAudioConfig | None = None
    # Softkeys that act (docs/design.md, "Actions").
    actions: list[ActionConfig] = Field(default_factory=list, max_length=4)
    action_ttl: PositiveDuration = 300.0

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("a rule name is letters, digits, '_', '.', '-'")
        return value

    @field_validator("on")
    @classmethod
    def _on(cls, value: str) -> str:
        source, sep, pattern = value.partition(":")
        # "schedule:<name>" is what a [[schedules]] entry's own rule listens on (never written
        # in [[rules]]: ScheduleConfig.rule() builds it).
        if not sep or source not in ("mqtt", "webhook"):
            raise ValueError("expected mqtt:<topic filter> or webhook:<name>")
        if source == "mqtt":
            validate_topic_filter(pattern)
        elif not _NAME.fullmatch(pattern):
            raise ValueError("a webhook name is letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _something_to_send(self) -> RuleConfig:
        if not (self.execute or self.message or self.background or self.ringtone or self.audio):
            raise ValueError(
                "nothing to send: give execute, message, background, ringtone or audio"
            )
        return self

    @model_validator(mode="after")
    def _audio(self) -> RuleConfig:
        # An announcement is live and played once; a group's page or a repeat would need it
        # replayed later, which is exactly what an audio page must not do.
        if self.audio is not None and (self.grouped or self.repeat is not None):
            raise ValueError("audio: a rule with audio cannot also group_by/group_wait or repeat")
        return self

    @model_validator(mode="after")
    def _grouping(self) -> RuleConfig:
        if self.group_wait is not None and self.group_wait <= 0:
            raise ValueError("group_wait: must be more than 0s (leave it out to page each event)")
        if self.grouped and (self.repeat is not None or self.ack or self.resolve_when.strip()):
            raise ValueError(
                "group_by: a grouping rule cannot also repeat, ask for acks or resolve"
                " (a group's page has no single event to follow up on)"
            )
        return self

    @property
    def grouped(self) -> bool:
        """Whether events are collected into one page per ``group_wait`` window."""
        return bool(self.group_by) or self.group_wait is not None

    @property
    def group_window(self) -> float:
        """``group_wait``, 30 s when only ``group_by`` is given (Alertmanager's default)."""
        return 30.0 if self.group_wait is None else self.group_wait

    @model_validator(mode="after")
    def _repeats(self) -> RuleConfig:
        if self.repeat is not None and self.repeat <= 0:
            raise ValueError("repeat: must be more than 0s")
        if self.repeat is None and self.max_repeats is not None:
            raise ValueError("max_repeats: needs repeat")
        if self.escalate is not None:
            if self.repeat is None:
                raise ValueError("escalate: needs repeat (escalation happens on a repeat)")
            if self.escalate.after > self.repeats:
                raise ValueError(
                    f"escalate: after ({self.escalate.after}) is more than max_repeats"
                    f" ({self.repeats}), so it would never happen"
                )
        if self.ack and self.message is None:
            raise ValueError("ack: needs a message (the Ack softkey is on the page)")
        return self

    @model_validator(mode="after")
    def _actions(self) -> RuleConfig:
        if self.actions and self.message is None:
            raise ValueError("actions: needs a message (the softkeys are on the page)")
        if self.actions and self.grouped:
            raise ValueError(
                "actions: a grouping rule cannot have actions (a group's page has no single"
                " event to act on)"
            )
        return self

    @property
    def repeats(self) -> int:
        """How many times an unacknowledged page is pushed again (0 without ``repeat``)."""
        if self.repeat is None:
            return 0
        return 5 if self.max_repeats is None else self.max_repeats

    @property
    def acked(self) -> bool:
        """Whether pages carry Ack/Close softkeys: ``ack``, by default on for repeating pages."""
        if self.ack is not None:
            return self.ack
        return self.repeat is not None and self.message is not None

    @property
    def source(self) -> Literal["mqtt", "webhook", "schedule"]:
        if self.on.startswith("schedule:"):
            return "schedule"
        return "mqtt" if self.on.startswith("mqtt:") else "webhook"

    @property
    def pattern(self) -> str:
        return self.on.partition(":")[2]


class ScheduleConfig(_Section):
    """One ``[[schedules]]`` entry: a page on a timetable (docs/design.md, "Schedules").

    Each entry becomes an ordinary rule of the same name listening on ``schedule:<name>``, so
    its firings go through the pipeline (spool, silences, quiet hours, metrics) like any event.
    """

    #: Unique among schedules and rules; the event's topic, and the name of the schedule's rule
    #: (in metrics, silences and `/api/events`).
    name: str
    #: A 5-field cron expression (minute hour day month weekday) read in `timezone`'s local
    #: time, e.g. `"0 8 * * 1-5"`. Give `cron` or `every`.
    cron: str = ""
    #: A fixed interval (at least 1s), counted from the Unix epoch: `"30m"` fires at :00 and :30.
    every: Duration | None = None
    #: IANA time zone `cron` is read in (required with `cron`), e.g. `"Europe/Berlin"`.
    timezone: str = ""
    #: A firing missed while the daemon was down is made up once at start if at most this old;
    #: 0: skipped (logged).
    catch_up: Duration = 0.0
    #: Phones, groups or `all`, as a rule's `to`.
    to: Targets
    #: As a rule's `execute` (templates; the event's payload holds `name` and `scheduled_at`).
    execute: list[str] = Field(default_factory=list)
    #: As a rule's `priority`.
    priority: int = Field(default=0, ge=0, le=2)
    message: MessageConfig | None = None
    audio: RuleAudioConfig | None = None
    #: As a rule's `ttl`.
    ttl: PositiveDuration = 300.0
    quiet_hours: QuietHoursConfig | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("a schedule name is letters, digits, '_', '.', '-'")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return parse_cron(value) if value.strip() else value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        if value:
            parse_zone(value)
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: float | None) -> float | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1s")
        return value

    @model_validator(mode="after")
    def _when(self) -> ScheduleConfig:
        if bool(self.cron.strip()) == (self.every is not None):
            raise ValueError("cron: give cron or every, exactly one of them")
        if self.cron.strip() and not self.timezone:
            raise ValueError(
                "timezone: required with cron (an IANA name such as Europe/Berlin: the"
                " expression is read in that zone's local time)"
            )
        if not (self.execute or self.message or self.audio):
            raise ValueError("to: nothing to send: give execute, message or audio")
        return self

    @property
    def timetable(self) -> Timetable:
        if self.every is not None:
            return Timetable(every=self.every)
        return Timetable(cron=self.cron, zone=parse_zone(self.timezone))

    def rule(self) -> RuleConfig:
        """The rule this schedule pages through: its output keys, listening on its events."""
        # Every field was validated here with the type RuleConfig gives it.
        return RuleConfig.model_construct(
            name=self.name,
            on=f"schedule:{self.name}",
            to=list(self.to),
            execute=list(self.execute),
            priority=self.priority,
            message=self.message,
            audio=self.audio,
            ttl=self.ttl,
            quiet_hours=self.quiet_hours,
        )


class AuthUserConfig(_Section):
    """One ``[[authentication.users]]`` entry: credentials a phone may forward to
    ``/authenticate``."""

    name: str = Field(min_length=1, max_length=255)
    password: SecretStr | None = None
    password_file: str | None = None


class AuthenticationConfig(_Section):
    """``[authentication]``: phonepush answers the phones' ``authenticationURL``
    (``/authenticate``). Without the section that route answers 404."""

    #: Also accept the ``username``/``password`` of every ``[[phones]]`` entry: the credentials
    #: phonepush itself pushes with.
    phone_credentials: bool = True
    users: list[AuthUserConfig] = Field(default_factory=list)
    #: Failures with user names nobody configured, per client address within ``failure_window``
    #: (ten times as many from all addresses together), before further unknown names are refused
    #: unexamined until the window passes. Configured users are never locked out.
    max_failures: int = Field(default=10, ge=1, le=100_000)
    failure_window: PositiveDuration = 60.0

    @field_validator("users")
    @classmethod
    def _unique(cls, value: list[AuthUserConfig]) -> list[AuthUserConfig]:
        names = [user.name for user in value]
        if duplicates := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"more than one user named {', '.join(map(repr, duplicates))}")
        return value


class AudioConfig(_Section):
    """``[audio]``: where audio pages (a rule's ``audio``) come from and go to."""

    #: The address phones are told the stream comes from (and it is sent from); default: the
    #: host of ``server.public_url``.
    address: str = ""
    #: The port phones listen on for unicast pages.
    port: int = 20480
    #: espeak-ng voice for ``say``.
    voice: str = "en"
    #: Where spoken text is cached across restarts; empty: in memory only.
    cache_dir: OptionalPath = None
    #: Router hops a rule's multicast page may cross (IP TTL); 1 keeps it on the local subnet.
    multicast_ttl: int = Field(default=1, ge=1, le=255)

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        return _check_rtp_port(value)

    @field_validator("voice")
    @classmethod
    def _voice(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_+.-]{1,64}", value):
            raise ValueError("an espeak-ng voice name is letters, digits, '_', '+', '.', '-'")
        return value


class AckConfig(_Section):
    """``[ack]``: what happens on an acknowledgement besides MQTT and metrics."""

    #: POSTed ``{rule, event, phone, at, by}`` as JSON on each acknowledgement, best effort.
    webhook: str = ""
    webhook_timeout: Duration = 5.0

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, value: str) -> str:
        return _check_http_url(value) if value else value


class DispatchConfig(_Section):
    """``[dispatch]``: how deliveries go out."""

    concurrency: int = Field(default=256, ge=1, le=100_000)
    # None: half the open-files limit at start (phonepush.app.limits.default_max_connections).
    max_connections: int | None = Field(default=None, ge=1, le=1_000_000)
    retry_initial: Duration = 1.0
    retry_max: Duration = 60.0

    @model_validator(mode="after")
    def _retry(self) -> DispatchConfig:
        if self.retry_initial <= 0:
            raise ValueError("retry_initial: must be more than 0s")
        if self.retry_initial > self.retry_max:
            raise ValueError("retry_initial: must not exceed retry_max")
        return self


class HealthConfig(_Section):
    """``[health]``: how often each phone is checked when nothing was pushed to it."""

    # 0: no probes; phones are then known only by their pushes.
    interval: Duration = 60.0

    @model_validator(mode="after")
    def _interval(self) -> HealthConfig:
        if 0 < self.interval < 1:
            raise ValueError("interval: must be 0 (off) or at least 1s")
        return self


class ClusterConfig(_Section):
    """``[cluster]``: how instances sharing one PostgreSQL store (``[spool] url``) coordinate.

    ``lease`` is how long an instance's claim on a phone's lane and on the timers stays valid
    after its last heartbeat (sent every third of it, timed by the database's clock): an instance
    that dies has its work taken over by the others once its lease has run out. A shorter lease
    means a faster takeover and more heartbeat writes. Ignored on SQLite (``[spool] path``).
    """

    lease: Duration = 10.0

    @model_validator(mode="after")
    def _lease(self) -> ClusterConfig:
        if self.lease < 1:
            raise ValueError("lease: must be at least 1s")
        return self


class HomeAssistantConfig(_Section):
    """``[homeassistant]``: phones, groups and acknowledging rules appear in Home Assistant as
    devices and entities by MQTT discovery (docs/integrations/home-assistant.md). Needs
    ``[mqtt]``.

    Each notify entity and "Test page" button becomes an ordinary rule listening on its
    command topic, named ``homeassistant.notify.<phone or group>`` and
    ``homeassistant.test.<phone>`` in metrics, silences and ``phonepush status``.
    """

    #: Publish the discovery configs (retained) and take pages from Home Assistant.
    enabled: bool = False
    #: Home Assistant's `discovery_prefix` (its MQTT integration's setting).
    discovery_prefix: str = "homeassistant"
    #: Names this daemon in discovery topics and unique ids, and is the first level of its
    #: command and state topics (`<node_id>/phone/<phone>/notify`...): letters, digits, `_`, `-`.
    node_id: str = "phonepush"
    #: The title of pages sent from Home Assistant (a notify entity's message is the text).
    title: str = "Home Assistant"
    #: Execute items pushed with each page from Home Assistant, e.g. `["Play:Chime.raw"]`.
    execute: list[str] = Field(default_factory=list)
    #: As a rule's `priority`, for pages from Home Assistant.
    priority: int = Field(default=0, ge=0, le=2)
    #: As a rule's `ttl`, for pages from Home Assistant.
    ttl: PositiveDuration = 300.0

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/"):
            raise ValueError("a topic prefix such as 'homeassistant' (no leading or trailing '/')")
        return _validate_topic_name(value)

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        # Home Assistant's discovery topic grammar: node_id is [a-zA-Z0-9_-]+.
        if not _DISCOVERY_ID.fullmatch(value):
            raise ValueError("a node id is letters, digits, '_', '-'")
        return value

    def command_topic(self, kind: Literal["phone", "group"], name: str, action: str) -> str:
        """Where Home Assistant publishes a phone's or group's command (``notify``, ``test``)."""
        return f"{self.node_id}/{kind}/{name}/{action}"

    def rules(self, phones: Iterable[str], groups: Iterable[str]) -> list[RuleConfig]:
        """The rules the notify entities and test buttons page through (none when disabled)."""
        if not self.enabled:
            return []
        # A plain-text message is taken as written; one that parses as JSON (a number, true,
        # an object) is shown as JSON rather than as Python's rendering of it.
        text = "{{ payload if payload is string else payload | tojson }}"
        made: list[RuleConfig] = []
        phones = list(phones)
        targets: list[tuple[Literal["phone", "group"], str]] = [
            *(("phone", name) for name in phones),
            *(("group", name) for name in groups),
        ]
        for kind, name in targets:
            made.append(self._rule(f"homeassistant.notify.{name}", kind, name, "notify", text))
        for name in phones:
            made.append(
                self._rule(
                    f"homeassistant.test.{name}",
                    "phone",
                    name,
                    "test",
                    f"Test page from Home Assistant to {name}.",
                )
            )
        return made

    def _rule(
        self, rule_name: str, kind: Literal["phone", "group"], name: str, action: str, text: str
    ) -> RuleConfig:
        # Every field was validated here or is ours, with the type RuleConfig gives it.
        return RuleConfig.model_construct(
            name=rule_name,
            on=f"mqtt:{self.command_topic(kind, name, action)}",
            to=[name],
            execute=list(self.execute),
            priority=self.priority,
            message=MessageConfig(title=self.title, text=text),
            ttl=self.ttl,
        )


class LogConfig(_Section):
    """``[log]``."""

    level: Annotated[
        Literal["debug", "info", "warning", "error", "critical"],
        BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
    ] = "info"
    format: Literal["text", "json"] = "text"


# --- the whole file -----------------------------------------------------------------------------


class Config(BaseSettings):
    """A validated ``phonepush.toml``. Build it with :func:`load_config` or :func:`parse_config`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    # Loading compiles every template to report its errors with the others; the rule book takes
    # them from here instead of compiling them again (one compile per load or reload).
    _templates: Templates | None = PrivateAttr(default=None)

    server: ServerConfig = Field(default_factory=ServerConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    mqtt: MqttConfig | None = None
    webhook: WebhookConfig = Field(default_factory=WebhookConfig)
    phones: list[PhoneConfig] = Field(default_factory=list)
    rules: list[RuleConfig] = Field(default_factory=list)
    schedules: list[ScheduleConfig] = Field(default_factory=list)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    ack: AckConfig = Field(default_factory=AckConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    authentication: AuthenticationConfig | None = None
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_config() merges the environment it is given itself (tests pass their own), so a
        # Config never reads os.environ behind the caller's back.
        return (init_settings,)

    @property
    def all_rules(self) -> list[RuleConfig]:
        """``rules``, then the rule of each of ``schedules``, then ``[homeassistant]``'s: what
        the rule book compiles."""
        return [
            *self.rules,
            *(schedule.rule() for schedule in self.schedules),
            *self.homeassistant_rules(),
        ]

    def homeassistant_rules(self) -> list[RuleConfig]:
        """The rules of ``[homeassistant]``'s notify entities and buttons (none when off)."""
        return self.homeassistant.rules((p.name for p in self.phones), self.groups())

    def phone(self, name: str) -> PhoneConfig:
        for phone in self.phones:
            if phone.name == name:
                return phone
        raise KeyError(name)

    @property
    def templates(self) -> Templates:
        """The template sandbox the rules' templates were compiled in while loading (a fresh one
        for a configuration built some other way)."""
        if self._templates is None:
            self._templates = Templates()
        return self._templates

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Group name -> its phones, both in config order."""
        groups: dict[str, list[str]] = {}
        for phone in self.phones:
            for group in phone.groups:
                members = groups.setdefault(group, [])
                if phone.name not in members:
                    members.append(phone.name)
        return {group: tuple(members) for group, members in groups.items()}

    def expand(self, targets: Iterable[str]) -> tuple[str, ...]:
        """Phone names, groups and ``all`` -> phone names, in order of first mention, once each."""
        groups = self.groups()
        names = {phone.name for phone in self.phones}
        out: dict[str, None] = {}
        for target in targets:
            if target == "all":
                out.update(dict.fromkeys(phone.name for phone in self.phones))
            elif target in names:
                out[target] = None
            elif target in groups:
                out.update(dict.fromkeys(groups[target]))
            else:
                raise KeyError(target)
        return tuple(out)

    def phone_targets(self) -> dict[str, PhoneTarget]:
        """What :class:`phonepush.phone.client.PhoneClient` needs for each phone, by name."""
        targets: dict[str, PhoneTarget] = {}
        for phone in self.phones:
            host, port = parse_host(phone.host)
            targets[phone.name] = PhoneTarget(
                name=phone.name,
                host=host,
                port=port,
                scheme=phone.scheme or "http",
                username=phone.username,
                password=phone.password.get_secret_value() if phone.password else "",
                certificate=phone.certificate,
                ca_file=phone.ca_file,
                timeout=phone.timeout,
            )
        return targets

    @property
    def hooks(self) -> frozenset[str]:
        """Webhook names rules listen on."""
        return frozenset(rule.pattern for rule in self.rules if rule.source == "webhook")


# --- loading ------------------------------------------------------------------------------------


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = {key.lower(): value for key, value in environ.items()}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._environ


# (section, secret key, its file key): a secret set in the environment replaces both in TOML.
_SECRETS: Final = (
    ("mqtt", "password", "password_file"),
    ("spool", "password", "password_file"),
    ("webhook", "token", "token_file"),
    ("webhook", "hmac_secret", "hmac_secret_file"),
)


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge and validate ``path``; raise :class:`ConfigError` listing every problem.

    ``environ`` defaults to the process environment; pass a mapping to decide exactly what the
    configuration sees (tests, ``phonepush check`` against another host's settings).
    """
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, environ=environ, base_dir=path.parent)


def parse_config(
    data: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate already-parsed TOML ``data`` (plus ``environ``) into a :class:`Config`."""
    import os

    env = dict(os.environ if environ is None else environ)
    merged = _merge_env(dict(data), _spool_from_file(data, _MappingEnvSource(Config, env)()))
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(url_for_log("\n".join(_format_errors(exc, merged)))) from None
    problems: list[str] = []
    config = _read_secrets(config, env, base_dir or Path.cwd(), problems)
    problems.extend(_cross_check(config))
    if problems:
        # A URL quoted in a problem (a literal execute URL, a webhook) may hold a password.
        raise ConfigError(url_for_log("\n".join(problems)))
    return config


def _spool_from_file(data: Mapping[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """A file that moves the store to PostgreSQL (``[spool] url``) wins over a spool path from
    the environment: the systemd unit sets ``PHONEPUSH_SPOOL__PATH`` to keep an SQLite spool in
    its state directory whatever the file says, and a host moved to a shared database would
    otherwise be refused for setting both. Both in the file, or both in the environment, stay
    an error: that is a real contradiction."""
    section = data.get("spool")
    env_spool = env.get("spool")
    if (
        isinstance(section, Mapping)
        and section.get("url")
        and "path" not in section
        and isinstance(env_spool, Mapping)
        and "path" in env_spool
        and "url" not in env_spool
    ):
        env = {**env, "spool": {k: v for k, v in env_spool.items() if k != "path"}}
    return env


def _merge_env(data: dict[str, Any], env: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in env.items():
        current = data.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            section = dict(current)
            for secret, secret_file in ((s, f) for sec, s, f in _SECRETS if sec == key):
                if secret in value:
                    section.pop(secret_file, None)
                if secret_file in value:
                    section.pop(secret, None)
            data[key] = _merge_env(section, value)
        else:
            data[key] = value
    return data


def _label(loc: tuple[int | str, ...], data: Mapping[str, Any]) -> str:
    """A pydantic error location as users write it: ``rules[doorbell].when``."""
    out = ""
    i = 0
    while i < len(loc):
        part = loc[i]
        if (
            part in ("phones", "rules", "schedules")
            and i + 1 < len(loc)
            and isinstance(loc[i + 1], int)
        ):
            index = loc[i + 1]
            assert isinstance(index, int)
            entries = data.get(str(part))
            name: object = None
            if isinstance(entries, list) and index < len(entries):
                entry = entries[index]
                name = entry.get("name") if isinstance(entry, Mapping) else None
            out += f"{'.' if out else ''}{part}[{name if isinstance(name, str) else index}]"
            i += 2
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            pass  # pydantic's internal validator steps: not a key anyone wrote
        else:
            out += f"{'.' if out else ''}{part}"
        i += 1
    return out or "config"


def _format_errors(exc: ValidationError, data: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_input=False, include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        where = _label(tuple(error["loc"]), data)
        if error["type"] == "extra_forbidden":
            reserved = error["loc"][0] == "rules" and error["loc"][-1] in RESERVED_RULE_KEYS
            message = (
                "not supported by this version of phonepush"
                if reserved
                else "unknown key (check its spelling and section)"
            )
        # A model validator names the key it is about at the start of its message.
        key, sep, rest = message.partition(": ")
        if sep and _NAME.fullmatch(key) and " " not in key and error["type"] == "value_error":
            where, message = f"{where}.{key}" if where != "config" else key, rest
        lines.append(f"{where}: {message}")
    return lines


def _read_secret(name: str, environ: Mapping[str, str], base_dir: Path) -> str:
    candidates: list[Path] = []
    path = Path(name)
    if not path.is_absolute():
        if credentials := environ.get("CREDENTIALS_DIRECTORY"):
            candidates.append(Path(credentials) / path)
        candidates.append(base_dir / path)
    else:
        candidates.append(path)
    for candidate in candidates:
        if candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read {candidate}: {exc}") from exc
            # Editors and `echo` add a final newline that is not part of the secret.
            return text.rstrip("\r\n")
    folders = ", ".join(str(c.parent.absolute()) for c in candidates)
    raise ValueError(f"no such file: {name} (looked in {folders}); create it there")


def _secret_from_file(
    model: BaseModel,
    secret: str,
    file_key: str,
    where: str,
    environ: Mapping[str, str],
    base_dir: Path,
    problems: list[str],
) -> dict[str, Any]:
    name = getattr(model, file_key)
    if name is None:
        return {}
    if getattr(model, secret) is not None:
        problems.append(f"{where}.{file_key}: give {secret} or {file_key}, not both")
        return {}
    try:
        return {secret: SecretStr(_read_secret(name, environ, base_dir))}
    except ValueError as exc:
        problems.append(f"{where}.{file_key}: {exc}")
        return {}


def _read_secrets(
    config: Config, environ: Mapping[str, str], base_dir: Path, problems: list[str]
) -> Config:
    update: dict[str, Any] = {}
    if config.mqtt is not None:
        found = _secret_from_file(
            config.mqtt, "password", "password_file", "mqtt", environ, base_dir, problems
        )
        if found:
            update["mqtt"] = config.mqtt.model_copy(update=found)
    found = _secret_from_file(
        config.spool, "password", "password_file", "spool", environ, base_dir, problems
    )
    if found:
        update["spool"] = config.spool.model_copy(update=found)
    webhook: dict[str, Any] = {}
    for secret, file_key in (("token", "token_file"), ("hmac_secret", "hmac_secret_file")):
        webhook |= _secret_from_file(
            config.webhook, secret, file_key, "webhook", environ, base_dir, problems
        )
    if webhook:
        update["webhook"] = config.webhook.model_copy(update=webhook)
    phones = []
    for phone in config.phones:
        found = _secret_from_file(
            phone,
            "password",
            "password_file",
            f"phones[{phone.name}]",
            environ,
            base_dir,
            problems,
        )
        phones.append(phone.model_copy(update=found) if found else phone)
    update["phones"] = phones
    if config.authentication is not None:
        users = []
        for user in config.authentication.users:
            found = _secret_from_file(
                user,
                "password",
                "password_file",
                f"authentication.users[{user.name}]",
                environ,
                base_dir,
                problems,
            )
            user = user.model_copy(update=found) if found else user
            if user.password is None and user.password_file is None:
                problems.append(
                    f"authentication.users[{user.name}].password: give password or password_file"
                )
            users.append(user)
        update["authentication"] = config.authentication.model_copy(update={"users": users})
    return config.model_copy(update=update)


def _cross_check(config: Config) -> list[str]:
    """Checks across sections, all reported together."""
    problems: list[str] = []
    seen: set[str] = set()
    for phone in config.phones:
        if phone.name in seen:
            problems.append(f"phones[{phone.name}].name: another phone has this name")
        seen.add(phone.name)
    groups = config.groups()
    for phone in config.phones:
        for group in phone.groups:
            if group in seen:
                problems.append(f"phones[{phone.name}].groups: {group!r} is also a phone's name")
    templates = config.templates
    spool = config.spool
    if spool.url and "path" in spool.model_fields_set:
        problems.append(
            "spool.url: give url (PostgreSQL) or path (SQLite), not both; the data is in one"
        )
    if not spool.url and (spool.password is not None or spool.password_file is not None):
        problems.append("spool.password: only used with spool.url (PostgreSQL)")

    host, _ = config.server.address
    if config.webhook.token is None and not _is_loopback(host):
        problems.append(
            f"webhook.token: required when server.listen ({config.server.listen}) is not a "
            "loopback address; without it anyone on the network could page the phones"
        )
    if config.webhook.token is not None and not config.webhook.token.get_secret_value():
        problems.append("webhook.token: cannot be empty")
    if config.webhook.allow_anonymous and not _is_loopback(host):
        problems.append(
            f"webhook.allow_anonymous: only allowed on a loopback server.listen, not "
            f"{config.server.listen}"
        )
    if (
        config.webhook.token is None
        and config.webhook.token_file is None  # else: file's error
        and config.hooks
        and not config.webhook.allow_anonymous
        and _is_loopback(host)  # beyond loopback the check above already asks for a token
    ):
        problems.append(
            "webhook.token: required by the rules that listen on webhooks "
            f"({', '.join(sorted(config.hooks))}); set one (PHONEPUSH_WEBHOOK__TOKEN or "
            "token_file), or webhook.allow_anonymous = true to take hooks without one on loopback"
        )
    # The shipped example's placeholder is public: fine on loopback, never on a network.
    if (
        config.webhook.token is not None
        and config.webhook.token.get_secret_value() in PLACEHOLDER_TOKENS
        and not _is_loopback(host)
    ):
        problems.append(
            f"webhook.token: the example's placeholder cannot guard server.listen "
            f"({config.server.listen}); set a token of your own (PHONEPUSH_WEBHOOK__TOKEN or "
            "token_file)"
        )

    rule_names: set[str] = set()
    checked = [(f"rules[{rule.name}]", rule) for rule in config.rules]
    checked += [(f"schedules[{s.name}]", s.rule()) for s in config.schedules]
    for where, rule in checked:
        if rule.name in rule_names:
            other = "another rule" if where.startswith("rules[") else "a rule or another schedule"
            problems.append(f"{where}.name: {other} has this name")
        rule_names.add(rule.name)
        if rule.source == "mqtt" and config.mqtt is None:
            problems.append(f"{where}.on: listens on MQTT, but there is no [mqtt] section")
        for target in rule.to:
            if target != "all" and target not in seen and target not in groups:
                problems.append(f"{where}.to: no phone or group named {target!r}")
        for target in rule.escalate.to if rule.escalate is not None else ():
            if target != "all" and target not in seen and target not in groups:
                problems.append(f"{where}.escalate.to: no phone or group named {target!r}")
        for i, action in enumerate(rule.actions):
            if action.mqtt is not None and config.mqtt is None:
                problems.append(
                    f"{where}.actions[{i}].mqtt: publishes on MQTT, but there is no [mqtt] section"
                )
            if action.webhook is not None and not is_template(action.webhook.url):
                problems.extend(
                    _http_url_problems(f"{where}.actions[{i}].webhook.url", action.webhook.url)
                )
        for i, entry in enumerate(rule.execute):
            try:
                url, priority = split_priority(entry)
                if not is_template(url):
                    parse_target(url if priority is None else f"{url}@{priority}")
            except WireError as exc:
                problems.append(f"{where}.execute[{i}]: {exc}")
        problems.extend(_template_problems(rule, where, templates))
        literal_urls = [("ringtone", rule.ringtone)]
        if rule.background is not None:
            literal_urls += [
                ("background.icon", rule.background.icon),
                ("background.image", rule.background.image),
            ]
        for key, url in literal_urls:
            if url and not is_template(url):
                problems.extend(_http_url_problems(f"{where}.{key}", url))
    problems.extend(_homeassistant_problems(config, rule_names))
    return problems


def _homeassistant_problems(config: Config, rule_names: set[str]) -> list[str]:
    ha = config.homeassistant
    if not ha.enabled:
        return []
    if config.mqtt is None:
        return [
            "homeassistant.enabled: needs an [mqtt] section (discovery, commands and states"
            " go through the broker)"
        ]
    problems: list[str] = []
    made = config.homeassistant_rules()
    for rule in made:
        if rule.name in rule_names:
            problems.append(f"homeassistant: its rule {rule.name!r} has the name of a rule")
    for i, entry in enumerate(ha.execute):
        try:
            url, priority = split_priority(entry)
            if not is_template(url):
                parse_target(url if priority is None else f"{url}@{priority}")
        except WireError as exc:
            problems.append(f"homeassistant.execute[{i}]: {exc}")
    if made:
        # One rule stands for all: they share the title and execute items.
        found = _template_problems(made[0], "homeassistant", config.templates)
        problems += [p.replace("homeassistant.message.title", "homeassistant.title") for p in found]
    # Discovery ids allow no '.', which names may hold: two names must not meet as one id.
    kinds = (
        [phone.name for phone in config.phones],
        list(config.groups()),
        [rule.name for rule in config.all_rules if rule.acked],
    )
    for names in kinds:
        seen: dict[str, str] = {}
        for name in names:
            key = discovery_id(name)
            if key in seen:
                problems.append(
                    f"homeassistant: {seen[key]!r} and {name!r} would be one Home Assistant id"
                    f" ({key}); rename one"
                )
            seen.setdefault(key, name)
    return problems


def discovery_id(name: str) -> str:
    """A phone, group or rule name as Home Assistant's discovery ids allow it (``.`` -> ``_``)."""
    return name.replace(".", "_")


def _template_problems(rule: RuleConfig, where: str, templates: Templates) -> list[str]:
    """Compile every template once so that all syntax errors are reported at load time."""
    # (key, source, is a URL the phone fetches): compiled as the rule book compiles them, so it
    # finds every one compiled already.
    sources: list[tuple[str, str, bool]] = []
    for i, entry in enumerate(rule.execute):
        try:
            url = split_priority(entry)[0]
        except WireError:
            continue  # reported with the literal checks
        sources.append((f"execute[{i}]", url, is_http(url)))
    sources += [("dedupe", rule.dedupe, False), ("ringtone", rule.ringtone, True)]
    sources += [(f"group_by[{i}]", source, False) for i, source in enumerate(rule.group_by)]
    if rule.message is not None:
        sources += [
            (f"message.{k}", getattr(rule.message, k), False) for k in ("title", "text", "prompt")
        ]
    if rule.background is not None:
        sources += [("background.icon", rule.background.icon, True)]
        sources += [("background.image", rule.background.image, True)]
    if rule.audio is not None and rule.audio.say:
        sources += [("audio.say", rule.audio.say, False)]
    for i, action in enumerate(rule.actions):
        if action.mqtt is not None:
            sources += [(f"actions[{i}].mqtt.topic", action.mqtt.topic, False)]
            sources += [(f"actions[{i}].mqtt.payload", action.mqtt.payload, False)]
        if action.webhook is not None:
            sources += [(f"actions[{i}].webhook.url", action.webhook.url, True)]
            sources += [(f"actions[{i}].webhook.body", action.webhook.body, False)]
    problems: list[str] = []
    if rule.when.strip():
        try:
            templates.compile_expression(rule.when, f"{where}.when")
        except ConfigError as exc:
            problems.append(str(exc))
    if rule.resolve_when.strip():
        try:
            templates.compile_expression(rule.resolve_when, f"{where}.resolve_when")
        except ConfigError as exc:
            problems.append(str(exc))
    for key, source, fetched in sources:
        compile = templates.compile_url_template if fetched else templates.compile_template
        try:
            compile(source, f"{where}.{key}")
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def _http_url_problems(where: str, url: str) -> list[str]:
    if not is_http(url):
        return [f"{where}: must be an http:// or https:// URL"]
    try:
        validate_uri(url)
    except WireError as exc:
        return [f"{where}: {exc}"]
    return []
