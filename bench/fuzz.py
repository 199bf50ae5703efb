"""Fuzz the phone-response parser, the URI validator, template rendering, silence matchers, the
bounded JSON decoder, the webhook endpoint, the silences API, MQTT payload depth and size, and the
end-to-end push structure, with the strategies and checks of tests/test_hostile_input.py.

    .venv/bin/python bench/fuzz.py                       # 10,000 cases per target
    .venv/bin/python bench/fuzz.py --examples 50000 --targets response,uri
    .venv/bin/python bench/fuzz.py --examples 200        # a quick pass

Unlike a test run, a failing case does not stop the target: every case runs, failures are
counted and the first few printed. A case slower than ``--hang`` seconds counts as a failure (a
hang). Prints cases / failures / time per target, and exits 1 if anything failed. The webhook,
silences, mqtt and structure targets run the real daemon and a simulated phone on 127.0.0.1 (mqtt
also a mosquitto broker); the mqtt_size target runs the real MQTT source against a mosquitto
started for the run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import test_hostile_input as hostile  # noqa: E402
from _daemon_fixtures import free_port  # noqa: E402
from _mqtt_fixtures import Broker  # noqa: E402

ALL_TARGETS = (
    "response",
    "uri",
    "template",
    "silence",
    "depth",
    "webhook",
    "silences",
    "mqtt",
    "mqtt_size",
    "structure",
)


@dataclass
class Result:
    name: str
    what: str
    cases: int = 0
    failures: int = 0
    slowest: float = 0.0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)


def _run(
    name: str,
    what: str,
    strategy: SearchStrategy[Any],
    check: Callable[[Any], None],
    examples: int,
    hang: float,
) -> Result:
    result = Result(name, what)

    def counted(example: Any) -> None:
        result.cases += 1
        start = time.perf_counter()
        try:
            check(example)
            failure = ""
        except Exception:  # noqa: BLE001 - every failure is counted, none stops the run
            failure = traceback.format_exc(limit=3)
        elapsed = time.perf_counter() - start
        result.slowest = max(result.slowest, elapsed)
        if not failure and elapsed > hang:
            failure = f"hang: {elapsed:.1f} s"
        if failure:
            result.failures += 1
            if len(result.examples) < 3:
                result.examples.append(f"{example!r:.300}\n{failure}")

    run: Callable[[], None] = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        # No shrinking: failures are counted, not minimised.
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )(given(strategy)(counted))
    start = time.perf_counter()
    run()
    result.seconds = time.perf_counter() - start
    # Printed as soon as known, so a long run that is stopped still leaves its figures.
    print(f"  {result.cases} cases, {result.failures} failures, {result.seconds:.1f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000, help="cases per target")
    parser.add_argument(
        "--targets", default=",".join(ALL_TARGETS), help=f"comma-separated: {ALL_TARGETS}"
    )
    parser.add_argument("--hang", type=float, default=5.0, help="seconds that make a case a hang")
    args = parser.parse_args(argv)
    # The daemon logs every refused event; thousands of such lines would bury the figures.
    logging.basicConfig(level=logging.CRITICAL)
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(wanted) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")

    results: list[Result] = []
    pure = {t.name: t for t in hostile.TARGETS}
    for name in wanted:
        if name in pure:
            target = pure[name]
            print(f"fuzzing {name} ({target.what}) ...", flush=True)
            results.append(
                _run(name, target.what, target.strategy, target.check, args.examples, args.hang)
            )
    daemon_targets = [n for n in wanted if n in ("webhook", "silences", "structure")]
    if daemon_targets:
        with (
            tempfile.TemporaryDirectory(prefix="phonepush-fuzz-") as tmp,
            hostile.BackgroundDaemon(Path(tmp)) as daemon,
        ):
            if "webhook" in daemon_targets:
                print("fuzzing webhook (POST /hooks/<name> of the running daemon) ...", flush=True)
                check = hostile.webhook_check(daemon.url)
                with check.client:  # type: ignore[attr-defined]
                    results.append(
                        _run(
                            "webhook",
                            "webhook endpoint",
                            hostile.hook_example,
                            check,
                            args.examples,
                            args.hang,
                        )
                    )
            if "silences" in daemon_targets:
                print("fuzzing silences (POST /api/silences of the running daemon) ...", flush=True)
                api = hostile.silences_api_check(daemon.url)
                with api.client:  # type: ignore[attr-defined]
                    results.append(
                        _run(
                            "silences",
                            "silences API",
                            hostile.silences_example,
                            api,
                            args.examples,
                            args.hang,
                        )
                    )
            if "structure" in daemon_targets:
                print("fuzzing structure (event -> rule -> push -> phone) ...", flush=True)
                structure = hostile.structure_check(daemon)
                with structure.client:  # type: ignore[attr-defined]
                    result = _run(
                        "structure",
                        "payload cannot change the pushed XML",
                        hostile.hostile_event,
                        structure,
                        args.examples,
                        args.hang,
                    )
                result.what += f" ({structure.pushed} pushed and parsed)"  # type: ignore[attr-defined]
                results.append(result)
    if "mqtt" in wanted:
        with tempfile.TemporaryDirectory(prefix="phonepush-fuzz-mqtt-") as tmp:
            broker = Broker(Path(tmp), free_port())
            broker.write_conf()
            broker.start()
            try:
                with hostile.BackgroundDaemon(Path(tmp), mqtt_url=broker.url) as daemon:
                    print("fuzzing mqtt (payloads nested to any depth, via mosquitto) ...")
                    results.append(
                        _run(
                            "mqtt",
                            "MQTT payload depth: taken, JSON or text as the limit says",
                            hostile.nested_example,
                            hostile.mqtt_depth_check(daemon, broker),
                            args.examples,
                            args.hang,
                        )
                    )
            finally:
                broker.stop()

    if "mqtt_size" in wanted:
        results.append(_fuzz_mqtt_size(args.examples, args.hang))

    print()
    print(f"{'target':<10} {'cases':>7} {'failures':>8} {'seconds':>8} {'slowest':>8}  what")
    for r in results:
        print(
            f"{r.name:<10} {r.cases:>7} {r.failures:>8} {r.seconds:>8.1f} {r.slowest:>7.3f}s  "
            f"{r.what}"
        )
    for r in results:
        for example in r.examples:
            print(f"\n--- {r.name} failure ---\n{example}")
    return 1 if any(r.failures for r in results) else 0


def _fuzz_mqtt_size(examples: int, hang: float) -> Result:
    from _mqtt_fixtures import Broker, _free_port

    print("fuzzing mqtt_size (payload sizes around mqtt.max_payload) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="phonepush-fuzz-mqtt-") as tmp:
        broker = Broker(Path(tmp), _free_port())
        broker.write_conf()
        broker.start()
        try:
            with hostile.BackgroundMqtt(
                broker.url, lambda: broker.log_text, broker.publish
            ) as mqtt:
                return _run(
                    "mqtt_size",
                    f"MQTT payload sizes around max_payload = {hostile.MQTT_LIMIT}",
                    hostile.mqtt_size_example,
                    mqtt.check,
                    examples,
                    hang,
                )
        finally:
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
