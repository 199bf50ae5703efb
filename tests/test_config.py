"""Loading phonepush.toml: defaults, environment, secret files, and the errors users see."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phonepush.config import (
    RESERVED_RULE_KEYS,
    format_duration,
    load_config,
    parse_duration,
    validate_topic_filter,
)
from phonepush.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "phonepush.toml"

BASE = """
[spool]
path = "spool.db"

[[phones]]
name = "lobby"
host = "192.0.2.21"
groups = ["frontdesk"]

[[phones]]
name = "office"
host = "192.0.2.22:8443"
groups = ["frontdesk", "it"]
"""

RULE = """
[[rules]]
name = "doorbell"
on = "webhook:door"
to = ["frontdesk"]
execute = ["Play:Chime.raw"]
"""


def write(tmp_path: Path, text: str, name: str = "phonepush.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return str(info.value).splitlines()


def test_the_shipped_example_loads_with_its_documented_values() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.server.listen == "127.0.0.1:8080"
    assert config.server.public_url == "http://192.0.2.10:8080"
    assert config.mqtt is not None
    assert config.mqtt.endpoint == "mqtt://127.0.0.1:1883"
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "secret"
    assert config.mqtt.ca_file is None  # "" means none
    doorbell, alerts = config.rules
    assert (doorbell.cooldown, doorbell.ttl) == (15.0, 60.0)
    assert (alerts.cooldown, alerts.ttl) == (None, 300.0)
    assert config.groups() == {"frontdesk": ("lobby", "office"), "it": ("office",)}
    assert config.hooks == frozenset({"alertmanager"})


def test_phone_targets_carry_scheme_port_and_secret(tmp_path: Path) -> None:
    config = load_config(EXAMPLE, environ={})
    targets = config.phone_targets()
    assert targets["lobby"].scheme == "http" and targets["lobby"].port is None
    office = targets["office"]
    assert (office.host, office.port, office.scheme) == ("192.0.2.22", 8443, "https")
    assert office.certificate == "/etc/phonepush/office.pem"
    assert office.password == "secret"
    assert office.timeout == 10.0


def test_defaults_fill_everything_not_given(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE + RULE + '[webhook]\ntoken = "t"\n'), environ={})
    assert config.server.public_url == "http://127.0.0.1:8080"
    assert config.server.max_body == 65536
    assert config.mqtt is None
    assert config.spool.max_pending == 100_000
    assert config.spool.synchronous == "normal"
    assert (config.dispatch.concurrency, config.dispatch.retry_initial) == (256, 1.0)
    assert config.dispatch.retry_max == 60.0
    assert (config.log.level, config.log.format) == ("info", "text")
    assert config.rules[0].ttl == 300.0 and config.rules[0].cooldown is None


def test_mqtt_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE + '[mqtt]\nurl = "mqtts://broker.lan"\n'), environ={})
    mqtt = config.mqtt
    assert mqtt is not None
    assert (mqtt.tls, mqtt.port, mqtt.protocol, mqtt.qos) == (True, 8883, "5", 1)
    assert (mqtt.keepalive, mqtt.session_expiry, mqtt.receive_maximum) == (60, 86400, 100)
    assert (mqtt.status_topic, mqtt.outcome_topic) == ("phonepush/status", "")
    assert (mqtt.reconnect_min, mqtt.reconnect_max) == (1.0, 60.0)
    assert mqtt.client_id.startswith("phonepush-")


def test_environment_overrides_toml() -> None:
    environ = {
        "PHONEPUSH_MQTT__PASSWORD": "from-env",
        "PHONEPUSH_WEBHOOK__TOKEN": "env-token",
        "PHONEPUSH_SERVER__LISTEN": "127.0.0.1:9090",
        "phonepush_log__level": "DEBUG",
    }
    config = load_config(EXAMPLE, environ=environ)
    assert config.mqtt is not None and config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "from-env"
    assert config.webhook.token is not None
    assert config.webhook.token.get_secret_value() == "env-token"
    assert config.server.listen == "127.0.0.1:9090"
    assert config.log.level == "debug"


def test_process_environment_is_not_read_when_a_mapping_is_given(
    tmp_path: Path,
) -> None:
    # Runs in a child so the test's own environment stays untouched.
    code = (
        "from pathlib import Path; from phonepush.config import load_config; "
        f"c = load_config(Path({str(EXAMPLE)!r}), environ={{}}); print(c.server.listen); "
        f"c = load_config(Path({str(EXAMPLE)!r})); print(c.server.listen)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PHONEPUSH_SERVER__LISTEN": "127.0.0.1:7070", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["127.0.0.1:8080", "127.0.0.1:7070"]


def test_the_configuration_loads_no_io_library() -> None:
    # Anything may import the configuration (the CLI's check, tools, the daemon's start-up): it
    # must not drag in the spool's, the phone client's, the XML parser's or the web server's
    # libraries. A child process, so modules the test run already loaded do not count.
    code = (
        "import sys, phonepush.config; "
        "print([m for m in ('sqlite3', 'lxml', 'httpx', 'starlette') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_secret_files_from_credentials_directory_and_next_to_the_config(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("from-systemd\n")
    (tmp_path / "webhook-token").write_text("beside-config\n")
    (tmp_path / "phone-pw").write_text("phone-secret")
    path = write(
        tmp_path,
        BASE.replace('groups = ["frontdesk"]', 'groups = ["frontdesk"]\npassword_file = "phone-pw"')
        + '[mqtt]\nurl = "mqtt://127.0.0.1"\npassword_file = "mqtt-password"\n'
        + '[webhook]\ntoken_file = "webhook-token"\n',
    )
    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.mqtt is not None and config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "from-systemd"
    assert config.webhook.token is not None
    assert config.webhook.token.get_secret_value() == "beside-config"
    assert config.phone_targets()["lobby"].password == "phone-secret"


def test_environment_secret_replaces_a_secret_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '[mqtt]\nurl = "mqtt://127.0.0.1"\npassword_file = "missing"\n')
    config = load_config(path, environ={"PHONEPUSH_MQTT__PASSWORD": "env"})
    assert config.mqtt is not None and config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "env"


def test_missing_secret_file_and_secret_given_twice(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("x")
    path = write(
        tmp_path,
        BASE
        + '[mqtt]\nurl = "mqtt://127.0.0.1"\npassword_file = "absent"\n'
        + '[webhook]\ntoken = "a"\ntoken_file = "tok"\n',
    )
    lines = errors_of(path)
    assert any(line.startswith("mqtt.password_file: no such file") for line in lines)
    assert "webhook.token_file: give token or token_file, not both" in lines


def test_secrets_never_appear_in_repr_errors_or_check_output(tmp_path: Path) -> None:
    secret = "hunter2-very-secret"
    text = BASE.replace(
        'host = "192.0.2.21"', f'host = "192.0.2.21"\npassword = "{secret}"'
    ) + textwrap.dedent(
        f"""
        [mqtt]
        url = "mqtt://user:{secret}@127.0.0.1"
        password = "{secret}"
        [webhook]
        token = "{secret}"
        """
    )
    lines = errors_of(write(tmp_path, text))
    assert lines == ["mqtt.url: put credentials in mqtt.username and mqtt.password, not the URL"]
    good = write(tmp_path, text.replace(f"user:{secret}@", ""), "good.toml")
    config = load_config(good, environ={})
    assert secret not in repr(config) and secret not in str(config)
    assert secret not in repr(config.phone_targets())
    result = subprocess.run(
        [sys.executable, "-m", "phonepush", "check", "--config", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "user" not in result.stdout


def test_errors_name_phone_rule_section_and_key_all_at_once(tmp_path: Path) -> None:
    text = BASE.replace("192.0.2.22:8443", "192.0.2.22:99999") + textwrap.dedent(
        """
        [mqtt]
        url = "http://127.0.0.1"
        pasword = "typo"

        [[rules]]
        name = "doorbell"
        on = "mqtt:zigbee2mqtt/#/action"
        to = ["frontdesk"]
        execute = ["Play:Chime.raw"]
        ttl = "soon"
        """
    )
    assert errors_of(write(tmp_path, text)) == [
        "mqtt.url: expected mqtt:// or mqtts://, got http scheme",
        "mqtt.pasword: unknown key (check its spelling and section)",
        "phones[office].host: Invalid port: 99999",
        "rules[doorbell].on: '#' must be a whole level and the last one: 'zigbee2mqtt/#/action'",
        "rules[doorbell].ttl: expected a duration such as 500ms, 15s, 5m, 1h, 1d",
    ]


def test_cross_checks_name_the_rule_and_entry(tmp_path: Path) -> None:
    text = BASE + textwrap.dedent(
        """
        [[rules]]
        name = "doorbell"
        on = "mqtt:doors/+"
        when = "payload.action =="
        to = ["frontdesk", "kitchen"]
        execute = ["Play:Chime.raw@3", "Bogus:1", "Play:{{ payload.tone }}@1"]
        message = { title = "{% if %}" }

        [[rules]]
        name = "doorbell"
        on = "webhook:door"
        to = "all"
        ringtone = "ftp://example/ring.raw"

        [webhook]
        allow_anonymous = true
        """
    )
    assert errors_of(write(tmp_path, text)) == [
        "rules[doorbell].on: listens on MQTT, but there is no [mqtt] section",
        "rules[doorbell].to: no phone or group named 'kitchen'",
        "rules[doorbell].execute[0]: Invalid priority: 3",
        "rules[doorbell].execute[1]: Invalid URL: Bogus:1",
        "rules[doorbell].when: unexpected 'end of template' (template line 1)",
        "rules[doorbell].message.title: Expected an expression, got 'end of statement block'"
        " (template line 1)",
        "rules[doorbell].name: another rule has this name",
        "rules[doorbell].ringtone: must be an http:// or https:// URL",
    ]


def test_names_must_not_clash(tmp_path: Path) -> None:
    text = BASE + textwrap.dedent(
        """
        [[phones]]
        name = "lobby"
        host = "192.0.2.23"
        groups = ["office"]
        """
    )
    lines = errors_of(write(tmp_path, text + RULE))
    assert "phones[lobby].name: another phone has this name" in lines
    assert "phones[lobby].groups: 'office' is also a phone's name" in lines
    bad = BASE.replace('name = "lobby"', 'name = "all"')
    assert "phones[all].name: 'all' is reserved (it means every phone)" in errors_of(
        write(tmp_path, bad, "all.toml")
    )


def test_non_loopback_listen_needs_a_webhook_token(tmp_path: Path) -> None:
    text = BASE + RULE + '[server]\nlisten = "192.0.2.10:8080"\n'
    (line,) = errors_of(write(tmp_path, text))
    assert line.startswith("webhook.token: required when server.listen (192.0.2.10:8080)")
    config = load_config(write(tmp_path, text), environ={"PHONEPUSH_WEBHOOK__TOKEN": "t"})
    assert config.server.public_url == "http://192.0.2.10:8080"
    for loopback in ("127.0.0.1:8080", "[::1]:8080", "localhost:8080"):
        local = BASE + RULE + f'[server]\nlisten = "{loopback}"\n'
        # Hooks want a token by default, on loopback too, unless anonymous hooks are asked for.
        (line,) = errors_of(write(tmp_path, local))
        assert line.startswith("webhook.token: required by the rules that listen on webhooks")
        anonymous = local + "[webhook]\nallow_anonymous = true\n"
        assert load_config(write(tmp_path, anonymous), environ={}).webhook.token is None
    beyond = text + "[webhook]\nallow_anonymous = true\n"
    assert "webhook.allow_anonymous: only allowed on a loopback" in " ".join(
        errors_of(write(tmp_path, beyond))
    )


def test_the_examples_placeholder_token_only_guards_loopback(tmp_path: Path) -> None:
    text = BASE + RULE + '[server]\nlisten = "192.0.2.10:8080"\n[webhook]\ntoken = "change-me"\n'
    (line,) = errors_of(write(tmp_path, text))
    assert line.startswith("webhook.token: the example's placeholder cannot guard server.listen")
    assert "change-me" not in line
    own = load_config(write(tmp_path, text), environ={"PHONEPUSH_WEBHOOK__TOKEN": "x7-own"})
    assert own.webhook.token is not None
    local = text.replace("192.0.2.10", "127.0.0.1")
    assert load_config(write(tmp_path, local), environ={}).webhook.token is not None


def test_wildcard_listen_needs_a_public_url(tmp_path: Path) -> None:
    text = BASE + '[webhook]\ntoken = "t"\n[server]\nlisten = "0.0.0.0:8080"\n'
    assert errors_of(write(tmp_path, text)) == [
        "server.public_url: required when listening on a wildcard address (phones fetch pages "
        "from it)"
    ]


def test_a_misspelt_rule_key_is_refused_by_name(tmp_path: Path) -> None:
    # A typo must not silently switch a feature off (here: the cooldown).
    text = BASE + RULE + 'cooldwn = "15s"\n'
    (line,) = errors_of(write(tmp_path, text))
    assert line.startswith("rules[doorbell].cooldwn:")
    assert not RESERVED_RULE_KEYS  # every key once reserved for later is implemented now


def test_rule_must_send_something_and_priority_is_bounded(tmp_path: Path) -> None:
    text = BASE + RULE + "priority = 3\n"
    assert errors_of(write(tmp_path, text)) == [
        "rules[doorbell].priority: Input should be less than or equal to 2",
    ]
    text = BASE + RULE.replace('execute = ["Play:Chime.raw"]', "")
    assert errors_of(write(tmp_path, text)) == [
        "rules[doorbell]: nothing to send: give execute, message, background, ringtone or audio",
    ]


def test_phone_scheme_follows_certificate(tmp_path: Path) -> None:
    text = BASE.replace('host = "192.0.2.21"', 'host = "192.0.2.21"\nca_file = "/etc/ca.pem"')
    config = load_config(write(tmp_path, text), environ={})
    assert config.phone_targets()["lobby"].scheme == "https"
    bad = text.replace('ca_file = "/etc/ca.pem"', 'ca_file = "/etc/ca.pem"\nscheme = "http"')
    assert errors_of(write(tmp_path, bad)) == [
        "phones[lobby].scheme: certificate and ca_file need https"
    ]


def test_unreadable_or_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path / "absent.toml")
    assert "absent.toml: cannot read" in line
    (line,) = errors_of(write(tmp_path, "[server\n"))
    assert "not valid TOML" in line


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("15s", 15), ("5m", 300), ("1h", 3600), ("1d", 86400), (30, 30), ("2.5", 2.5)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "-1s", "1w", True, "inf"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_format_duration_reads_back(value: int, unit: str) -> None:
    seconds = parse_duration(f"{value}{unit}")
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("good", ["a/b", "a/+/c", "#", "+", "a/#", "+/+/#", "/a", "a//b"])
def test_valid_topic_filters(good: str) -> None:
    assert validate_topic_filter(good) == good


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "+a/b", "$share/g/a", "a/\x00"])
def test_invalid_topic_filters(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_topic_filter(bad)


def test_check_exits_2_with_the_problems_on_stderr(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("192.0.2.22:8443", "192.0.2.22:99999") + RULE)
    result = subprocess.run(
        [sys.executable, "-m", "phonepush", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "phones[office].host: Invalid port: 99999" in result.stderr.splitlines()


def test_check_summary_reads_right_for_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from phonepush.cli import main as cli_main

    path = tmp_path / "phonepush.toml"
    path.write_text(
        textwrap.dedent(
            """
            [webhook]
            allow_anonymous = true

            [dispatch]
            concurrency = 1

            [[phones]]
            name = "lobby"
            host = "192.0.2.21"

            [[rules]]
            name = "door"
            on = "webhook:door"
            to = "lobby"
            execute = ["Play:Chime.raw"]
            """
        )
    )
    assert cli_main(["check", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "dispatch: 1 push at once, retries 1s...1m" in lines
    assert "phones (1):" in lines and "rules (1):" in lines
