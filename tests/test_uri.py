"""The URI grammar: the reference client's, Cisco's additions, and what a phone refuses."""

from __future__ import annotations

import pytest

from phonepush.errors import InvalidURI, WireError
from phonepush.wire.cisco import execute_xml
from phonepush.wire.uri import ExecuteItem, parse_target, validate_uri

VALID = [
    # the reference client's grammar
    "Dial:1234",
    "Dial:*67#",
    "EditDial:5551212",
    "Key:Headset",
    "SoftKey:Exit",
    "Init:Services",
    "Play:Chime.raw",
    "Play:ring-1_a.raw",
    "Display:On",
    "Display:Off:5",
    "Display:Default",
    "http://192.0.2.10:8080/pages/abc",
    "https://example.com/x?a=1&b=2",
    # Cisco's additions
    "Dial:12,34A#",
    "Dial:1234:1:app:1",
    "Dial:918005551212:1:Cisco/Dialer",
    "Dial:1234:1:",
    "Dial:1234:0::1",
    "Dial:*86",
    "Dial:#",
    "SendDigits:1234",
    "SendDigits:1234:1",
    "SendDigits:12,34#::com.example.app",
    "SendDigits:1234:0:app_1",
    "SendDigits:1234:1::app_1",
    "SendDigits:6185551212,,987654321,1234:1:Cisco/Dialer",
    "Play:Stop",
    "Display:On:0",
    "Display:On:1440",
    "App:com.example.app",
    "RTPRx:192.0.2.1:20480",
    "RTPRx:192.0.2.1:32768:100",
    "RTPMRx:239.1.1.1:20480:50",
    "RTPTx:192.0.2.1:24000",
    "RTPMTx:239.0.0.1:30000",
    "RTPRx:Stop",
    "Key:Line120",
    "Key:KeyPadPound",
]

INVALID = [
    "",
    "Dial:",
    "Dial:12x",
    # Not in the notes' alphabet: an E.164 number is written as the dial plan dials it.
    "Dial:+41446681800",
    "Dial:+41446681800:1:app",
    "EditDial:+41446681800",
    "Dial:+",
    "Dial:++41",
    "Dial:41+44",
    "Dial:+41 44 668 18 00",
    "EditDial:+",
    "SendDigits:+41",
    "Dial:1234:1:app:fb",
    "Dial:1234:yes:app",
    "Dial:1234:1",
    "Dial:1234:1:a b",
    "Dial:1234:1:" + "a" * 65,
    "Dial:1234:1:app:1:1",
    "Key:Head set",
    "Key:",
    "Play:",
    "Play:a/b.raw",
    "Play:" + "a" * 26,
    "Display:Blink",
    "Display:On:1441",
    "Display:On:-1",
    "Notify:x",
    "ftp://example.com/x",
    "http://",
    "SendDigits:1234:",
    "SendDigits:1234::",
    "SendDigits:1234:x",
    # The feedback flag is 0 or 1 (a phone answers Invalid URI to anything else).
    "SendDigits:1234:2",
    "SendDigits:1234:2:app",
    "http://a b",
    "http://a\x07b",
    "Key:Headset\n",
    "RTPRx:192.0.2.1:20481",
    "RTPRx:192.0.2.1:20478",
    "RTPRx:192.0.2.1:32770",
    "RTPRx:192.0.2.1:20480:101",
    "RTPRx:239.1.1.1:20480",
    "RTPMRx:192.0.2.1:20480",
    "RTPMRx:224.0.1.1:20480",
    "RTPRx:300.1.1.1:20480",
    "RTPTx:192.0.2.1:20480:50",
    "http://example.com/" + "x" * 240,
]


@pytest.mark.parametrize("uri", VALID)
def test_phone_accepts(uri: str) -> None:
    assert validate_uri(uri) == uri


@pytest.mark.parametrize("uri", INVALID)
def test_phone_refuses(uri: str) -> None:
    with pytest.raises(InvalidURI) as info:
        validate_uri(uri)
    assert str(info.value).startswith(f"Invalid URL: {uri}")


@pytest.mark.parametrize(
    ("uri", "normalised"),
    [
        ("HTTP://192.0.2.10/Pages/X", "http://192.0.2.10/Pages/X"),
        ("Https://example.com/A?B=C", "https://example.com/A?B=C"),
        ("hTtP://h/x", "http://h/x"),
    ],
)
def test_http_schemes_in_any_case_are_sent_lower_case(uri: str, normalised: str) -> None:
    assert validate_uri(uri) == normalised
    assert parse_target(f"{uri}@1") == ExecuteItem(normalised, 1)
    assert f'URL="{normalised}"' in execute_xml([ExecuteItem(uri)])


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("Play:Chime.raw", ExecuteItem("Play:Chime.raw", 0)),
        ("Play:Chime.raw@2", ExecuteItem("Play:Chime.raw", 2)),
        ("http://u@host/x@1", ExecuteItem("http://u@host/x", 1)),
    ],
)
def test_parse_target(argument: str, expected: ExecuteItem) -> None:
    assert parse_target(argument) == expected


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("Play:Chime.raw@3", "Invalid priority: 3"),
        ("Play:Chime.raw@x", "Invalid priority: x"),
        ("Play:Chime.raw@-1", "Invalid priority: -1"),
        ("Blah:1@1", "Invalid URL: Blah:1"),
        # the priority is checked before the URL, as the reference client does
        ("Blah:1@9", "Invalid priority: 9"),
    ],
)
def test_parse_target_errors_match_reference(argument: str, message: str) -> None:
    with pytest.raises(WireError) as info:
        parse_target(argument)
    assert str(info.value) == message


def test_a_refused_number_says_what_a_phone_dials() -> None:
    with pytest.raises(InvalidURI, match=r"takes no \+, only 0-9 # \* A-D and commas; write \+41"):
        validate_uri("Dial:+41446681800")
