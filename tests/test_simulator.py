"""The phone simulator, spoken to over real sockets by httpx, requests and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import requests
import requests.adapters
import requests.auth
from lxml import etree

from _sim_fixtures import MakeFleet
from phonepush.errors import InvalidURI, PhoneAuthError, PhoneBadResponse, PhoneRejected
from phonepush.sim.phone import read_uri
from phonepush.sim.simulator import Fleet, SimPhone
from phonepush.sim.simulator import SoftKey as SimSoftKey
from phonepush.wire.cisco import (
    ResponseItem,
    SoftKey,
    TextPage,
    background_xml,
    execute_xml,
    form_body,
    parse_response,
    ringtone_xml,
    text_xml,
)
from phonepush.wire.uri import ExecuteItem, validate_uri

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def raw_execute(*urls: str) -> str:
    """A CiscoIPPhoneExecute built by hand, as the reference client does (no validation)."""
    items = "".join(f'<ExecuteItem URL="{escape(u)}" Priority="0" />' for u in urls)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><CiscoIPPhoneExecute>{items}</CiscoIPPhoneExecute>'
    )


async def push(
    phone: SimPhone, xml: str, *, auth: tuple[str, str] | None = None, **kwargs: Any
) -> httpx.Response:
    async with httpx.AsyncClient(auth=auth, **kwargs) as client:
        return await client.post(phone.url, content=form_body(xml), headers=FORM)


def items_of(response: httpx.Response) -> list[ResponseItem]:
    return parse_response(
        response.content, response.headers.get("content-type"), response.status_code
    )


async def raw_request(phone: SimPhone, request: bytes) -> bytes:
    """Send bytes, read the answer until the phone closes the connection."""
    reader, writer = await asyncio.open_connection(phone.host, phone.port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


class PageServer:
    """A tiny real HTTP server: serves fixed answers by path and records what it was asked."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, bytes]] = {}
        self.seen: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        target = head[0].split(" ")[1]
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        parts = urlsplit(target)
        self.seen.append((parts.path, parse_qs(parts.query), headers))
        status, body = self.pages.get(parts.path, (404, b"no such page"))
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()


@asynccontextmanager
async def page_server() -> AsyncIterator[PageServer]:
    pages = PageServer()
    server = await asyncio.start_server(pages._serve, "127.0.0.1", 0)
    pages.port = server.sockets[0].getsockname()[1]
    async with server:
        yield pages


# --- pushes ---------------------------------------------------------------------------------


async def test_items_succeed_and_change_the_phone(fleet: Fleet) -> None:
    phone = fleet.phones[1]
    xml = execute_xml(
        [ExecuteItem("Dial:1234"), ExecuteItem("Display:On:10"), ExecuteItem("Key:Headset")]
    )
    response = await push(phone, xml)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert items_of(response) == [
        ResponseItem("Dial:1234", "Success", 0),
        ResponseItem("Display:On:10", "Success", 0),
        ResponseItem("Key:Headset", "Success", 0),
    ]
    assert list(phone.state.dialled) == ["1234"]
    assert (phone.state.backlight.state, phone.state.backlight.minutes) == ("On", 10)
    assert list(phone.state.keys) == ["Key:Headset"]
    assert phone.state.pushes == 1 and phone.state.errors == 0
    assert fleet.phones[0].state.pushes == 0
    record = phone.state.requests[-1]
    assert record["xml"] == xml
    assert record["items"][0] == {"url": "Dial:1234", "priority": 0}


async def test_reference_client_request_is_understood(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(username="admin", password="s3cret")
    phone = fleet.phones[0]

    def cgi_execute() -> tuple[str, list[tuple[str | None, str]]]:
        # As the reference cgiexecute script posts: requests, form data, Basic auth.
        xml = raw_execute("Dial:5551234", "Init:Services")
        session = requests.Session()
        response = session.post(
            f"http://{phone.host}:{phone.port}/CGI/Execute",
            timeout=10,
            auth=requests.auth.HTTPBasicAuth("admin", "s3cret"),
            data={"XML": xml},
        )
        document = etree.fromstring(response.content)
        items = [(e.get("URL"), e.get("Data", "")) for e in document.findall("ResponseItem")]
        return response.headers["Content-Type"], items

    content_type, items = await asyncio.to_thread(cgi_execute)
    assert content_type[0:8] == "text/xml"
    assert items == [("Dial:5551234", "Success"), ("Init:Services", "Success")]
    record = phone.state.requests[-1]
    assert record["authorization"] is True and record["user"] == "admin"
    assert "s3cret" not in json.dumps(phone.to_dict())


async def test_invalid_uri_fails_only_that_item(fleet: Fleet) -> None:
    response = await push(fleet.phones[0], raw_execute("Dial:12", "Bogus:thing", "Key:Mute"))
    assert items_of(response) == [
        ResponseItem("Dial:12", "Success", 0),
        ResponseItem("Bogus:thing", "Invalid URI", 1),
        ResponseItem("Key:Mute", "Success", 0),
    ]


# Each URI pushed alone; the phone's ResponseItem Status and Data for it.
URI_ANSWERS = [
    ("Key:Headset", 0, "Success"),
    ("Key:Line120", 0, "Success"),
    ("Key:KeyPadPound", 0, "Success"),
    ("Key:NavDwn", 0, "Success"),
    ("Key:headset", 1, "Invalid URI"),  # names are exact
    ("Key:Line121", 1, "Invalid URI"),
    ("Key:Head", 1, "Invalid URI"),
    ("SoftKey:Select", 0, "Success"),
    ("SoftKey:Dance", 1, "Invalid URI"),
    ("Init:CallHistory", 0, "Success"),
    ("Init:Foo", 1, "Invalid URI"),
    ("Dial:5551234,,#*AD", 0, "Success"),
    ("Dial:5551234:1:Cisco/Dialer", 0, "Success"),
    ("Dial:5551234:0:app:1", 0, "Success"),
    ("Dial:555E", 1, "Invalid URI"),
    ("Dial:1:2:app", 1, "Invalid URI"),
    ("EditDial:*1#", 0, "Success"),
    ("Dial:+41446681800", 1, "Invalid URI"),
    ("EditDial:+41446681800", 1, "Invalid URI"),
    ("Dial:1234:1:", 0, "Success"),
    ("Dial:+", 1, "Invalid URI"),
    ("Dial:41+44", 1, "Invalid URI"),
    ("SendDigits:+41", 1, "Invalid URI"),
    ("SendDigits:123:1::app", 0, "Success"),
    ("SendDigits:123::app", 0, "Success"),
    ("SendDigits:6185551212,,987654321,1234:1:Cisco/Dialer", 0, "Success"),
    ("SendDigits:", 1, "Invalid URI"),
    ("Play:Chime.raw", 0, "Success"),
    ("Play:Ring7.raw", 0, "Success"),
    ("Play:Stop", 0, "Success"),
    ("Play:NotOnThePhone.raw", 6, "URI not found"),
    ("Play:" + "a" * 26, 1, "Invalid URI"),
    ("Play:../x.raw", 1, "Invalid URI"),
    ("Display:Default:0", 0, "Success"),
    ("Display:Off:1440", 0, "Success"),
    ("Display:On:1441", 1, "Invalid URI"),
    ("Display:on", 1, "Invalid URI"),
    ("RTPRx:10.0.0.5:20480:100", 0, "Success"),
    ("RTPMRx:239.1.1.1:32768", 0, "Success"),
    ("RTPTx:10.0.0.5:20482", 0, "Success"),
    ("RTPMTx:Stop", 0, "Success"),
    ("RTPRx:10.0.0.5:20481", 1, "Invalid URI"),  # odd port
    ("RTPRx:10.0.0.5:20480:101", 1, "Invalid URI"),
    ("RTPMRx:224.0.1.1:20480", 1, "Invalid URI"),
    ("RTPRx:239.1.1.1:20480", 1, "Invalid URI"),  # unicast needs a unicast address
    ("RTPTx:10.0.0.5:20480:50", 1, "Invalid URI"),  # no volume on transmit
    ("Notify:x", 1, "Invalid URI"),
    ("Bogus:thing", 1, "Invalid URI"),
    ("http://127.0.0.1:1/" + "x" * 238, 1, "Invalid URI"),  # over 256 characters
    ("HTTP://127.0.0.1:1/gone", 6, "URI not found"),  # understood: fetched, nothing there
]


async def test_uri_grammar_and_tables(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(rtp=False)
    phone = fleet.phones[0]
    got = [
        (uri, item.status, item.data)
        for uri, _, _ in URI_ANSWERS
        for item in items_of(await push(phone, raw_execute(uri)))
    ]
    assert got == URI_ANSWERS
    executed = [uri for uri, status, _ in URI_ANSWERS if status == 0]
    assert list(phone.state.executed) == executed


DIALS = [
    "Dial:+41446681800",
    "Dial:+41446681800,,12#",
    "Dial:*86",
    "Dial:#31#",
    "Dial:1234:1:",
    "Dial:1234:0::1",
    "Dial:918005551212:1:Cisco/Dialer",
    "EditDial:+41446681800",
    "Dial:+",
    "Dial:++41",
    "Dial:41+44",
    "Dial:1234:1",
    "Dial:1234:2:app",
    "Dial:1234:1:app:fb",
    "SendDigits:+41",
    "SendDigits:1234:1",
    "SendDigits:1234:2",
    "SendDigits:1234:1:Cisco/Dialer",
    "SendDigits:1234::app",
    "SendDigits:1234:1::app",
    "SendDigits:1234:1:a:b",
]


@pytest.mark.parametrize("uri", DIALS)
def test_the_daemon_sends_the_dial_uris_a_phone_takes_and_only_those(uri: str) -> None:
    # Two readings of the notes, one the daemon's and one the simulated phone's: they must
    # agree, or a rule is refused that a phone would dial, or fails on every phone it reaches.
    try:
        validate_uri(uri)
    except InvalidURI:
        sent = False
    else:
        sent = True
    assert sent == (read_uri(uri) is not None)


async def test_play_files_are_the_phones(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(play_files=["Doorbell.raw"], tone_ms=10)
    phone = fleet.phones[0]
    items = items_of(await push(phone, raw_execute("Play:Doorbell.raw", "Play:Chime.raw")))
    assert items == [
        ResponseItem("Play:Chime.raw", "URI not found", 6),
        ResponseItem("Play:Doorbell.raw", "Success", 0),
    ]
    assert list(phone.state.tones) == ["Doorbell.raw"]
    with pytest.raises(ValueError, match="ring file"):
        Fleet(play_files=["../etc/passwd"])


async def test_uppercase_http_scheme_is_fetched(fleet: Fleet) -> None:
    async with page_server() as pages:
        pages.pages["/p"] = (200, text_xml(TextPage(title="Upper", text="x")).encode())
        url = pages.url("/p").replace("http://", "HTTP://")
        assert items_of(await push(fleet.phones[0], raw_execute(url))) == [
            ResponseItem(url, "Success", 0)
        ]
    assert fleet.phones[0].state.screen.title == "Upper"


def pad_to(size: int) -> str:
    """A valid one-item CiscoIPPhoneExecute of exactly ``size`` bytes."""
    bare = raw_execute("Dial:1", "Dial:2")
    return bare.replace("<ExecuteItem", " " * (size - len(bare)) + "<ExecuteItem", 1)


async def test_512_byte_limit(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    exactly = pad_to(512)
    assert len(exactly.encode()) == 512
    assert items_of(await push(phone, exactly))[0].ok
    with pytest.raises(PhoneRejected) as caught:
        items_of(await push(phone, pad_to(513)))
    assert caught.value.number == 1
    assert list(phone.state.executed) == ["Dial:1", "Dial:2"]


@pytest.mark.parametrize(
    ("xml", "number"),
    [
        ('<?xml version="1.0" encoding="UTF-16"?><CiscoIPPhoneExecute/>', 1),
        ('<ciscoIPPhoneExecute><ExecuteItem URL="Dial:1"/></ciscoIPPhoneExecute>', 1),
        ('<CiscoIPPhoneExecute><executeItem URL="Dial:1"/></CiscoIPPhoneExecute>', 1),
        ('<CiscoIPPhoneExecute><ExecuteItem url="Dial:1"/></CiscoIPPhoneExecute>', 1),
        ('<CiscoIPPhoneExecute><ExecuteItem URL="Dial:1" Priority="3"/></CiscoIPPhoneExecute>', 2),
        ("<CiscoIPPhoneExecute><ExecuteItem/></CiscoIPPhoneExecute>", 2),
        ("<CiscoIPPhoneExecute></CiscoIPPhoneExecute>", 2),
        ("<CiscoIPPhoneText><Text>x</Text></CiscoIPPhoneText>", 2),
        ("<setRingTone><ringtone>http://h/r.raw</ringtone></setRingTone>", 1),
        (
            '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
            '<CiscoIPPhoneExecute><ExecuteItem URL="Dial:&e;"/></CiscoIPPhoneExecute>',
            1,
        ),
        (
            '<!DOCTYPE x [<!ENTITY a "1111111111">]>'
            '<CiscoIPPhoneExecute><ExecuteItem URL="Dial:&a;"/></CiscoIPPhoneExecute>',
            1,
        ),
    ],
    ids=[
        "utf16",
        "root-case",
        "item-case",
        "attribute-case",
        "priority",
        "no-url",
        "no-items",
        "text-object",
        "ringtone-case",
        "external-entity",
        "internal-entity",
    ],
)
async def test_objects_a_phone_cannot_read_or_act_on(fleet: Fleet, xml: str, number: int) -> None:
    phone = fleet.phones[0]
    with pytest.raises(PhoneRejected) as caught:
        items_of(await push(phone, xml))
    assert caught.value.number == number
    assert not phone.state.executed


async def test_without_prolog_the_phone_reads_its_locale_charset(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    ascii_only = '<CiscoIPPhoneExecute><ExecuteItem URL="Dial:1"/></CiscoIPPhoneExecute>'
    assert items_of(await push(phone, ascii_only)) == [ResponseItem("Dial:1", "Success", 0)]
    url = "http://127.0.0.1:1/café"
    no_prolog = f'<CiscoIPPhoneExecute><ExecuteItem URL="{url}"/></CiscoIPPhoneExecute>'
    with_prolog = raw_execute(url)
    # The same UTF-8 bytes, read as ISO-8859-1 without the prolog: the phone echoes what it read.
    assert items_of(await push(phone, no_prolog))[0].url == "http://127.0.0.1:1/cafÃ©"
    assert items_of(await push(phone, with_prolog))[0].url == url


@pytest.mark.parametrize(
    ("body", "content_type", "number"),
    [
        (b"<CiscoIPPhoneExecute/>", "text/xml", 1),  # not a form
        (b"xml=%3Cx%2F%3E", "application/x-www-form-urlencoded", 1),  # field name is case-sensitive
        (form_body("<CiscoIPPhoneExecute><ExecuteItem"), "application/x-www-form-urlencoded", 1),
        (form_body("<CiscoIPPhoneMenu/>"), "application/x-www-form-urlencoded", 2),
        (
            form_body(raw_execute("Dial:1", "Dial:2", "Dial:3", "Dial:4")),
            "application/x-www-form-urlencoded",
            2,
        ),
    ],
    ids=["not-form", "no-XML-field", "malformed", "unknown-object", "four-items"],
)
async def test_bad_objects_get_the_phone_error(
    fleet: Fleet, body: bytes, content_type: str, number: int
) -> None:
    phone = fleet.phones[0]
    async with httpx.AsyncClient() as client:
        response = await client.post(
            phone.url, content=body, headers={"Content-Type": content_type}
        )
    with pytest.raises(PhoneRejected) as caught:
        items_of(response)
    assert caught.value.number == number
    assert phone.state.errors == 1


async def test_expect_continue_gets_error_6(fleet: Fleet) -> None:
    body = form_body(raw_execute("Dial:1"))
    answer = await raw_request(
        fleet.phones[0],
        b"POST /CGI/Execute HTTP/1.1\r\nHost: phone\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode(),
    )
    head, _, xml = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b'<CiscoIPPhoneError Number="6">' in xml
    assert not fleet.phones[0].state.dialled


async def test_chunked_upload_gets_404(fleet: Fleet) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield form_body(raw_execute("Dial:1"))

    async with httpx.AsyncClient() as client:
        response = await client.post(fleet.phones[0].url, content=chunks(), headers=FORM)
    assert fleet.phones[0].state.requests[-1]["headers"]["transfer-encoding"] == "chunked"
    assert response.status_code == 404
    assert not fleet.phones[0].state.dialled


async def test_other_paths_and_methods(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    async with httpx.AsyncClient() as client:
        assert (await client.get(phone.url)).status_code == 405
        wrong_case = phone.url.replace("/CGI/Execute", "/CGI/execute")
        assert (await client.post(wrong_case, content=b"XML=x", headers=FORM)).status_code == 404


async def test_keep_alive_serves_many_pushes_on_one_connection(fleet: Fleet) -> None:
    phone = fleet.phones[2]
    body = form_body(raw_execute("Dial:7"))
    request = (
        b"POST /CGI/Execute HTTP/1.1\r\nHost: phone\r\n"
        b"Content-Type: application/x-www-form-urlencoded"
        + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    closing = request.replace(b"Host: phone\r\n", b"Host: phone\r\nConnection: close\r\n")
    # Pipelined: three requests in one write, answered in order on the same connection.
    answer = await raw_request(phone, request * 2 + closing)
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert list(phone.state.dialled) == ["7", "7", "7"]


# --- authentication -------------------------------------------------------------------------


async def test_basic_auth(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(username="admin", password="pw")
    phone = fleet.phones[0]
    xml = raw_execute("Dial:1")
    assert items_of(await push(phone, xml, auth=("admin", "pw")))[0].ok
    for auth in (("admin", "wrong"), ("other", "pw"), None):
        response = await push(phone, xml, auth=auth)
        assert response.status_code == 200
        with pytest.raises(PhoneAuthError):
            items_of(response)
    assert list(phone.state.dialled) == ["1"]
    assert phone.state.errors == 3


def basic_header(user: str, password: str, encoding: str) -> bytes:
    token = base64.b64encode(f"{user}:{password}".encode(encoding))
    return b"Authorization: Basic " + token + b"\r\n"


async def raw_push(phone: SimPhone, xml: str, extra_head: bytes = b"") -> bytes:
    body = form_body(xml)
    answer = await raw_request(
        phone,
        b"POST /CGI/Execute HTTP/1.1\r\nHost: phone\r\nConnection: close\r\n"
        + extra_head
        + b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    return answer.partition(b"\r\n\r\n")[2]


async def test_credentials_are_utf8(make_fleet: MakeFleet) -> None:
    password = "pässwörd-€"
    fleet = await make_fleet(username="admin", password=password)
    phone = fleet.phones[0]
    xml = raw_execute("Dial:1")
    # The header's bytes are written by hand: what any client sends for a non-ASCII password.
    ok = await raw_push(phone, xml, basic_header("admin", password, "utf-8"))
    assert b'Status="0"' in ok
    latin1 = await raw_push(phone, xml, basic_header("admin", "pässwörd", "latin-1"))
    assert b'<CiscoIPPhoneError Number="4"' in latin1
    assert list(phone.state.executed) == ["Dial:1"]
    async with page_server() as auth:
        auth.pages["/auth"] = (200, b"AUTHORIZED")
        asking = await make_fleet(auth_url=auth.url("/auth"))
        answer = await raw_push(asking.phones[0], xml, basic_header("jürgen", password, "utf-8"))
        assert b'Status="0"' in answer
        _, query, _ = auth.seen[0]
        assert (query["UserID"], query["Password"]) == (["jürgen"], [password])


async def test_auth_url_decides(make_fleet: MakeFleet) -> None:
    async with page_server() as auth:
        auth.pages["/auth"] = (200, b"AUTHORIZED")
        auth.pages["/deny"] = (200, b"UNAUTHORIZED")
        auth.pages["/newline"] = (200, b"AUTHORIZED\n")
        allow = await make_fleet(auth_url=auth.url("/auth"))
        deny = await make_fleet(auth_url=auth.url("/deny"))
        newline = await make_fleet(auth_url=auth.url("/newline"))
        xml = raw_execute("Dial:42")
        assert items_of(await push(allow.phones[0], xml, auth=("alice", "pa ss")))[0].ok
        for fleet in (deny, newline):
            with pytest.raises(PhoneAuthError):
                items_of(await push(fleet.phones[0], xml, auth=("alice", "pa ss")))
        path, query, _ = auth.seen[0]
        assert path == "/auth"
        assert query == {
            "UserID": ["alice"],
            "Password": ["pa ss"],
            "devicename": [allow.phones[0].name],
        }
        assert len(auth.seen) == 3
    # The auth server is gone now: an unreachable authentication URL denies.
    with pytest.raises(PhoneAuthError):
        items_of(await push(allow.phones[0], xml, auth=("alice", "pa ss")))


# --- execution ------------------------------------------------------------------------------


async def test_play_holds_the_answer_and_the_phone(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(tone_ms=300)
    phone = fleet.phones[0]
    first = asyncio.create_task(push(phone, raw_execute("Play:Chime.raw", "Dial:1")))
    await fleet.wait_for(lambda: phone.state.pushes == 1)
    # The phone is busy while the tone plays: a second push is refused at once, not queued.
    with pytest.raises(PhoneRejected) as caught:
        items_of(await push(phone, raw_execute("Dial:2")))
    assert caught.value.number == 6
    assert not first.done()
    # The Play's item comes last: completion order, after the Dial that ran meanwhile.
    assert items_of(await first) == [
        ResponseItem("Dial:1", "Success", 0),
        ResponseItem("Play:Chime.raw", "Success", 0),
    ]
    assert phone.state.last_tone == "Chime.raw"
    assert list(phone.state.dialled) == ["1"]
    assert list(phone.state.executed) == ["Play:Chime.raw", "Dial:1"]
    assert phone.state.overlaps == 1
    assert items_of(await push(phone, raw_execute("Dial:2")))[0].ok


async def test_play_stop_and_busy_phone_drops_priority_2(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(tone_ms=60_000)
    phone = fleet.phones[0]
    async with page_server() as pages:
        pages.pages["/p"] = (200, text_xml(TextPage(title="T", text="x")).encode())
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?><CiscoIPPhoneExecute>'
            '<ExecuteItem URL="Play:Alarm.raw" />'
            f'<ExecuteItem URL="{pages.url("/p")}" Priority="2" />'
            '<ExecuteItem URL="Play:Stop" /></CiscoIPPhoneExecute>'
        )
        items = items_of(await push(phone, xml))
    # Play:Stop cut the (one minute) tone; the page was not fetched while the tone played.
    assert items == [
        ResponseItem(pages.url("/p"), "Phone busy", 6),
        ResponseItem("Play:Alarm.raw", "Success", 0),
        ResponseItem("Play:Stop", "Success", 0),
    ]
    assert pages.seen == []
    assert phone.state.last_tone == "Alarm.raw"
    assert list(phone.state.tones) == ["Alarm.raw", "Stop"]


async def test_http_item_fetches_and_shows_the_page(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    page = TextPage(
        title="Door",
        prompt="Front",
        text="Someone rang & waits <here>",
        softkeys=(SoftKey("Ack", "http://127.0.0.1:1/ack", 1), SoftKey("Exit", "SoftKey:Exit", 3)),
    )
    async with page_server() as pages:
        pages.pages["/pages/1"] = (200, text_xml(page).encode())
        url = pages.url("/pages/1")
        items = items_of(await push(phone, execute_xml([ExecuteItem(url), ExecuteItem("Dial:9")])))
        missing = items_of(await push(phone, raw_execute(pages.url("/nothing"))))
        garbage_page = pages.url("/garbage")
        pages.pages["/garbage"] = (200, b"<CiscoIPPhoneText><Title>unclosed")
        broken = items_of(await push(phone, raw_execute(garbage_page)))
    assert items == [ResponseItem(url, "Success", 0), ResponseItem("Dial:9", "Success", 0)]
    screen = phone.state.to_dict()["screen"]
    assert screen["title"] == "Door" and screen["prompt"] == "Front"
    assert screen["text"] == "Someone rang & waits <here>"
    assert screen["softkeys"] == [
        {"name": "Ack", "url": "http://127.0.0.1:1/ack", "position": 1},
        {"name": "Exit", "url": "SoftKey:Exit", "position": 3},
    ]
    _, _, headers = pages.seen[0]
    assert headers["x-ciscoipphonemodelname"] == "CP-8841"
    assert headers["x-ciscoipphonedisplay"] == "800,480,24,C"
    assert headers["accept"] == "x-CiscoIPPhone/*"
    assert missing == [ResponseItem(pages.url("/nothing"), "URI not found", 6)]
    assert broken == [ResponseItem(garbage_page, "Parse error", 6)]
    assert phone.state.screen.title == "Door"  # a failed fetch leaves the screen as it was


async def test_unreachable_page_is_uri_not_found(fleet: Fleet) -> None:
    async with page_server() as pages:
        url = pages.url("/gone")
    items = items_of(await push(fleet.phones[0], raw_execute(url)))
    assert items == [ResponseItem(url, "URI not found", 6)]


async def test_background_ringtone_and_rtp(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    bg = background_xml("http://10.0.0.1/i.png", "http://10.0.0.1/b.png")
    assert items_of(await push(phone, bg)) == [ResponseItem("http://10.0.0.1/b.png", "Success", 0)]
    assert items_of(await push(phone, ringtone_xml("http://10.0.0.1/r.raw")))[0].ok
    assert items_of(await push(phone, raw_execute("RTPRx:10.0.0.5:20480:50")))[0].ok
    assert phone.state.background == {
        "icon": "http://10.0.0.1/i.png",
        "image": "http://10.0.0.1/b.png",
    }
    assert phone.state.ringtone == "http://10.0.0.1/r.raw"
    assert phone.state.rtp["receive"] == "RTPRx:10.0.0.5:20480:50"
    await push(phone, raw_execute("RTPRx:Stop"))
    assert phone.state.rtp["receive"] is None


async def test_push_while_busy_gets_error_6_and_is_counted(make_fleet: MakeFleet) -> None:
    # The first push holds the phone for 2 s: room for the two that overlap it even on a loaded
    # machine (with 300 ms, a busy CI run sometimes sent them after it had ended).
    fleet = await make_fleet(delay_ms=2000)
    phone = fleet.phones[0]
    first = asyncio.create_task(push(phone, raw_execute("Dial:1")))
    await fleet.wait_for(lambda: phone.state.pushes == 1)
    for number in ("2", "3"):
        with pytest.raises(PhoneRejected) as caught:
            items_of(await push(phone, raw_execute(f"Dial:{number}")))
        assert caught.value.number == 6 and caught.value.retryable
    assert items_of(await first)[0].ok
    assert list(phone.state.executed) == ["Dial:1"]
    async with httpx.AsyncClient(base_url=fleet.control_url) as control:
        state = (await control.get("/phones/0")).json()
    assert state["overlaps"] == 2 and state["executed"] == ["Dial:1"]
    assert state["pushes"] == 3 and state["errors"] == 2


async def test_executed_lists_what_ran_in_order(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    await push(phone, raw_execute("Dial:5551234", "Bogus:1", "Key:Headset"))
    await push(phone, raw_execute("Display:Off"))
    await push(phone, raw_execute("Dial:5551234"))
    assert list(phone.state.executed) == [
        "Dial:5551234",
        "Key:Headset",
        "Display:Off",
        "Dial:5551234",
    ]
    assert list(phone.state.executed).count("Dial:5551234") == 2


async def test_answer_after_executes_once_and_stays_busy(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(answer_after_ms=700)
    phone = fleet.phones[0]
    # A client that gives up before the answer: the phone has dialled all the same.
    with pytest.raises(httpx.ReadTimeout):
        await push(phone, raw_execute("Dial:5551234"), timeout=0.2)
    assert list(phone.state.executed) == ["Dial:5551234"]
    # Until its (lost) answer would have been written, the phone is busy.
    with pytest.raises(PhoneRejected) as caught:
        items_of(await push(phone, raw_execute("Dial:5551234")))
    assert caught.value.number == 6
    await fleet.wait_for(lambda: phone.state.requests[0].get("answer") is not None)
    answered = items_of(await push(phone, raw_execute("Dial:9"), timeout=5))
    assert answered == [ResponseItem("Dial:9", "Success", 0)]
    assert list(phone.state.executed) == ["Dial:5551234", "Dial:9"]
    assert phone.state.overlaps == 1


async def test_answer_after_as_a_fault_mode_per_phone(fleet: Fleet) -> None:
    slow, other = fleet.phones[0], fleet.phones[1]
    async with httpx.AsyncClient(base_url=fleet.control_url) as control:
        set_mode = await control.post(
            "/phones/0/fault", json={"mode": "answer-after", "delay_ms": 600}
        )
        assert set_mode.json()["fault"] == {"mode": "answer-after", "number": 6, "delay_ms": 600}
    with pytest.raises(httpx.ReadTimeout):
        await push(slow, raw_execute("Key:Services"), timeout=0.2)
    assert list(slow.state.executed) == ["Key:Services"]
    assert items_of(await push(other, raw_execute("Dial:1")))[0].ok
    await fleet.wait_for(lambda: slow.state.requests[0].get("answer") is not None)
    await slow.set_fault("none")
    assert items_of(await push(slow, raw_execute("Dial:1")))[0].ok


async def test_multiplatform_executes_and_answers_html(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(model="multiplatform", username="u", password="p")
    phone = fleet.phones[0]
    response = await push(phone, raw_execute("Play:Chime.raw", "Dial:1"), auth=("u", "p"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert b"CiscoIPPhone" not in response.content
    assert list(phone.state.executed) == ["Play:Chime.raw", "Dial:1"]
    denied = await push(phone, raw_execute("Dial:2"), auth=("u", "wrong"))
    assert denied.status_code == 401 and "CiscoIPPhone" not in denied.text
    broken = await push(phone, "<CiscoIPPhoneExecute><ExecuteItem", auth=("u", "p"))
    assert broken.status_code == 400
    assert list(phone.state.executed) == ["Play:Chime.raw", "Dial:1"]
    assert phone.to_dict()["model"] == "multiplatform"
    assert (phone.state.pushes, phone.state.errors) == (3, 2)


async def test_model_is_set_per_phone_through_the_control_endpoint(fleet: Fleet) -> None:
    phone = fleet.phones[1]
    async with httpx.AsyncClient(base_url=fleet.control_url) as control:
        changed = await control.post("/phones/1/model", json={"model": "multiplatform"})
        assert changed.json()["model"] == "multiplatform"
        response = await push(phone, raw_execute("Dial:1"))
        assert response.headers["content-type"].startswith("text/html")
        assert (await control.post("/phones/1/model", json={"model": "9900"})).status_code == 400
        reset = (await control.post("/phones/1/reset")).json()
        assert reset["model"] == "8800"
    assert items_of(await push(phone, raw_execute("Dial:1")))[0].ok


# --- faults ---------------------------------------------------------------------------------


async def test_fault_modes(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    xml = raw_execute("Dial:1")
    await phone.set_fault("refuse")
    with pytest.raises(httpx.ConnectError):
        await push(phone, xml)
    await phone.set_fault("hang")
    with pytest.raises(httpx.ReadTimeout):
        await push(phone, xml, timeout=0.3)
    await phone.set_fault("http500")
    assert (await push(phone, xml)).status_code == 500
    await phone.set_fault("http401")
    unauthorized = await push(phone, xml)
    assert unauthorized.status_code == 401
    with pytest.raises(PhoneAuthError):
        items_of(unauthorized)
    await phone.set_fault("garbage")
    with pytest.raises(PhoneBadResponse):
        items_of(await push(phone, xml))
    await phone.set_fault("error", number=3)
    with pytest.raises(PhoneRejected) as caught:
        items_of(await push(phone, xml))
    assert caught.value.number == 3
    await phone.set_fault("slow", delay_ms=50)
    assert items_of(await push(phone, xml))[0].ok
    await phone.set_fault("none")
    assert items_of(await push(phone, xml))[0].ok
    # Only the slow and healthy pushes were executed.
    assert list(phone.state.dialled) == ["1", "1"]
    with pytest.raises(ValueError, match="unknown fault mode"):
        await phone.set_fault("explode")


async def test_refuse_drops_open_keep_alive_connections(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    xml = raw_execute("Dial:1")
    async with httpx.AsyncClient() as client:
        ok = await client.post(phone.url, content=form_body(xml), headers=FORM)
        assert items_of(ok)[0].ok
        await phone.set_fault("refuse")
        with pytest.raises(httpx.TransportError):
            await client.post(phone.url, content=form_body(xml), headers=FORM)
        await phone.set_fault("none")
        again = await client.post(phone.url, content=form_body(xml), headers=FORM)
        assert items_of(again)[0].ok


@pytest.mark.slow
async def test_flap_alternates_refusing_and_serving(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet()
    phone = fleet.phones[0]
    await phone.set_fault("flap", delay_ms=200)
    outcomes: set[str] = set()
    async with asyncio.timeout(5):
        while outcomes != {"ok", "refused"}:
            try:
                items_of(await push(phone, raw_execute("Dial:1")))
                outcomes.add("ok")
            except httpx.ConnectError:
                outcomes.add("refused")
            except (httpx.RemoteProtocolError, httpx.ReadError):
                # Connected just before the phone went down: it drops the connection, as a
                # rebooting phone does. Neither outcome; try again.
                pass
            await asyncio.sleep(0.05)
    await phone.set_fault("none")
    assert items_of(await push(phone, raw_execute("Dial:1")))[0].ok


# --- control endpoint -----------------------------------------------------------------------


async def test_control_endpoint(fleet: Fleet) -> None:
    target = fleet.phones[2]
    await push(target, raw_execute("Dial:55"))
    async with httpx.AsyncClient(base_url=fleet.control_url) as control:
        listing = (await control.get("/phones")).json()
        assert [p["name"] for p in listing] == [p.name for p in fleet.phones]
        by_name = (await control.get(f"/phones/{target.name}")).json()
        assert by_name == (await control.get("/phones/2")).json()
        assert by_name["dialled"] == ["55"] and by_name["pushes"] == 1
        assert by_name["port"] == target.port
        assert by_name["requests"][0]["authorization"] is False
        assert (await control.get("/phones/99")).status_code == 404

        fault = await control.post("/phones/2/fault", json={"mode": "error", "number": 6})
        assert fault.json()["fault"]["mode"] == "error"
        with pytest.raises(PhoneRejected):
            items_of(await push(target, raw_execute("Dial:1")))
        bad = await control.post("/phones/2/fault", json={"mode": "nonsense"})
        assert bad.status_code == 400

        reset = (await control.post("/phones/2/reset")).json()
        assert reset["pushes"] == 0 and reset["dialled"] == [] and reset["fault"]["mode"] == "none"
        assert items_of(await push(target, raw_execute("Dial:2")))[0].ok

        summary = (await control.get("/")).text
        assert target.name in summary and "pushes=1" in summary


async def test_press_softkey_fetches_its_page(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    async with page_server() as pages:
        ack_url = pages.url("/ack?event=7")
        alert = TextPage(
            title="Alarm",
            text="Freezer warm",
            softkeys=(SoftKey("Ack", ack_url, 1), SoftKey("Exit", "SoftKey:Exit", 2)),
        )
        pages.pages["/alert"] = (200, text_xml(alert).encode())
        pages.pages["/ack"] = (
            200,
            text_xml(TextPage(title="Thanks", text="Acknowledged")).encode(),
        )
        await push(phone, raw_execute(pages.url("/alert")))
        async with httpx.AsyncClient(base_url=fleet.control_url) as control:
            pressed = await control.post("/phones/0/press", json={"position": 1})
            assert pressed.status_code == 200
            assert pressed.json()["screen"]["text"] == "Acknowledged"
            missing = await control.post("/phones/0/press", json={"name": "Ack"})
            assert missing.status_code == 404  # the new page has no Ack softkey
        ack_path, ack_query, ack_headers = pages.seen[-1]
        assert (ack_path, ack_query) == ("/ack", {"event": ["7"]})
        assert ack_headers["x-ciscoipphonemodelname"] == "CP-8841"
    await push(phone, raw_execute("Dial:1"))
    phone.state.screen.softkeys.append(SimSoftKey("Exit", "SoftKey:Exit", 2))
    screen = await phone.press(name="Exit")
    assert screen.title == "" and screen.softkeys == []


# --- TLS ------------------------------------------------------------------------------------


async def test_tls_with_pinned_certificate(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = await make_fleet(tls=True, cert_dir=tmp_path)
    phone = fleet.phones[0]
    assert fleet.certificate is not None and fleet.certificate.parent == tmp_path
    assert phone.url.startswith("https://")
    pinned = ssl.create_default_context(cafile=str(fleet.certificate))
    pinned.check_hostname = False  # the phone's certificate names SEP<MAC>, not 127.0.0.1
    response = await push(phone, raw_execute("Dial:1"), verify=pinned)
    assert items_of(response)[0].ok
    with pytest.raises(httpx.ConnectError):
        await push(
            phone,
            raw_execute("Dial:1"),
            verify=ssl.create_default_context(cafile=str(fleet.certificate)),
        )

    class HTTPSAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["assert_hostname"] = False
            super().init_poolmanager(*args, **kwargs)

    def reference_client() -> int:
        session = requests.Session()
        session.mount("https://", HTTPSAdapter())
        answer = session.post(
            phone.url,
            timeout=10,
            verify=str(fleet.certificate),
            data={"XML": raw_execute("Dial:2")},
        )
        return answer.status_code

    assert await asyncio.to_thread(reference_client) == 200
    assert list(phone.state.dialled) == ["1", "2"]


# --- command line ---------------------------------------------------------------------------


async def test_cli_runs_phones_until_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phonepush",
        "simulate",
        "--port",
        "18741",
        "--phones",
        "2",
        "--username",
        "u",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PHONEPUSH_SIM_PASSWORD": "hunter2"},
    )
    assert process.stdout is not None
    try:
        lines = [(await asyncio.wait_for(process.stdout.readline(), 10)).decode() for _ in range(3)]
        assert lines[0].split() == ["SEP0000AA000001", "http://127.0.0.1:18741/CGI/Execute"]
        assert lines[2].split() == ["control", "http://127.0.0.1:18743/phones"]
        async with httpx.AsyncClient(auth=("u", "hunter2")) as client:
            response = await client.post(
                "http://127.0.0.1:18742/CGI/Execute",
                content=form_body(raw_execute("Dial:3")),
                headers=FORM,
            )
        assert items_of(response)[0].ok
        log = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert "SEP0000AA000002" in log and "Dial:3" in log and "hunter2" not in log
    finally:
        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0
    assert b"stopped" in rest[0]


async def test_cli_model_and_answer_after() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phonepush",
        "simulate",
        "--port",
        "18751",
        "--model",
        "multiplatform",
        "--answer-after",
        "400",
        "--tone-ms",
        "10",
        "--play-file",
        "Doorbell.raw",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        for _ in range(2):
            await asyncio.wait_for(process.stdout.readline(), 10)
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    "http://127.0.0.1:18751/CGI/Execute",
                    content=form_body(raw_execute("Dial:3", "Play:Doorbell.raw")),
                    headers=FORM,
                    timeout=0.1,
                )
            log = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
            state = (await client.get("http://127.0.0.1:18752/phones/0")).json()
        assert "Dial:3 Play:Doorbell.raw -> ok" in log
        assert state["model"] == "multiplatform"
        assert state["executed"] == ["Dial:3", "Play:Doorbell.raw"]
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0


async def test_certificate_is_named_like_a_phone_and_kept(
    make_fleet: MakeFleet, tmp_path: Path
) -> None:
    first = await make_fleet(tls=True, cert_dir=tmp_path)
    assert first.certificate is not None
    pem = first.certificate.read_bytes()
    # A second run with the same directory presents the same certificate, so a pin stays valid.
    second = await make_fleet(tls=True, cert_dir=tmp_path)
    assert second.certificate is not None and second.certificate.read_bytes() == pem
    pinned = ssl.create_default_context(cafile=str(first.certificate))
    pinned.check_hostname = False
    phone = second.phones[0]
    _, writer = await asyncio.open_connection(phone.host, phone.port, ssl=pinned)
    presented = writer.get_extra_info("peercert")
    writer.close()
    assert presented["subject"] == ((("commonName", first.phones[0].name),),)
    assert presented["subjectAltName"] == (("DNS", first.phones[0].name),)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
async def test_7900_speaks_only_tls_1_0(make_fleet: MakeFleet, tmp_path: Path) -> None:
    fleet = await make_fleet(tls=True, cert_dir=tmp_path, model="7900")
    phone = fleet.phones[0]
    assert fleet.certificate is not None
    modern = ssl.create_default_context(cafile=str(fleet.certificate))
    modern.check_hostname = False
    with pytest.raises(httpx.ConnectError):
        await push(phone, raw_execute("Dial:1"), verify=modern)
    # What a client must do to reach a real 7900: allow TLS 1.0 and OpenSSL's weakest level.
    old = ssl.create_default_context(cafile=str(fleet.certificate))
    old.check_hostname = False
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    _, writer = await asyncio.open_connection(phone.host, phone.port, ssl=old)
    version = writer.get_extra_info("ssl_object").version()
    writer.close()
    assert version == "TLSv1"
    assert items_of(await push(phone, raw_execute("Dial:1"), verify=old))[0].ok
    assert list(phone.state.executed) == ["Dial:1"]


async def test_softkey_exit_clears_the_screen(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    async with page_server() as pages:
        pages.pages["/p"] = (200, text_xml(TextPage(title="Shown", text="x")).encode())
        await push(phone, raw_execute(pages.url("/p")))
    assert phone.state.screen.title == "Shown"
    assert items_of(await push(phone, raw_execute("SoftKey:Exit")))[0].ok
    assert phone.state.screen.title == ""
    assert list(phone.state.keys) == ["SoftKey:Exit"]


async def test_fetched_page_with_a_dtd_is_not_shown(fleet: Fleet) -> None:
    phone = fleet.phones[0]
    hostile = (
        b'<?xml version="1.0" encoding="UTF-8"?><!DOCTYPE t [<!ENTITY x SYSTEM '
        b'"file:///etc/hostname">]><CiscoIPPhoneText><Text>&x;</Text></CiscoIPPhoneText>'
    )
    async with page_server() as pages:
        pages.pages["/dtd"] = (200, hostile)
        url = pages.url("/dtd")
        assert items_of(await push(phone, raw_execute(url))) == [
            ResponseItem(url, "Parse error", 6)
        ]
    assert phone.state.screen.text == "" and not phone.state.executed
