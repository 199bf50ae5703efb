"""Side by side: phonepush against what users run instead, same phones, same broker, same run.

Systems (each started fresh against the same simulated phones and the same mosquitto):

* ``phonepush``: ``phonepush run`` with its durable spool (as in fanout/throughput/latency.py).
* ``script-seq`` / ``script-par8``: what a home-lab user writes today: an MQTT subscriber that
  runs one ``phonepush send`` process per event and phone (as the reference ``cgiexecute``
  script is used), one at a time, or up to 8 at once.
* ``mqttwarn-w1`` / ``mqttwarn-w10``: mqttwarn 0.36 with its ``http`` service POSTing the form
  field ``XML`` (``'@payload'``: the event's payload is the CiscoIPPhoneExecute XML), with 1 and
  with 10 worker threads. It needs paho-mqtt < 2, so it runs from its own virtualenv,
  ``/tmp/mqttwarn-venv`` (made on first use: ``pip install mqttwarn 'paho-mqtt<2'``). It keeps
  nothing on disk: a message taken from the broker is lost if it stops.

Measured, each timed at the phones: (1) fan-out, one event to ``--phones`` phones at 20 ms
each, publish -> last answer (median of ``--rounds``; the scripts get one round); (2)
throughput, events to 100 phones answering at once, deliveries/s; (4) latency at
``--rate`` events/s, each event to one of 100 phones, publish -> request at the phone.

    .venv/bin/python bench/alternatives.py [--quick] [--systems phonepush,mqttwarn-w10,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

MQTTWARN_VENV = Path("/tmp/mqttwarn-venv")
SYSTEMS = ("phonepush", "mqttwarn-w1", "mqttwarn-w10", "script-par8", "script-seq")

Publish = Callable[[int], float]

_SUBSCRIBER = textwrap.dedent(
    '''
    """A home-lab MQTT-to-phone bridge: one `phonepush send` process per event and phone."""
    import json, subprocess, sys, threading
    from concurrent.futures import ThreadPoolExecutor
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    port, phones_file, parallel, send = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    phones = json.load(open(phones_file))
    pool = ThreadPoolExecutor(parallel)

    def push(address, number):
        subprocess.run([send, "send", "-t", "30", "-h", address, f"Dial:{number}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def on_message(client, userdata, message):
        body = json.loads(message.payload)
        targets = phones if message.topic == "bench/fire" or message.topic == "bench/stream" \\
            else [phones[int(message.topic.rsplit("/p", 1)[1])]]
        for address in targets:
            pool.submit(push, address, body["n"])

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="script")
    client.on_message = on_message
    client.on_connect = lambda c, u, f, r, p: c.subscribe([("bench/fire", 1), ("bench/stream", 1),
                                                           ("bench/one/#", 1)])
    client.connect("127.0.0.1", port)
    print("ready", flush=True)
    client.loop_forever()
    '''
)


def execute_xml(number: int) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><CiscoIPPhoneExecute>'
        f'<ExecuteItem Priority="0" URL={quoteattr(f"Dial:{number}")}/></CiscoIPPhoneExecute>'
    )


# --- systems under test: each yields publish(mark) for a topic and a payload maker -------------


@contextmanager
def phonepush_system(tmp: Path, phones: c.Phones, broker: c.Mosquitto) -> Iterator[dict[str, Any]]:
    port = c.free_port()
    rules = c.phonepush_rules(
        phones=phones.count, fire=True, stream=True, single=min(100, phones.count)
    )
    config = c.daemon_toml(
        workdir=tmp, broker_port=broker.port, phones=phones, rules=rules, server_port=port
    )
    with c.DaemonProcess(tmp, config, server_port=port) as daemon:
        yield {"payload": lambda n: json.dumps({"n": n}), "pid": daemon.pid}


@contextmanager
def mqttwarn_system(
    tmp: Path, phones: c.Phones, broker: c.Mosquitto, workers: int
) -> Iterator[dict[str, Any]]:
    python = c.ensure_venv(MQTTWARN_VENV, ["mqttwarn", "paho-mqtt<2"])
    targets = ",\n    ".join(
        f"'p{i}': ['post', 'http://127.0.0.1:{port}/CGI/Execute', {{'XML': '@payload'}}]"
        for i, port in enumerate(phones.ports)
    )
    every = ", ".join(f"http:p{i}" for i in range(phones.count))
    singles = "\n".join(
        f"[bench/one/p{i}]\ntargets = http:p{i}\n" for i in range(min(100, phones.count))
    )
    ini = tmp / "mqttwarn.ini"
    ini.write_text(
        "[defaults]\n"
        f"hostname = '127.0.0.1'\nport = {broker.port}\nclientid = 'mqttwarn-bench'\n"
        "cleansession = True\nprotocol = 4\n"
        "loglevel = WARN\nlogfile = 'stream://sys.stderr'\nlaunch = http\n"
        f"num_workers = {workers}\nstatus_publish = False\n\n"
        f"[config:http]\ntimeout = 30\ntargets = {{\n    {targets}\n    }}\n\n"
        f"[bench/fire]\ntargets = {every}\n\n[bench/stream]\ntargets = {every}\n\n{singles}"
    )
    process = subprocess.Popen(
        [str(python.parent / "mqttwarn")],
        cwd=tmp,
        env={"MQTTWARNINI": str(ini), "PATH": "/usr/bin:/bin"},
        stdout=(tmp / "mqttwarn.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(2.0)  # connect and subscribe; it offers no readiness signal
        if process.poll() is not None:
            raise RuntimeError("mqttwarn exited: " + (tmp / "mqttwarn.log").read_text()[-2000:])
        yield {"payload": execute_xml, "pid": process.pid}
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def script_system(
    tmp: Path, phones: c.Phones, broker: c.Mosquitto, parallel: int
) -> Iterator[dict[str, Any]]:
    script = tmp / "subscriber.py"
    script.write_text(_SUBSCRIBER)
    phones_file = tmp / "phones.json"
    phones_file.write_text(json.dumps([f"127.0.0.1:{port}" for port in phones.ports]))
    send = str(c.VENV_PYTHON.parent / "phonepush")
    process = subprocess.Popen(
        [str(c.VENV_PYTHON), str(script), str(broker.port), str(phones_file), str(parallel), send],
        stdout=subprocess.PIPE,
        stderr=(tmp / "subscriber.log").open("wb"),
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()
        time.sleep(0.5)
        yield {"payload": lambda n: json.dumps({"n": n}), "pid": process.pid}
    finally:
        process.terminate()
        process.wait(10)


def start(name: str, tmp: Path, phones: c.Phones, broker: c.Mosquitto) -> Any:
    if name == "phonepush":
        return phonepush_system(tmp, phones, broker)
    if name.startswith("mqttwarn-w"):
        return mqttwarn_system(tmp, phones, broker, int(name.removeprefix("mqttwarn-w")))
    if name == "script-seq":
        return script_system(tmp, phones, broker, 1)
    if name == "script-par8":
        return script_system(tmp, phones, broker, 8)
    raise SystemExit(f"unknown system {name}")


# --- the three measurements ---------------------------------------------------------------------


def measure_fanout(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cpus = c.cpus()
    rounds = 1 if name.startswith("script") else args.rounds
    with (
        c.workdir(f"alt-fanout-{name}-") as tmp,
        c.Phones(args.phones, delay_ms=20, cpu=cpus[0] if len(cpus) > 1 else None) as phones,
        c.Mosquitto(tmp) as broker,
        start(name, tmp, phones, broker) as system,
        c.Publisher(broker.port) as publisher,
    ):
        time.sleep(0.5)

        def publish(mark: int) -> float:
            return publisher.publish("bench/fire", system["payload"](mark))

        if name == "phonepush":
            # A warm-up event opens its connections; the others keep none between events.
            c.fanout_round(phones, publish, 1, args.phones, args.timeout)
        results = []
        for i in range(rounds):
            time.sleep(0.3)
            timeout = args.timeout if name == "phonepush" else args.slow_timeout
            results.append(c.fanout_round(phones, publish, 2 + i, args.phones, timeout))
        done = [r["last_answer_s"] for r in results if r.get("complete")]
        return {
            "rounds": results,
            "median_s": c.median(done) if len(done) == len(results) else None,
            "answered": [r["pushes"] for r in results],
        }


def measure_throughput(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cpus = c.cpus()
    events = {"phonepush": args.events, "script": args.script_events}.get(
        name.split("-")[0], args.other_events
    )
    with (
        c.workdir(f"alt-throughput-{name}-") as tmp,
        c.Phones(100, cpu=cpus[0] if len(cpus) > 1 else None) as phones,
        c.Mosquitto(tmp) as broker,
        start(name, tmp, phones, broker) as system,
        c.Publisher(broker.port) as publisher,
    ):
        time.sleep(0.5)

        def publish(mark: int) -> float:
            return publisher.publish("bench/stream", system["payload"](mark))

        c.stream_run(phones, publish, 1, 100, 0, args.timeout)
        before = c.cpu_seconds(system["pid"])
        run = c.stream_run(phones, publish, events, 100, 1000, args.timeout * 4)
        time.sleep(0.2)
        cpu = c.cpu_seconds(system["pid"]) - before
        run["cpu_ms_per_delivery"] = round(cpu * 1000 / max(1, run["deliveries"]), 3)
        return run


def measure_single(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Throughput when each event goes to one phone (k -> phone k mod ``--single-phones``; 1 by
    default, as the issue's baseline), as fast as the publisher goes: every delivery pays for
    its own event (MQTT, intake, spool)."""
    cpus = c.cpus()
    count = args.single_phones
    events = args.events * 20 if not name.startswith("script") else max(1, args.script_events) * 20
    with (
        c.workdir(f"alt-single-{name}-") as tmp,
        c.Phones(count, cpu=cpus[0] if len(cpus) > 1 else None) as phones,
        c.Mosquitto(tmp) as broker,
        start(name, tmp, phones, broker) as system,
        c.Publisher(broker.port) as publisher,
    ):
        time.sleep(0.5)

        def publish(mark: int) -> float:
            return publisher.publish(f"bench/one/p{mark % count}", system["payload"](mark))

        c.stream_run(phones, publish, 100, 1, 2_000_000, args.timeout)
        before = c.cpu_seconds(system["pid"])
        run = c.stream_run(phones, publish, events, 1, 0, args.timeout * 4)
        time.sleep(0.2)
        cpu = c.cpu_seconds(system["pid"]) - before
        run["cpu_ms_per_delivery"] = round(cpu * 1000 / max(1, run["deliveries"]), 3)
        return run


def measure_latency(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cpus = c.cpus()
    seconds = args.seconds if not name.startswith("script") else args.script_seconds
    with (
        c.workdir(f"alt-latency-{name}-") as tmp,
        c.Phones(100, cpu=cpus[0] if len(cpus) > 1 else None) as phones,
        c.Mosquitto(tmp) as broker,
        start(name, tmp, phones, broker) as system,
        c.Publisher(broker.port) as publisher,
    ):
        time.sleep(0.5)

        def publish(mark: int) -> float:
            return publisher.publish(f"bench/one/p{mark % 100}", system["payload"](mark))

        c.latency_run(phones, publish, 20, 0.5, 1_000_000, settle=args.timeout)
        return c.latency_run(phones, publish, args.rate, seconds, 0, settle=args.timeout * 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--phones", type=int, default=1000, help="fan-out phones")
    parser.add_argument("--rounds", type=int, default=3, help="fan-out rounds (median)")
    parser.add_argument("--events", type=int, default=100, help="throughput events x 100 phones")
    parser.add_argument("--single-phones", type=int, default=1, help="phones for 'single'")
    parser.add_argument("--other-events", type=int, default=30, help="the same, for mqttwarn")
    parser.add_argument("--script-events", type=int, default=2, help="the same, for scripts")
    parser.add_argument("--rate", type=float, default=200.0, help="latency: events per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency: seconds")
    parser.add_argument("--script-seconds", type=float, default=0.5, help="the same, for scripts")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--slow-timeout", type=float, default=600.0, help="fan-out timeout for the others"
    )
    parser.add_argument("--measures", default="fanout,throughput,single,latency")
    parser.add_argument("--quick", action="store_true", help="smoke pass: small and short")
    args = parser.parse_args(argv)
    if args.quick:
        args.phones, args.rounds, args.events, args.seconds = 50, 1, 10, 1.0
        args.script_events, args.script_seconds, args.timeout = 1, 0.1, 30.0
        args.slow_timeout = 60.0
        args.other_events = 5

    measures = {
        "fanout": measure_fanout,
        "throughput": measure_throughput,
        "single": measure_single,
        "latency": measure_latency,
    }
    results: dict[str, dict[str, Any]] = {}
    for system in args.systems.split(","):
        results[system] = {}
        for measure in args.measures.split(","):
            print(f"{system}: {measure} ...", flush=True)
            try:
                results[system][measure] = measures[measure](system, args)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                results[system][measure] = {"error": str(exc)[-500:]}
                print(f"  failed: {str(exc)[-300:]}")
    ratios = _ratios(results)
    _print(results, ratios, args)
    c.write_record(
        "alternatives",
        {
            "args": vars(args),
            "results": results,
            "ratios": ratios,
            "versions": {"mqttwarn": _mqttwarn_version(), **c.versions("phonepush")},
        },
    )
    return 0


def _fig(results: dict[str, Any], system: str, measure: str, key: str) -> float | None:
    value = results.get(system, {}).get(measure, {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def _ratios(results: dict[str, Any]) -> dict[str, float | None]:
    ours_fan = _fig(results, "phonepush", "fanout", "median_s")
    ours_tp = _fig(results, "phonepush", "throughput", "per_second")
    ours_p50 = _fig(results, "phonepush", "latency", "p50_ms")
    ratios: dict[str, float | None] = {}
    for system in results:
        if system == "phonepush":
            continue
        fan = _fig(results, system, "fanout", "median_s")
        tp = _fig(results, system, "throughput", "per_second")
        p50 = _fig(results, system, "latency", "p50_ms")
        ratios[f"fanout_x_faster_than_{system}"] = (
            round(fan / ours_fan, 1) if fan and ours_fan else None
        )
        ratios[f"throughput_x_{system}"] = round(ours_tp / tp, 2) if tp and ours_tp else None
        ratios[f"latency_p50_x_lower_than_{system}"] = (
            round(p50 / ours_p50, 1) if p50 and ours_p50 else None
        )
    return ratios


def _print(results: dict[str, Any], ratios: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n{'system':<14}{'fan-out ' + str(args.phones) + ' s':>16}{'deliveries/s':>14}"
        f"{'CPU ms/deliv':>14}{'lat p50 ms':>12}{'lat p99 ms':>12}"
    )
    for system, measures in results.items():
        fan = measures.get("fanout", {})
        tp = measures.get("throughput", {})
        lat = measures.get("latency", {})
        fan_s = fan.get("median_s")
        fan_text = f"{fan_s:.2f}" if isinstance(fan_s, float) else str(fan.get("answered", "-"))
        print(
            f"{system:<14}{fan_text:>16}{tp.get('per_second', '-')!s:>14}"
            f"{tp.get('cpu_ms_per_delivery', '-')!s:>14}{lat.get('p50_ms', '-')!s:>12}"
            f"{lat.get('p99_ms', '-')!s:>12}"
        )
    for key, value in ratios.items():
        print(f"  {key}: {value}")


def _mqttwarn_version() -> str | None:
    pip = MQTTWARN_VENV / "bin" / "pip"
    if not pip.exists():
        return None
    shown = subprocess.run([str(pip), "show", "mqttwarn"], capture_output=True, text=True)
    for line in shown.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


if __name__ == "__main__":
    sys.exit(main())
