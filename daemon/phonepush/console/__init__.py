"""The web console at ``/``: phones, events, silences, rules, a test page and, with
``phonepush demo``, the phones' screens; signed in with the API token (docs/console.md).

Mounted by :func:`phonepush.http.server.create_app`; imports nothing of ``phonepush.http``
(the status and silences APIs' functions are handed in) nor of the simulator (screens come
through :class:`~phonepush.console.screens.Screens`).
"""

from phonepush.console.routes import CSP, ConsoleState, console_routes
from phonepush.console.screens import PhoneScreen, Screens, ShownSoftKey

__all__ = ["CSP", "ConsoleState", "PhoneScreen", "Screens", "ShownSoftKey", "console_routes"]
