"""What the HTTP routes share: the daemon builds it and swaps fields on reload."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phonepush.metrics import Metrics

if TYPE_CHECKING:
    from phonepush.alerting.acks import AckService
    from phonepush.alerting.actions import ActionService
    from phonepush.console.screens import Screens
    from phonepush.health.monitor import Health
    from phonepush.http.authenticate import Authenticator
    from phonepush.pipeline.intake import Intake
    from phonepush.silence.silences import Silences
    from phonepush.store.interface import Store

__all__ = ["ServerState"]


@dataclass(slots=True)
class ServerState:
    """What the routes need; the daemon swaps fields on reload."""

    intake: Intake
    spool: Store
    metrics: Metrics
    token: str | None = None
    hmac_secret: str | None = None
    max_body: int = 64 * 1024
    retry_after: int = 5
    #: False once shutdown begins: hooks answer 503 so senders retry against the next start.
    accepting: bool = True
    #: extra readiness checks, name -> callable returning an error text or "" when fine
    readiness: dict[str, Callable[[], str]] = field(default_factory=dict)
    #: runtime silences (``/api/silences``, phonepush.http.silences_api); None: the API answers 503
    silences: Silences | None = None
    #: phone health (``GET /api/phones``, phonepush.http.api); None: that route answers 503
    health: Health | None = None
    #: acknowledgements (``/ack/<token>``, phonepush.http.api); None: those routes answer 404
    acks: AckService | None = None
    #: action softkeys (``/act/<token>``, phonepush.http.api); None: that route answers 404
    actions: ActionService | None = None
    #: the phones' authentication URL (phonepush.http.authenticate); None: ``/authenticate`` is 404
    authenticator: Authenticator | None = None
    #: phones' screens shown by the console (``phonepush demo``'s simulated phones); None: hidden
    screens: Screens | None = None
