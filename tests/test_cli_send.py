"""``phonepush send`` / ``background`` / ``ringtone`` from the shell.

Parity with the reference ``cgiexecute`` client is pinned by golden values recorded by running the
reference (``/work/shared/seed/cgi-execute.txt``) with the same arguments against the same
recording server; its name in messages is replaced by ``{prog}``. With
``PHONEPUSH_REFERENCE_CGIEXECUTE`` pointing at a copy of the reference script, one more test runs
both side by side. The rest runs the CLI against simulated phones.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from _sim_fixtures import MakeFleet
from phonepush.commands import send
from phonepush.sim.simulator import Fleet

PROG = "phonepush send"
REFERENCE_ENV = "PHONEPUSH_REFERENCE_CGIEXECUTE"
PROLOG = '<?xml version="1.0" encoding="UTF-8"?>'

# (arguments, stderr) of the reference for argument errors; it exits 1 and prints nothing on stdout.
USAGE_GOLDEN = [
    ([], "No URLs specified"),
    (["Key:Headset"], "No host specified"),
    (["-h"], "Option -h requires argument. Try '{prog} --help' for more information"),
    (["--host"], "Option --host requires argument. Try '{prog} --help' for more information"),
    (["-x"], "Option -x not recognized. Try '{prog} --help' for more information"),
    (["--bogus"], "Option --bogus not recognized. Try '{prog} --help' for more information"),
    (["--h", "x"], "Option --h not a unique prefix. Try '{prog} --help' for more information"),
    (
        ["--help=yes"],
        "Option --help must not have an argument. Try '{prog} --help' for more information",
    ),
    (["-h", "phone:abc", "Key:Headset"], "Invalid port: abc"),
    (["-h", "phone:0", "Key:Headset"], "Invalid port: 0"),
    (["-h", "phone:65536"], "Invalid port: 65536"),
    (["-h", "phone:-1"], "Invalid port: -1"),
    (["-h", "phone:"], "Invalid port: "),
    (["-h", "bad_host"], "Invalid host: bad_host"),
    (["-h", "bad host:80"], "Invalid host: bad host"),
    (["-h", "::1"], "Invalid host: :"),
    (["-h", "a..b"], "Invalid host: a..b"),
    (["-h", ".a"], "Invalid host: .a"),
    (["-h", "phone", "-t", "x", "Key:Headset"], "Invalid timeout: x"),
    (["-t", "1.5"], "Invalid timeout: 1.5"),
    (["-t", ""], "Invalid timeout: "),
    (["-h", "phone"], "No URLs specified"),
    (["-h", "phone", "Key:Headset@3"], "Invalid priority: 3"),
    (["-h", "phone", "Key:Headset@x"], "Invalid priority: x"),
    (["-h", "phone", "Key:Headset@"], "Invalid priority: "),
    (["-h", "phone", "Key:Headset@-1"], "Invalid priority: -1"),
    (["-h", "phone", "Foo:bar"], "Invalid URL: Foo:bar"),
    (["-h", "phone", "Dial:12a"], "Invalid URL: Dial:12a"),
    (["-h", "phone", "http://a b"], "Invalid URL: http://a b"),
    (["-h", "phone", "a@b@1"], "Invalid URL: a@b"),
    (["Key:A", "Key:B", "Key:C", "Key:D"], "A maximum of 3 URLs can be specified"),
    (["Key:A", "Key:B", "Key:C", "Bad"], "Invalid URL: Bad"),
    (["Key:A", "Key:B@9", "Key:C", "Key:D"], "Invalid priority: 9"),
    (["-h", "bad_host", "-H"], "Invalid host: bad_host"),
    (["-H", "-h", "x:y"], "Invalid port: y"),
    (["--timeout=abc"], "Invalid timeout: abc"),
    (["-t", "5", "Key:Headset@1"], "No host specified"),
    (["-h", "phone", "--", "-H"], "Invalid URL: -H"),
    (["Display:On:5", "Play:x.raw", "EditDial:*1#"], "No host specified"),
    (["-h", "phone", "-u", "bob", "Init:Foo bar"], "Invalid URL: Init:Foo bar"),
    (["--ho", "x:1:2", "Key:A"], "Invalid host: x:1"),
    (["-hphone:99999"], "Invalid port: 99999"),
    (["-h", "phone", "Display:Maybe"], "Invalid URL: Display:Maybe"),
]


def _response(*items: tuple[str, str, int]) -> bytes:
    body = "".join(f'<ResponseItem URL="{u}" Data="{d}" Status="{s}" />' for u, d, s in items)
    return f"{PROLOG}<CiscoIPPhoneResponse>{body}</CiscoIPPhoneResponse>".encode()


def _error(number: int) -> bytes:
    return f'{PROLOG}<CiscoIPPhoneError Number="{number}">x</CiscoIPPhoneError>'.encode()


# A phone's answer (status, Content-Type, body) to `send -h HOST Key:Headset Dial:1234` and the
# reference's (exit status, stdout, stderr).
ANSWER_GOLDEN = {
    "two items": (
        (200, "text/xml", _response(("Key:Headset", "Success", 0), ("Dial:1234", "Success", 0))),
        (0, "Key:Headset: Success\nDial:1234: Success\n", ""),
    ),
    "an item refused": (
        (
            200,
            "text/xml",
            _response(("Key:Headset", "Success", 0), ("Dial:1234", "No Active Call", 6)),
        ),
        (0, "Key:Headset: Success\nDial:1234: No Active Call\n", ""),
    ),
    "charset parameter": (
        (200, "text/xml; charset=utf-8", _response(("Key:Headset", "Success", 0))),
        (0, "Key:Headset: Success\n", ""),
    ),
    "escaped attributes": (
        (200, "text/xml", _response(("http://x/?a=1&amp;b=&quot;q&quot;", "Success", 0))),
        (0, 'http://x/?a=1&b="q": Success\n', ""),
    ),
    "no items": ((200, "text/xml", _response()), (0, "", "")),
    "error 1": (
        (200, "text/xml", _error(1)),
        (1, "", "Error: Error parsing CiscoIPPhone object\n"),
    ),
    "error 2": (
        (200, "text/xml", _error(2)),
        (1, "", "Error: Error framing CiscoIPPhone object\n"),
    ),
    "error 3": ((200, "text/xml", _error(3)), (1, "", "Error: Internal file error\n")),
    "error 4": ((200, "text/xml", _error(4)), (1, "", "Error: Authentication error\n")),
    "error 6": ((200, "text/xml", _error(6)), (1, "", "Error: 6\n")),
    "error 99": ((200, "text/xml", _error(99)), (1, "", "Error: 99\n")),
    "error 4 with HTTP 401": (
        (401, "text/xml", _error(4)),
        (1, "", "Error: Authentication error\n"),
    ),
    "error 6 with HTTP 500": ((500, "text/xml", _error(6)), (1, "", "Error: 6\n")),
}

# Where we differ from the reference on purpose (see phonepush.commands.send): its output, ours.
ANSWER_DIVERGENCES = {
    "HTML 404": (
        (404, "text/html", b"<html>not found</html>"),
        (1, "", "Unexpected Content-Type: text/html\n"),
        (1, "", "HTTP status 404\n"),
    ),
    "HTML 401": (
        (401, "text/html", b"<html>no</html>"),
        (1, "", "Unexpected Content-Type: text/html\n"),
        (1, "", "Error: Authentication error\n"),
    ),
    "empty 200 (multiplatform phone)": (
        (200, "text/xml", b""),
        (1, "", "Document is empty, line 1, column 1 (<string>, line 1)\n"),
        (0, "", ""),
    ),
    # Any 2xx without a CiscoIPPhoneError: the phone took the push (multiplatform firmware).
    "HTML 200 (multiplatform phone)": (
        (200, "text/html", b"<html>hi</html>"),
        (1, "", "Unexpected Content-Type: text/html\n"),
        (0, "", ""),
    ),
    "plain text 200": (
        (200, "text/plain; charset=utf-8", b"ok"),
        (1, "", "Unexpected Content-Type: text/plain; charset=utf-8\n"),
        (0, "", ""),
    ),
}

# `send -u admin -p pässword` with these URLs: the reference's body and Authorization, byte for
# byte, but for two choices of ours. The reference writes html.escape's &#x27; for "'", we write
# &apos;, the entity Cisco's notes list. Its Authorization is ISO-8859-1 ("Basic
# YWRtaW46cORzc3dvcmQ=", as requests does), ours UTF-8 on purpose: phones and /authenticate would
# read the ISO-8859-1 bytes as another password.
REQUEST_ARGS = [
    "-u",
    "admin",
    "-p",
    "pässword",
    "Key:Headset@1",
    "http://192.0.2.1/p?a=1&b=\"x\"<y>'z'",
    "Dial:*67#",
]
REQUEST_BODY = (
    b"XML=%3C%3Fxml+version%3D%221.0%22+encoding%3D%22UTF-8%22%3F%3E%3CCiscoIPPhoneExecute%3E"
    b"%3CExecuteItem+URL%3D%22Key%3AHeadset%22+Priority%3D%221%22+%2F%3E%3CExecuteItem+URL%3D%22"
    b"http%3A%2F%2F192.0.2.1%2Fp%3Fa%3D1%26amp%3Bb%3D%26quot%3Bx%26quot%3B%26lt%3By%26gt%3B"
    b"%26apos%3Bz%26apos%3B%22+Priority%3D%220%22+%2F%3E%3CExecuteItem+URL%3D%22Dial%3A%2A67"
    b"%23%22+Priority%3D%220%22+%2F%3E%3C%2FCiscoIPPhoneExecute%3E"
)
REQUEST_AUTHORIZATION = "Basic YWRtaW46cMOkc3N3b3Jk"


# --- a recording HTTP server ----------------------------------------------------------------------


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    """A real HTTP/1.1 server that records every POST and answers ``answer``."""

    port: int = 0
    answer: tuple[int, str | None, bytes] = (200, "text/xml", b"")
    requests: list[Recorded] = field(default_factory=list)


def _handler(recorder: Recorder) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            recorder.requests.append(Recorded(self.path, dict(self.headers.items()), body))
            status, content_type, answer = recorder.answer
            self.send_response(status)
            if content_type is not None:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    state = Recorder()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != send.PASSWORD_ENV}
    env.update(extra)
    return env


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "phonepush", *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=30,
    )
    return done.returncode, done.stdout, done.stderr


async def _arun(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    # Asynchronous, so the simulated phones in this event loop keep answering.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phonepush",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or _env(),
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- parity with the reference ----------------------------------------------------------------


@pytest.mark.parametrize(("argv", "stderr"), USAGE_GOLDEN)
def test_argument_errors_match_the_reference(
    argv: list[str], stderr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert send.main(argv, prog=PROG) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == stderr.format(prog=PROG) + "\n"


def test_argument_errors_from_the_installed_command() -> None:
    assert _run("send", "--bogus") == (
        1,
        "",
        "Option --bogus not recognized. Try 'phonepush send --help' for more information\n",
    )
    assert _run("send", "-h", "127.0.0.1:0") == (1, "", "Invalid port: 0\n")


@pytest.mark.parametrize("name", ANSWER_GOLDEN)
def test_answers_print_as_the_reference_prints_them(recorder: Recorder, name: str) -> None:
    recorder.answer, expected = ANSWER_GOLDEN[name]
    assert _run("send", "-h", f"127.0.0.1:{recorder.port}", "Key:Headset", "Dial:1234") == expected


@pytest.mark.parametrize("name", ANSWER_DIVERGENCES)
def test_answers_where_we_differ_from_the_reference(recorder: Recorder, name: str) -> None:
    recorder.answer, _reference, ours = ANSWER_DIVERGENCES[name]
    assert _run("send", "-h", f"127.0.0.1:{recorder.port}", "Key:Headset", "Dial:1234") == ours


def test_request_bytes_equal_the_reference(recorder: Recorder) -> None:
    recorder.answer = ANSWER_GOLDEN["two items"][0]
    code, _, err = _run("send", "-h", f"127.0.0.1:{recorder.port}", *REQUEST_ARGS)
    assert (code, err) == (0, "")
    [request] = recorder.requests
    assert request.path == "/CGI/Execute"
    assert request.body == REQUEST_BODY
    assert request.headers["Authorization"] == REQUEST_AUTHORIZATION
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["Content-Length"] == str(len(REQUEST_BODY))
    assert "Transfer-Encoding" not in request.headers
    assert "Expect" not in request.headers


def test_no_credentials_without_a_username(recorder: Recorder) -> None:
    recorder.answer = ANSWER_GOLDEN["two items"][0]
    assert _run("send", "-h", f"127.0.0.1:{recorder.port}", "-p", "secret", "Key:Headset")[0] == 0
    assert "Authorization" not in recorder.requests[0].headers


def _reference() -> str | None:
    path = os.environ.get(REFERENCE_ENV)
    return path if path and Path(path).is_file() else None


@pytest.mark.skipif(
    _reference() is None,
    reason=f"set {REFERENCE_ENV} to a copy of the reference cgiexecute script to compare live",
)
@pytest.mark.parametrize("name", [*ANSWER_GOLDEN, "request bytes", "usage"])
def test_live_against_the_reference(recorder: Recorder, name: str) -> None:
    reference = _reference()
    assert reference is not None
    host = f"127.0.0.1:{recorder.port}"
    if name == "usage":
        cases = [argv for argv, _ in USAGE_GOLDEN]
    elif name == "request bytes":
        cases = [["-h", host, *REQUEST_ARGS]]
        recorder.answer = ANSWER_GOLDEN["two items"][0]
    else:
        cases = [["-h", host, "Key:Headset", "Dial:1234"]]
        recorder.answer = ANSWER_GOLDEN[name][0]
    script = Path(reference).name
    for argv in cases:
        theirs = subprocess.run(
            [sys.executable, reference, *argv], capture_output=True, text=True, timeout=30
        )
        ours = _run("send", *argv)
        assert ours == (
            theirs.returncode,
            theirs.stdout,
            theirs.stderr.replace(f"'{script} --help'", f"'{PROG} --help'"),
        ), argv
    if name == "request bytes":
        theirs_request, ours_request = recorder.requests
        assert ours_request.body == theirs_request.body
        for header in ("Authorization", "Content-Type", "Content-Length"):
            assert ours_request.headers[header] == theirs_request.headers[header]


# --- our own behaviour ------------------------------------------------------------------------


def test_help_has_the_reference_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert send.main(["-H"], prog=PROG) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Usage: phonepush send [OPTIONS] URL[@PRIORITY]..."
    assert lines[1] == "Send CGI Execute URLs to a Cisco IP Phone."
    options = [line.split()[:2] for line in lines if line.startswith("  -")]
    assert options == [
        ["-h,", "--host"],
        ["-t,", "--timeout"],
        ["-u,", "--username"],
        ["-p,", "--password"],
        ["-c,", "--certificate"],
        ["-H,", "--help"],
    ]


@pytest.mark.parametrize(
    ("prog", "usage"),
    [
        ("phonepush background", "Usage: phonepush background [OPTIONS] ICON-URL IMAGE-URL"),
        ("phonepush ringtone", "Usage: phonepush ringtone [OPTIONS] URL"),
    ],
)
def test_help_of_background_and_ringtone(
    prog: str, usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert send.main(["--help"], prog=prog) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == usage
    assert " set to " in out  # says what success prints


@pytest.mark.parametrize(
    ("argv", "stderr"),
    [
        # The reference lets these through to the phone (or to a traceback for -t 0).
        (["-t", "0", "Key:A"], "Invalid timeout: 0"),
        (["-t", "-5", "Key:A"], "Invalid timeout: -5"),
        (
            ["-h", "p", "Play:" + "a" * 26],
            f"Invalid URL: Play:{'a' * 26} (tone file name longer than 25 characters)",
        ),
        (["-h", "p", "Display:On:5000"], "Invalid URL: Display:On:5000 (minutes must be 0-1440)"),
        (["-h", "p", "Key:A\n"], "Invalid URL: Key:A\n"),
        # Three long URLs: over the 512 bytes a phone takes.
        (
            ["-h", "p", *(f"http://192.0.2.1/{c * 200}" for c in "abc")],
            "XML body is 837 bytes; a phone takes at most 512",
        ),
        # Our grammar is wider than the reference's; the next check is the host.
        (["RTPRx:192.0.2.1:20480", "SendDigits:12"], "No host specified"),
    ],
)
def test_checks_beyond_the_reference(
    argv: list[str], stderr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert send.main(argv, prog=PROG) == 1
    assert capsys.readouterr().err == stderr + "\n"


@pytest.mark.parametrize(
    ("prog", "argv", "stderr"),
    [
        ("phonepush background", ["-h", "p"], "No URLs specified"),
        (
            "phonepush background",
            ["-h", "p", "http://a/i"],
            "Expected ICON-URL and IMAGE-URL, got 1 argument",
        ),
        (
            "phonepush background",
            ["-h", "p", "Key:A", "http://a/b.png"],
            "icon URL must be an http:// or https:// URL: 'Key:A'",
        ),
        ("phonepush background", ["http://a/i", "http://a/b.png"], "No host specified"),
        ("phonepush ringtone", ["-h", "p"], "No URLs specified"),
        ("phonepush ringtone", ["-h", "p", "a", "b"], "Expected one URL, got 2 arguments"),
        (
            "phonepush ringtone",
            ["-h", "p", "ftp://a/r.raw"],
            "ring tone URL must be an http:// or https:// URL: 'ftp://a/r.raw'",
        ),
        (
            "phonepush ringtone",
            ["--tone"],
            "Option --tone not recognized. Try 'phonepush ringtone --help' for more information",
        ),
    ],
)
def test_background_and_ringtone_argument_errors(
    prog: str, argv: list[str], stderr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert send.main(argv, prog=prog) == 1
    assert capsys.readouterr().err == stderr + "\n"


def test_unreachable_phone_is_one_clear_line() -> None:
    closed = _closed_port()
    assert _run("send", "-h", f"127.0.0.1:{closed}", "Key:Headset") == (
        1,
        "",
        f"Cannot connect to 127.0.0.1:{closed}: Connection refused\n",
    )


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- against simulated phones -----------------------------------------------------------------


async def test_send_to_a_simulated_phone(fleet: Fleet) -> None:
    phone = fleet.phone(0)
    result = await _arun("send", "-h", phone.address, "Key:Headset", "Dial:1234@1")
    assert result == (0, "Key:Headset: Success\nDial:1234: Success\n", "")
    assert list(phone.state.keys) == ["Key:Headset"]
    assert list(phone.state.dialled) == ["1234"]


@pytest.mark.parametrize(
    ("number", "message"),
    [
        (1, "Error: Error parsing CiscoIPPhone object"),
        (2, "Error: Error framing CiscoIPPhone object"),
        (3, "Error: Internal file error"),
        (4, "Error: Authentication error"),
        (6, "Error: 6"),
    ],
)
async def test_each_phone_error_number(fleet: Fleet, number: int, message: str) -> None:
    phone = fleet.phone(0)
    await phone.set_fault("error", number=number)
    assert await _arun("send", "-h", phone.address, "Key:Headset") == (1, "", message + "\n")


async def test_phone_faults(fleet: Fleet) -> None:
    phone = fleet.phone(0)
    await phone.set_fault("http500")
    assert await _arun("send", "-h", phone.address, "Key:Headset") == (1, "", "HTTP status 500\n")
    await phone.set_fault("garbage")
    code, out, err = await _arun("send", "-h", phone.address, "Key:Headset")
    assert (code, out) == (1, "")
    assert err.startswith("malformed XML: ")
    await phone.set_fault("refuse")
    assert await _arun("send", "-h", phone.address, "Key:Headset") == (
        1,
        "",
        f"Cannot connect to {phone.address}: Connection refused\n",
    )


async def test_timeout_on_a_hanging_phone(fleet: Fleet) -> None:
    phone = fleet.phone(0)
    await phone.set_fault("hang")
    assert await _arun("send", "-t", "1", "-h", phone.address, "Key:Headset") == (
        1,
        "",
        f"Timed out after 1 s waiting for {phone.address}\n",
    )


async def test_credentials(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(phones=1, username="admin", password="s3cret")
    phone = fleet.phone(0)
    host = ["-h", phone.address, "-u", "admin"]
    denied = (1, "", "Error: Authentication error\n")
    assert await _arun("send", *host, "-p", "wrong", "Key:Headset") == denied
    assert await _arun("send", *host, "Key:Headset") == denied
    ok = (0, "Key:Headset: Success\n", "")
    assert await _arun("send", *host, "-p", "s3cret", "Key:Headset") == ok
    # From the environment, out of `ps`; -p wins over it.
    from_env = _env(**{send.PASSWORD_ENV: "s3cret"})
    assert await _arun("send", *host, "Key:Headset", env=from_env) == ok
    assert await _arun("send", *host, "-p", "wrong", "Key:Headset", env=from_env) == denied
    assert [r["user"] for r in phone.state.requests] == ["admin"] * 5


async def test_pinned_certificate(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = await make_fleet(phones=1, tls=True, cert_dir=tmp_path / "phone")
    other = await make_fleet(phones=1, tls=True, cert_dir=tmp_path / "other")
    assert fleet.certificate is not None and other.certificate is not None
    phone = fleet.phone(0)
    pinned = ["-h", phone.address, "-c", str(fleet.certificate), "Key:Headset"]
    assert await _arun("send", *pinned) == (0, "Key:Headset: Success\n", "")
    wrong = ["-h", phone.address, "-c", str(other.certificate), "Key:Headset"]
    code, out, err = await _arun("send", *wrong)
    assert (code, out) == (1, "")
    assert err.startswith(f"Cannot connect to {phone.address}: TLS certificate verify failed")
    missing = ["-h", phone.address, "-c", str(tmp_path / "nope.pem"), "Key:Headset"]
    code, out, err = await _arun("send", *missing)
    assert (code, out) == (1, "")
    assert err.startswith(f"Cannot use certificate {tmp_path / 'nope.pem'}: No such file")
    # Without -c the client speaks plain HTTP to the TLS port: never a success.
    assert (await _arun("send", "-t", "2", "-h", phone.address, "Key:Headset"))[0] == 1


async def test_background_and_ringtone(fleet: Fleet) -> None:
    phone = fleet.phone(0)
    icon, image = "http://192.0.2.1/icon.png", "http://192.0.2.1/image.png"
    assert await _arun("background", "-h", phone.address, icon, image) == (
        0,
        f"Background set to {image}\n",
        "",
    )
    assert phone.state.background == {"icon": icon, "image": image}
    tone = "http://192.0.2.1/tone.raw"
    assert await _arun("ringtone", "-h", phone.address, tone) == (
        0,
        f"Ring tone set to {tone}\n",
        "",
    )
    assert phone.state.ringtone == tone
    await phone.set_fault("error", number=4)
    assert await _arun("ringtone", "-h", phone.address, tone) == (
        1,
        "",
        "Error: Authentication error\n",
    )
