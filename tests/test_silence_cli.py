"""``phonepush silence add|list|expire``, run as a command against a running daemon and simulated
phones: a silence made on the command line holds back the page it matches (and ``status`` says
so), expiring it lets the next one through; and the errors an operator meets say what to fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from _daemon_fixtures import DaemonRunner, eventually, free_port, phonepush
from _sim_fixtures import MakeFleet
from phonepush.sim.simulator import Fleet

TOKEN = "silence-cli-token"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def write_config(path: Path, port: int, fleet: Fleet, *, token: str = TOKEN) -> Path:
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
[spool]
path = "{path.parent / "spool.db"}"
[webhook]
token = "{token}"
[dispatch]
retry_initial = "50ms"
retry_max = "200ms"
[health]
interval = "0"
[[phones]]
name = "lobby"
host = "{fleet.phone(0).address}"
[[phones]]
name = "desk"
host = "{fleet.phone(1).address}"
[[rules]]
name = "alerts"
on = "webhook:alerts"
to = ["lobby", "desk"]
message = {{ title = "Alert", text = "{{{{ payload.msg }}}}" }}
""",
        encoding="utf-8",
    )
    return path


async def fire(runner: DaemonRunner, msg: str) -> dict[str, object]:
    """POST the hook and wait until none of the event's deliveries is pending; its status."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=runner.url, headers=auth) as client:
        answer = await client.post("/hooks/alerts", json={"msg": msg})
        assert answer.status_code == 202, answer.text
        event_id = answer.json()["event"]
        body: dict[str, object] = {}

        async def settled() -> bool:
            nonlocal body
            body = (await client.get(f"/api/events/{event_id}")).json()
            deliveries = body["deliveries"]
            assert isinstance(deliveries, list)
            return all(d["state"] != "pending" for d in deliveries)

        await eventually(settled, timeout=15)
        return body


async def test_a_silence_holds_back_the_page_it_matches_until_expired(
    tmp_path: Path, daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=2, names=["lobby", "desk"], tone_ms=10)
    path = write_config(tmp_path / "phonepush.toml", daemon_runner.port, fleet)
    await daemon_runner.start_file(path)
    config = ("--config", str(path))

    code, out, err = await phonepush(
        "silence",
        "add",
        *config,
        "phone=lobby",
        "topic=~al.*",
        "--comment",
        "ladder work in the lobby",
        "--duration",
        "2h",
        "--author",
        "maria",
    )
    assert (code, err) == (0, ""), err
    # The id alone, for id=$(phonepush silence add ...).
    assert UUID.fullmatch(out.strip()), out
    silence_id = out.strip()

    code, out, err = await phonepush("silence", "list", *config)
    assert code == 0, err
    header, row = out.splitlines()
    assert re.split(r"\s{2,}", header) == [
        "ID",
        "MATCHERS",
        "STARTS",
        "ENDS",
        "CREATED BY",
        "COMMENT",
    ]
    cells = re.split(r"\s{2,}", row)
    assert cells[0] == silence_id
    assert cells[1] == "phone=lobby topic=~al.*"
    assert cells[4:] == ["maria", "ladder work in the lobby"]

    code, out, _ = await phonepush("silence", "list", *config, "--json")
    (listed,) = json.loads(out)
    assert listed["id"] == silence_id and listed["status"] == "active"
    assert listed["matchers"][1] == {
        "name": "topic",
        "value": "al.*",
        "isRegex": True,
        "isEqual": True,
    }
    code, out, _ = await phonepush("silence", "list", *config, "-q")
    assert out == f"{silence_id}\n"

    held = await fire(daemon_runner, "smoke in the hall")
    assert fleet.phone("lobby").state.pushes == 0
    assert fleet.phone("desk").state.pushes == 1
    reason = f"silenced by {silence_id}"

    code, out, err = await phonepush("status", *config)
    assert code == 0, err
    lines = out.splitlines()
    assert held["event"] in lines[1]
    assert lines[1].endswith("delivered=1 suppressed=1")
    assert lines[2] == f"  lobby  suppressed  {reason}"

    code, out, err = await phonepush("status", *config, "--json")
    assert code == 0, err
    (event,) = json.loads(out)
    assert event["event"] == held["event"]
    assert {d["phone"]: (d["state"], d["error"]) for d in event["deliveries"]} == {
        "lobby": ("suppressed", reason),
        "desk": ("delivered", ""),
    }

    code, out, err = await phonepush("silence", "expire", *config, silence_id, "no-such-id")
    assert code == 1
    assert out == f"expired {silence_id}\n"
    assert err == "phonepush silence expire: no silence 'no-such-id' in force or scheduled\n"
    code, out, _ = await phonepush("silence", "list", *config)
    assert (code, out) == (0, "no silences in force or scheduled\n")

    passed = await fire(daemon_runner, "smoke again")
    await eventually(lambda: fleet.phone("lobby").state.pushes == 1)
    code, out, _ = await phonepush("status", *config, "--json")
    newest = json.loads(out)[0]
    assert newest["event"] == passed["event"]
    assert sorted(d["state"] for d in newest["deliveries"]) == ["delivered", "delivered"]


async def test_errors_say_what_to_fix_in_one_line(
    tmp_path: Path, daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=2, names=["lobby", "desk"], tone_ms=10)
    path = write_config(tmp_path / "phonepush.toml", daemon_runner.port, fleet)
    await daemon_runner.start_file(path)
    add = ("silence", "add", "--config", str(path))

    # Bad input is refused before anything is asked of the daemon: exit 2, naming it.
    code, out, err = await phonepush(*add, "phone=lobby", "severity=high", "--comment", "x")
    assert (code, out) == (2, "")
    assert err.startswith("phonepush silence add: bad matcher 'severity=high': matcher name ")
    assert "label.<path>" in err and err.count("\n") == 1
    code, _, err = await phonepush(*add, "phone=~(lob", "--comment", "x")
    assert code == 2 and "bad matcher 'phone=~(lob': " in err and "not a valid regex" in err
    code, _, err = await phonepush(*add, "phone=lobby", "--comment", "x", "--duration", "2 weeks")
    assert code == 2
    assert err == (
        "phonepush silence add: bad --duration '2 weeks': expected a duration such as 500ms, "
        "15s, 5m, 1h, 1d\n"
    )

    # Nobody listening: exit 1, naming the address tried.
    nowhere = f"http://127.0.0.1:{free_port()}"
    code, _, err = await phonepush("silence", "list", "--config", str(path), "--url", nowhere)
    assert code == 1
    assert err.startswith(f"phonepush silence list: cannot reach the daemon at {nowhere}: ")
    assert err.count("\n") == 1

    # A token the daemon does not take: the key to fix, never the token itself.
    wrong = write_config(tmp_path / "wrong.toml", daemon_runner.port, fleet, token="not-it-at-all")
    code, _, err = await phonepush(
        "silence", "add", "--config", str(wrong), "rule=alerts", "--comment", "x"
    )
    assert code == 1
    assert err == (
        f"phonepush silence add: the daemon at {daemon_runner.url} refused the token (401): "
        f"webhook.token in {wrong} is not the daemon's\n"
    )
    (tmp_path / "token").write_text("also-not-it\n", encoding="utf-8")
    from_file = tmp_path / "from-file.toml"
    from_file.write_text(
        wrong.read_text(encoding="utf-8").replace(
            'token = "not-it-at-all"', f'token_file = "{tmp_path / "token"}"'
        ),
        encoding="utf-8",
    )
    code, out, err = await phonepush("silence", "list", "--config", str(from_file))
    assert code == 1
    assert f"webhook.token_file ({tmp_path / 'token'}) in {from_file} is not the daemon's" in err
    for secret in (TOKEN, "not-it-at-all", "also-not-it"):
        assert secret not in out + err

    # The daemon did nothing: no silence was made by any of the above.
    code, out, _ = await phonepush("silence", "list", "--config", str(path), "-q")
    assert (code, out) == (0, "")
