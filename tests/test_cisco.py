"""CiscoIPPhone XML: what we build is what a phone parses back, and what a phone (or anyone on
its port) answers never gets past the parser as anything but a PhoneError."""

from __future__ import annotations

import contextlib
from urllib.parse import parse_qs

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from phonepush.errors import (
    InvalidURI,
    MalformedPush,
    PhoneAuthError,
    PhoneBadResponse,
    PhoneError,
    PhoneHTTPBusy,
    PhoneHTTPError,
    PhoneRejected,
    TooLarge,
    WireError,
)
from phonepush.wire.cisco import (
    MAX_PUSH_BYTES,
    MAX_RESPONSE_BYTES,
    BackgroundPush,
    ExecutePush,
    ResponseItem,
    RingTonePush,
    SoftKey,
    TextPage,
    background_xml,
    error_xml,
    execute_xml,
    form_body,
    pack,
    parse_push,
    parse_response,
    parse_text,
    response_xml,
    ringtone_xml,
    sanitize_text,
    text_xml,
)
from phonepush.wire.uri import ExecuteItem

P = '<?xml version="1.0" encoding="UTF-8"?>'

# --- builders -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "xml"),
    [
        (
            [ExecuteItem("Key:Headset")],
            f'{P}<CiscoIPPhoneExecute><ExecuteItem URL="Key:Headset" Priority="0" />'
            "</CiscoIPPhoneExecute>",
        ),
        (
            [ExecuteItem("Dial:1234", 1), ExecuteItem('http://h/p?a=1&b="<\'>"', 2)],
            f'{P}<CiscoIPPhoneExecute><ExecuteItem URL="Dial:1234" Priority="1" />'
            '<ExecuteItem URL="http://h/p?a=1&amp;b=&quot;&lt;&apos;&gt;&quot;" Priority="2" />'
            "</CiscoIPPhoneExecute>",
        ),
    ],
)
def test_execute_xml(items: list[ExecuteItem], xml: str) -> None:
    assert execute_xml(items) == xml


@pytest.mark.parametrize(
    ("items", "error"),
    [
        ([], WireError),
        ([ExecuteItem("Key:A")] * 4, WireError),
        ([ExecuteItem("Bogus:1")], InvalidURI),
        ([ExecuteItem("Key:A", 3)], WireError),
        ([ExecuteItem("http://h/" + "a" * 240)] * 2, TooLarge),
        ([ExecuteItem("http://h/" + "&" * 240)], TooLarge),  # escaping counts
    ],
)
def test_execute_xml_refuses(items: list[ExecuteItem], error: type[Exception]) -> None:
    with pytest.raises(error):
        execute_xml(items)


def test_form_body_is_one_field_named_xml() -> None:
    xml = execute_xml([ExecuteItem("http://h/?a=1&b=é")])
    body = form_body(xml)
    assert body.startswith(b"XML=")
    assert parse_qs(body.decode("ascii"), strict_parsing=True) == {"XML": [xml]}


K = [ExecuteItem(f"Key:K{i}") for i in range(7)]
H = [ExecuteItem(f"http://192.0.2.1/{i}") for i in range(3)]
LONG = [ExecuteItem("http://192.0.2.1/" + c * 200) for c in "ab"]


@pytest.mark.parametrize(
    ("items", "batches"),
    [
        ([], []),
        (K[:3], [K[:3]]),
        (K[:4], [K[:3], K[3:4]]),
        (K[:7], [K[:3], K[3:6], K[6:7]]),
        ([H[0], K[0], K[1]], [[H[0], K[0], K[1]]]),
        ([H[0], H[1], K[0]], [[H[0]], [H[1], K[0]]]),  # one http item per request
        ([K[0], H[0], H[1], H[2]], [[K[0], H[0]], [H[1]], [H[2]]]),
        ([LONG[0], K[0], LONG[1]], [[LONG[0], K[0]], [LONG[1]]]),
    ],
)
def test_pack(items: list[ExecuteItem], batches: list[list[ExecuteItem]]) -> None:
    assert pack(items) == batches
    for batch in batches:
        assert len(execute_xml(batch).encode()) <= MAX_PUSH_BYTES


def test_pack_keeps_order_and_fills_to_512_bytes() -> None:
    items = [ExecuteItem("Dial:" + "1" * 120) for _ in range(6)]
    batches = pack(items)
    assert [item for batch in batches for item in batch] == items
    assert all(len(execute_xml(b).encode()) <= MAX_PUSH_BYTES for b in batches)
    assert len(batches) == 3  # two ~120-character items fit in 512 bytes, three do not


def test_pack_refuses_an_item_too_large_alone() -> None:
    with pytest.raises(TooLarge):
        pack([K[0], ExecuteItem("http://h/" + "<" * 200)])


def test_background_and_ringtone_xml() -> None:
    assert background_xml("http://h/i.png", "https://h/b.png?a=1&b=2") == (
        f"{P}<setBackground><background><icon>http://h/i.png</icon>"
        "<image>https://h/b.png?a=1&amp;b=2</image></background></setBackground>"
    )
    assert ringtone_xml("http://h/r.raw") == (
        f"{P}<setRingTone><ringTone>http://h/r.raw</ringTone></setRingTone>"
    )
    assert parse_push(background_xml("http://h/i", "http://h/b").encode()) == BackgroundPush(
        "http://h/i", "http://h/b"
    )
    assert parse_push(ringtone_xml("http://h/r").encode()) == RingTonePush("http://h/r")


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: background_xml("Key:A", "http://h/b"), WireError),
        (lambda: background_xml("http://h/i", "ftp://h/b"), WireError),
        (lambda: background_xml("http://h/i", "http://h/b c"), WireError),
        (lambda: background_xml("http://h/" + "a" * 250, "http://h/b"), TooLarge),
        (lambda: ringtone_xml("file:///etc/passwd"), WireError),
        (lambda: ringtone_xml("http://h/\x00"), WireError),
        (lambda: ringtone_xml("http://h/" + "a" * 250), TooLarge),
    ],
)
def test_background_and_ringtone_refuse(build: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        build()  # type: ignore[operator]


def test_text_xml_escapes_and_cuts() -> None:
    page = TextPage(
        title="T" * 40,
        prompt="<b>&",
        text="line1\r\nline2\x00\x1b\x07\ttab",
        softkeys=(SoftKey("Exit", "SoftKey:Exit", 1), SoftKey("Open", "http://h/?a=1&b=2", 2)),
    )
    xml = text_xml(page)
    assert xml.startswith(f"{P}<CiscoIPPhoneText><Title>{'T' * 29}...</Title>")
    assert "<Prompt>&lt;b&gt;&amp;</Prompt>" in xml
    assert "<Text>line1\nline2\ttab</Text>" in xml
    assert "<URL>http://h/?a=1&amp;b=2</URL><Position>2</Position>" in xml
    parsed = parse_text(xml.encode())
    assert parsed.title == "T" * 29 + "..."
    assert parsed.text == "line1\nline2\ttab"
    assert parsed.softkeys == page.softkeys
    long = text_xml(TextPage(text="x" * 5000))
    assert parse_text(long.encode()).text == "x" * 3997 + "..."


def test_text_pages_escape_apostrophes_as_the_xml_entity() -> None:
    xml = text_xml(TextPage(title="Bob's", text="it's <here>", prompt="'"))
    assert "<Title>Bob&apos;s</Title><Prompt>&apos;</Prompt>" in xml
    assert "<Text>it&apos;s &lt;here&gt;</Text>" in xml
    assert "&#x27;" not in xml
    assert parse_text(xml.encode()).text == "it's <here>"


@pytest.mark.parametrize(
    ("page", "error"),
    [
        (TextPage(softkeys=tuple(SoftKey(str(i), "SoftKey:Exit", 1) for i in range(9))), WireError),
        (TextPage(softkeys=(SoftKey("x", "SoftKey:Exit", 0),)), WireError),
        (TextPage(softkeys=(SoftKey("x", "SoftKey:Exit", 9),)), WireError),
        (TextPage(softkeys=(SoftKey("x", "http://h/" + "a" * 250, 1),)), TooLarge),
    ],
)
def test_text_xml_refuses(page: TextPage, error: type[Exception]) -> None:
    with pytest.raises(error):
        text_xml(page)


# --- parse_response -----------------------------------------------------------------------------

OK = response_xml([ResponseItem("Key:Headset", "Success", 0), ResponseItem("Dial:1", "No", 6)])


@pytest.mark.parametrize(
    ("body", "content_type", "status", "expected"),
    [
        (OK, "text/xml", 200, [ResponseItem("Key:Headset", "Success", 0),
                               ResponseItem("Dial:1", "No", 6)]),
        (OK, "text/xml; charset=UTF-8", 200, [ResponseItem("Key:Headset", "Success", 0),
                                              ResponseItem("Dial:1", "No", 6)]),
        (f'{P}<CiscoIPPhoneResponse><ResponseItem URL="x" Status="z"/></CiscoIPPhoneResponse>',
         "text/xml", 200, [ResponseItem("x", "", -1)]),
        ("", None, 200, []),
        ("  \n", "text/xml", 204, []),
        (f"{P}<CiscoIPPhoneResponse/>", "text/xml", 200, []),
    ],
)  # fmt: skip
def test_parse_response_success(
    body: str, content_type: str | None, status: int, expected: list[ResponseItem]
) -> None:
    assert parse_response(body.encode(), content_type, status) == expected


BOMB = (
    '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
    + "".join(
        f'<!ENTITY {n} "{("&" + p + ";") * 10}">'
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + ']><CiscoIPPhoneResponse><ResponseItem URL="&i;"/></CiscoIPPhoneResponse>'
)
XXE = (
    '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
    '<CiscoIPPhoneResponse><ResponseItem URL="&e;"/></CiscoIPPhoneResponse>'
)
XXE_ERROR = (
    '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
    '<CiscoIPPhoneError Number="1">&e;</CiscoIPPhoneError>'
)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (OK, "text/html"),  # multiplatform (3PCC) firmware: 200 text/html
        (OK, None),
        ("<html><body>OK</body></html>", "text/html"),
        (XXE, "text/html"),  # not said to be XML: not parsed
        ("<CiscoIPPhoneText/>", "text/xml"),
        ("", "text/xml"),
    ],
)
def test_any_2xx_without_an_error_object_is_success(body: str, content_type: str | None) -> None:
    # The phone took the push; what it says beyond "no error" is not read.
    assert parse_response(body.encode(), content_type, 200) == []
    assert parse_response(body.encode(), content_type, 204) == []


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error", "detail"),
    [
        (error_xml(1), "text/xml", 200, PhoneRejected, "Error: Error parsing CiscoIPPhone object"),
        (error_xml(2), "text/xml", 200, PhoneRejected, "Error: Error framing CiscoIPPhone object"),
        (error_xml(3), "text/xml", 200, PhoneRejected, "Error: Internal file error"),
        (error_xml(4), "text/xml", 200, PhoneAuthError, "Error: Authentication error"),
        (error_xml(4), "text/xml", 401, PhoneAuthError, "Error: Authentication error"),
        (error_xml(6), "text/xml", 500, PhoneRejected, "Error: 6"),
        (error_xml(42, "odd"), "text/xml", 200, PhoneRejected, "Error: 42"),
        ("<html/>", "text/html", 401, PhoneAuthError, "Error: Authentication error"),
        ("", None, 401, PhoneAuthError, "Error: Authentication error"),
        ("nope", "text/plain", 404, PhoneHTTPError, "HTTP status 404"),
        ("", None, 503, PhoneHTTPBusy, "HTTP status 503 (busy)"),
        ("<<<", "text/xml", 500, PhoneHTTPError, "HTTP status 500"),
        (OK, "text/xml", 500, PhoneHTTPError, "HTTP status 500"),
        ("<CiscoIPPhoneError/>", "text/xml", 200, PhoneBadResponse, "without a Number"),
        ("<CiscoIPPhoneError Number='6'", "text/xml", 200, PhoneBadResponse, "malformed XML"),
        (XXE_ERROR, "text/xml", 200, PhoneBadResponse, "DTD"),
        # Said to be XML and not readable: a sick phone, not a success.
        ("\x00garbage", "text/xml", 200, PhoneBadResponse, "malformed XML"),
        (XXE, "text/xml", 200, PhoneBadResponse, "DTD"),
        (BOMB, "text/xml", 200, PhoneBadResponse, "DTD"),
        ("<a>" + " " * MAX_RESPONSE_BYTES + "</a>", "text/xml", 200, PhoneBadResponse, "limit"),
        ("<CiscoIPPhoneError>" + " " * MAX_RESPONSE_BYTES, "text/xml", 200, PhoneBadResponse,
         "limit"),
    ],
)  # fmt: skip
def test_parse_response_errors(
    body: str, content_type: str | None, status: int, error: type[PhoneError], detail: str
) -> None:
    with pytest.raises(PhoneError) as caught:
        parse_response(body.encode(), content_type, status)
    assert type(caught.value) is error
    assert detail in str(caught.value)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-7", "cp500"])
@pytest.mark.parametrize("document", [BOMB, XXE], ids=["bomb", "xxe"])
def test_dtd_hidden_by_another_encoding_is_refused(document: str, encoding: str) -> None:
    declared = document.replace('version="1.0"?>', f'version="1.0" encoding="{encoding}"?>')
    with pytest.raises(PhoneBadResponse):
        parse_response(declared.encode(encoding), "text/xml", 200)
    with pytest.raises(WireError, match=r"DTD|malformed"):
        parse_push(declared.encode(encoding))


def test_latin1_answers_are_read() -> None:
    body = (
        '<?xml version="1.0" encoding="ISO-8859-1"?><CiscoIPPhoneResponse>'
        '<ResponseItem URL="Key:A" Data="Succès" Status="0"/></CiscoIPPhoneResponse>'
    ).encode("latin-1")
    assert parse_response(body, "text/xml") == [ResponseItem("Key:A", "Succès", 0)]


def test_settings_without_receipts() -> None:
    assert parse_response(b"OK", "text/plain", 200, receipts=False) == []
    assert parse_response(b"<Whatever/>", "text/xml", 200, receipts=False) == []
    with pytest.raises(PhoneAuthError):
        parse_response(error_xml(4).encode(), "text/xml", 200, receipts=False)
    with pytest.raises(PhoneHTTPError):
        parse_response(b"", None, 500, receipts=False)


@pytest.mark.parametrize(
    ("xml", "number"),
    [
        (b"not xml", 1),
        (b"<CiscoIPPhoneExecute>", 1),
        (b"<CiscoIPPhoneExecute/>", 2),
        (b'<CiscoIPPhoneExecute><ExecuteItem URL="Key:A" Priority="3"/></CiscoIPPhoneExecute>', 2),
        (b'<CiscoIPPhoneExecute><Item URL="Key:A"/></CiscoIPPhoneExecute>', 2),
        (b"<setBackground><background><icon>x</icon></background></setBackground>", 2),
        (b"<setRingTone/>", 2),
        (b"<Unknown/>", 2),
    ],
)
def test_parse_push_answers_like_a_phone(xml: bytes, number: int) -> None:
    with pytest.raises(MalformedPush) as caught:
        parse_push(xml)
    assert caught.value.number == number


# --- properties ---------------------------------------------------------------------------------

# Text without white space (which no URL may hold), but with lone surrogates, C1 controls and
# non-characters: anything else must either round-trip or be refused as a WireError.
URL_TEXT = st.lists(  # st.text() never yields lone surrogates; joining lists does
    st.one_of(
        st.characters(blacklist_categories=("Zs", "Zl", "Zp")),
        st.sampled_from("\x00\x1f\x7f\x80\x9f\ud800\udfff\ufffe\uffff&<>\"'"),
    ),
    min_size=1,
    max_size=80,
).map("".join)


@given(path=URL_TEXT, priority=st.integers(0, 2), before=st.sampled_from(["", "Key:Headset"]))
def test_url_attribute_round_trips_and_cannot_add_items(
    path: str, priority: int, before: str
) -> None:
    url = "http://192.0.2.1/" + path
    items = [ExecuteItem(before)] if before else []
    items.append(ExecuteItem(url, priority))
    try:
        xml = execute_xml(items)
    except WireError:
        assume(False)  # refused before sending: nothing reaches a phone
        return
    # What a phone reads back is exactly what we meant: same items, same count, same text.
    assert parse_push(xml.encode("utf-8")) == ExecutePush(tuple(items))
    body = form_body(xml)
    assert parse_qs(body.decode("ascii"), strict_parsing=True) == {"XML": [xml]}


@given(
    title=st.text(max_size=40),
    prompt=st.text(max_size=40),
    text=st.text(max_size=300),
    names=st.lists(st.text(max_size=40), max_size=8),
)
def test_page_text_round_trips_after_sanitizing(
    title: str, prompt: str, text: str, names: list[str]
) -> None:
    keys = tuple(SoftKey(name, "SoftKey:Exit", i + 1) for i, name in enumerate(names))
    page = TextPage(title=title, prompt=prompt, text=text, softkeys=keys)
    parsed = parse_text(text_xml(page).encode("utf-8"))
    assert parsed == TextPage(
        title=sanitize_text(title, 32),
        prompt=sanitize_text(prompt, 32),
        text=sanitize_text(text, 4000),
        softkeys=tuple(SoftKey(sanitize_text(k.name, 32), k.url, k.position) for k in keys),
    )


@given(
    value=st.lists(st.one_of(st.characters(), st.sampled_from("\r\ud800\ufffe\x85"))).map("".join),
    limit=st.integers(1, 50),
)
def test_sanitize_text_bounds(value: str, limit: int) -> None:
    clean = sanitize_text(value, limit)
    assert len(clean) <= limit
    assert "\r" not in clean
    assert all(c in "\n\t" or ord(c) >= 0x20 for c in clean)
    clean.encode("utf-8")  # no lone surrogates left


XMLISH = st.lists(
    st.sampled_from(
        [
            "<", ">", "/", "=", '"', "'", "&", ";", "&amp;", "&#0;", "&#x1F600;", "&e;",
            "<?xml version=\"1.0\"?>", '<?xml version="1.0" encoding="UTF-16"?>',
            "<!DOCTYPE x>", "<!ENTITY e 'x'>", "<![CDATA[", "]]>", "<!--", "-->",
            "CiscoIPPhoneResponse", "CiscoIPPhoneError", "ResponseItem", "ExecuteItem",
            "CiscoIPPhoneExecute", "setBackground", "background", "icon", "image",
            "setRingTone", "ringTone", "CiscoIPPhoneText", "Title", "Text", "SoftKeyItem",
            "Position", " URL=", " Data=", " Status=", " Number=", " Priority=", "4", "9",
            "\x00", "\x1b", "é", "\ud800", "\ufffe", " ", "\n",
        ]
    ),
    max_size=40,
).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))  # fmt: skip


@given(
    body=st.one_of(st.binary(max_size=300), XMLISH),
    content_type=st.sampled_from([None, "", "text/xml", "text/xml; charset=utf-8", "text/html"]),
    status=st.sampled_from([200, 204, 302, 400, 401, 404, 500, 503, 599]),
    receipts=st.booleans(),
)
def test_parse_response_raises_only_phone_errors(
    body: bytes, content_type: str | None, status: int, receipts: bool
) -> None:
    try:
        items = parse_response(body, content_type, status, receipts=receipts)
    except PhoneError:
        return
    assert all(isinstance(item, ResponseItem) for item in items)


@given(body=st.one_of(st.binary(max_size=300), XMLISH))
def test_phone_side_parsers_raise_only_wire_errors(body: bytes) -> None:
    try:
        parse_push(body)
    except MalformedPush as exc:
        assert exc.number in (1, 2)
    with contextlib.suppress(WireError):
        parse_text(body)
