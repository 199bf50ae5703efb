"""``phonepush send``, ``phonepush background`` and ``phonepush ringtone``: one push, from a shell.

``send`` behaves as the reference ``cgiexecute`` client: the same options (parsed by
``getopt.gnu_getopt``, so abbreviations, permutation and error messages match), the same checks in
the same order with the same messages on stderr, ``URL: Data`` lines on stdout, exit status 0 or 1.
Where it differs, on purpose:

* connection failures and timeouts print one line ("Cannot connect to HOST:PORT: Connection
  refused", "Timed out after 10 s waiting for HOST:PORT") instead of a ``requests`` exception, and
  a missing or unreadable certificate file is an error line, not a traceback;
* an HTTP error status without a CiscoIPPhoneError prints "HTTP status N" (401: "Error:
  Authentication error"), not "Unexpected Content-Type: ..."; unreadable XML prints
  "malformed XML: ..."; any 2xx answer that is not a CiscoIPPhoneError (an empty one, the
  ``200 text/html`` of multiplatform firmware) is success with no lines;
* the URI grammar is :mod:`phonepush.wire.uri`'s (a superset: ``RTPRx:``, ``SendDigits:``...; but
  ``Play:`` names over 25 characters, ``Display:`` minutes over 1440, URIs over 256 characters,
  a trailing newline, and XML bodies over 512 bytes are refused before sending);
* a timeout must be a positive whole number of seconds;
* the password may come from ``PHONEPUSH_PASSWORD`` (``-p`` wins), so it stays out of ``ps``;
* Basic credentials are UTF-8 (``requests`` sends ISO-8859-1 when they fit): what phones and
  ``/authenticate`` decode, so ``pässword`` is the password configured there.
"""

from __future__ import annotations

import asyncio
import getopt
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from phonepush.errors import PhonepushError
from phonepush.phone.client import DEFAULT_TIMEOUT, PhoneClient, PhoneTarget, parse_host
from phonepush.wire.cisco import background_xml, execute_xml, ringtone_xml
from phonepush.wire.uri import ExecuteItem, parse_target

__all__ = ["PASSWORD_ENV", "getopt_message", "main"]

PASSWORD_ENV: Final = "PHONEPUSH_PASSWORD"  # noqa: S105 - the name of a variable
_MAX_URLS: Final = 3
_SHORT: Final = "h:t:u:p:c:H"
_LONG: Final = ["host=", "timeout=", "username=", "password=", "certificate=", "help"]

_OPTIONS_HELP: Final = f"""\
  -h, --host HOST[:PORT]       host name or IP address and port of the phone
  -t, --timeout TIMEOUT        connection timeout in seconds (default {DEFAULT_TIMEOUT:g})
  -u, --username USERNAME      authentication username
  -p, --password PASSWORD      authentication password (default: ${PASSWORD_ENV})
  -c, --certificate CERT-FILE  connect using SSL and verify using certificate
  -H, --help                   print this help and exit"""

_HELP: Final = {
    "send": f"""\
Usage: {{prog}} [OPTIONS] URL[@PRIORITY]...
Send CGI Execute URLs to a Cisco IP Phone.

{_OPTIONS_HELP}

Up to 3 URLs may be specified.
URL is one of Dial:, EditDial:, Key:, SoftKey:, Init:, Play:, Display:, http: or https:
(also SendDigits:, App:, RTPRx:, RTPMRx:, RTPTx:, RTPMTx:).
Optional PRIORITY is either 0 (immediately), 1 (when idle) or 2 (only if idle).
Prints the phone's answer as URL: Data lines; exits 1 on any error.
""",
    "background": f"""\
Usage: {{prog}} [OPTIONS] ICON-URL IMAGE-URL
Set the background image of a Cisco IP Phone (setBackground).

{_OPTIONS_HELP}

ICON-URL (the thumbnail) and IMAGE-URL (a PNG sized for the phone's screen) are http: or
https: URLs the phone fetches. Prints "Background set to IMAGE-URL" when the phone accepts
the push; exits 1 on any error.
""",
    "ringtone": f"""\
Usage: {{prog}} [OPTIONS] URL
Set the ring tone of a Cisco IP Phone (setRingTone).

{_OPTIONS_HELP}

URL is an http: or https: URL of a raw µ-law 8 kHz file the phone fetches. Prints
"Ring tone set to URL" when the phone accepts the push; exits 1 on any error.
""",
}


class _Abort(Exception):
    """A message for stderr, and exit status 1."""


@dataclass
class _Options:
    host: str | None = None
    port: int | None = None
    timeout: int = int(DEFAULT_TIMEOUT)
    username: str = ""
    password: str | None = None
    certificate: str | None = None
    help: bool = False


def getopt_message(exc: getopt.GetoptError, prog: str) -> str:
    """A getopt error as the reference client words it (capitalised, pointing at --help)."""
    return f"{exc.msg[:1].upper()}{exc.msg[1:]}. Try '{prog} --help' for more information"


def _parse_options(argv: Sequence[str], prog: str) -> tuple[_Options, list[str]]:
    try:
        pairs, arguments = getopt.gnu_getopt(list(argv), _SHORT, _LONG)
    except getopt.GetoptError as exc:
        raise _Abort(getopt_message(exc, prog)) from None
    options = _Options()
    for option, value in pairs:
        if option in ("-h", "--host"):
            options.host, port = parse_host(value)
            # A later -h without a port keeps an earlier one's port, as in the reference client.
            if port is not None:
                options.port = port
        elif option in ("-t", "--timeout"):
            try:
                options.timeout = int(value)
            except ValueError:
                raise _Abort(f"Invalid timeout: {value}") from None
            if options.timeout <= 0:
                raise _Abort(f"Invalid timeout: {value}")
        elif option in ("-u", "--username"):
            options.username = value
        elif option in ("-p", "--password"):
            options.password = value
        elif option in ("-c", "--certificate"):
            options.certificate = value
        elif option in ("-H", "--help"):
            options.help = True
    return options, arguments


def _target(options: _Options) -> PhoneTarget:
    if options.host is None:
        raise _Abort("No host specified")
    password = options.password
    if password is None:
        password = os.environ.get(PASSWORD_ENV, "")
    return PhoneTarget(
        name=options.host,
        host=options.host,
        port=options.port,
        username=options.username,
        password=password,
        certificate=options.certificate or None,
        timeout=float(options.timeout),
    )


def _execute_items(arguments: Sequence[str]) -> list[ExecuteItem]:
    if not arguments:
        raise _Abort("No URLs specified")
    items: list[ExecuteItem] = []
    for argument in arguments:
        item = parse_target(argument)
        # Counted after the URL is checked: a bad fourth URL is reported as a bad URL.
        if len(items) == _MAX_URLS:
            raise _Abort(f"A maximum of {_MAX_URLS} URLs can be specified")
        items.append(item)
    return items


def _expect(arguments: Sequence[str], names: str, count: int) -> None:
    if not arguments:
        raise _Abort("No URLs specified")
    if len(arguments) != count:
        plural = "" if len(arguments) == 1 else "s"
        raise _Abort(f"Expected {names}, got {len(arguments)} argument{plural}")


async def _send(target: PhoneTarget, xml: str) -> list[str]:
    async with PhoneClient(target) as phone:
        items = await phone.push(xml)
    return [f"{item.url}: {item.data}" for item in items]


async def _push_setting(target: PhoneTarget, xml: str) -> None:
    async with PhoneClient(target) as phone:
        await phone.push(xml, receipts=False)


def _run(command: str, argv: Sequence[str], prog: str) -> list[str]:
    options, arguments = _parse_options(argv, prog)
    if options.help:
        return [_HELP[command].format(prog=prog)]
    if command == "send":
        items = _execute_items(arguments)
        target = _target(options)
        return asyncio.run(_send(target, execute_xml(items)))
    if command == "background":
        _expect(arguments, "ICON-URL and IMAGE-URL", 2)
        icon, image = arguments
        xml = background_xml(icon, image)
        asyncio.run(_push_setting(_target(options), xml))
        return [f"Background set to {image}"]
    _expect(arguments, "one URL", 1)
    xml = ringtone_xml(arguments[0])
    asyncio.run(_push_setting(_target(options), xml))
    return [f"Ring tone set to {arguments[0]}"]


def main(argv: Sequence[str], prog: str = "phonepush send") -> int:
    """Run ``send``, ``background`` or ``ringtone``, chosen by the last word of ``prog``."""
    command = prog.split()[-1] if prog.split() else "send"
    if command not in _HELP:
        command = "send"
    try:
        lines = _run(command, argv, prog)
    except (_Abort, PhonepushError) as exc:
        print(exc, file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
