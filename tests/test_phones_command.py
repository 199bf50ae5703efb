"""``phonepush phones`` (from the running daemon, from the config, or probing itself) and
``phonepush check --probe``, run as commands against simulated phones and a real daemon."""

from __future__ import annotations

import json
from pathlib import Path

from _daemon_fixtures import DaemonRunner, eventually, free_port, phonepush
from _sim_fixtures import MakeFleet

TOKEN = "phones-token"


def write_config(path: Path, port: int, phones: dict[str, str]) -> Path:
    lines = [
        f'[server]\nlisten = "127.0.0.1:{port}"\n',
        f'[spool]\npath = "{path.parent / "spool.db"}"\n',
        f'[webhook]\ntoken = "{TOKEN}"\n',
        '[health]\ninterval = "1s"\n',
    ]
    for name, host in phones.items():
        lines.append(f'[[phones]]\nname = "{name}"\nhost = "{host}"\ngroups = ["floor1"]\n')
        lines.append('timeout = "1s"\n')
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


async def test_without_a_daemon_it_lists_the_config_and_probe_reaches_each_phone(
    tmp_path: Path, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=1, names=["desk"])
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    path = write_config(
        tmp_path / "phonepush.toml", free_port(), {"desk": fleet.phones[0].address, "gone": dead}
    )

    code, out, err = await phonepush("phones", "--config", str(path), "--json")
    assert code == 0
    assert "no daemon answered" in err
    listed = json.loads(out)
    assert [(p["name"], p["reachable"]) for p in listed] == [("desk", None), ("gone", None)]

    code, out, err = await phonepush("phones", "--config", str(path), "--probe", "--json")
    assert code == 0, err
    probed = {p["name"]: p for p in json.loads(out)}
    assert probed["desk"]["reachable"] is True
    assert (probed["desk"]["model"], probed["desk"]["firmware"]) == ("CP-8841", "14.2(1)")
    assert probed["gone"]["reachable"] is False
    assert "Cannot connect" in probed["gone"]["error"]

    code, out, err = await phonepush("phones", "--config", str(path), "--probe")
    assert code == 0
    # The table says "gone" is down; the health monitor's own warning does not repeat it.
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "HOST", "GROUPS", "STATE"]
    assert lines[1].split()[:4] == ["desk", fleet.phones[0].address, "floor1", "up"]
    assert lines[2].split()[:4] == ["gone", dead, "floor1", "down"]
    assert "Cannot connect" in lines[3]

    code, out, _ = await phonepush("check", "--config", str(path), "--probe")
    assert code == 1
    assert "probe: 1 of 2 phones reachable" in out
    assert f"  gone ({dead}): unreachable: Cannot connect" in out

    path = write_config(tmp_path / "one.toml", free_port(), {"desk": fleet.phones[0].address})
    code, out, _ = await phonepush("check", "--config", str(path), "--probe")
    assert code == 0
    assert "probe: 1 of 1 phone reachable" in out


async def test_with_a_daemon_running_it_shows_the_daemons_view(
    tmp_path: Path, daemon_runner: DaemonRunner, make_fleet: MakeFleet
) -> None:
    fleet = await make_fleet(phones=2, names=["desk", "hall"])
    path = write_config(
        tmp_path / "phonepush.toml",
        daemon_runner.port,
        {"desk": fleet.phones[0].address, "hall": fleet.phones[1].address},
    )
    await daemon_runner.start_file(path)
    await fleet.phones[1].set_fault("refuse")

    async def hall_down() -> bool:
        code, out, _ = await phonepush("phones", "--config", str(path), "--json")
        assert code == 0
        listed = {p["name"]: p for p in json.loads(out)}
        return listed["desk"]["reachable"] is True and listed["hall"]["reachable"] is False

    await eventually(hall_down, timeout=15)
    code, out, err = await phonepush("phones", "--config", str(path))
    assert code == 0 and "no daemon" not in err
    assert [line.split()[3] for line in out.splitlines()[1:3]] == ["up", "down"]
