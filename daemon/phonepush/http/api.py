"""HTTP routes for acknowledgements and the status API, mounted by :mod:`phonepush.http.server`.

``GET /pages/<id>/<token>``  a page with Ack and Close softkeys, for the phone holding ``token``
``GET /ack/<token>``         what the Ack softkey requests: records the ack, answers the phone
                             with a confirmation page (404 page for an unknown token)
``GET /act/<token>``         what an action softkey requests (``?confirm=1``: its Yes): does
                             the action, answers the phone with the result page
``GET /api/events/<id>``     what became of an event (the id a hook's 202 returned); bearer
                             token as for hooks: ``{"event", "rule", "rules", "deliveries": [...],
                             "alerts": [...], "actions": [...]}``; a delivery's ``state`` is one of
                             :data:`DELIVERY_STATES`
``GET /api/phones``          every configured phone's health (phonepush.health): a JSON list of
                             ``{"name", "host", "groups", "reachable", "since", "model",
                             "firmware", "mac", "last_push", "pending", "error"}``; bearer token
                             as above
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phonepush.errors import SpoolError
from phonepush.store.interface import Store
from phonepush.store.records import AlertPhone, DeliveryState, EventRecord, RoundKind

if TYPE_CHECKING:
    from phonepush.http.state import ServerState

__all__ = ["DELIVERY_STATES", "api_routes", "event_status"]

#: What ``GET /api/events/<id>`` says a delivery is.
DELIVERY_STATES: Final = tuple(s.value for s in DeliveryState)
_XML: Final = "text/xml; charset=UTF-8"


async def event_status(spool: Store, record: EventRecord) -> dict[str, Any]:
    """The status API's answer for one stored event."""
    rounds = await spool.alerts.delivery_rounds(record.id)
    acks: dict[tuple[str, str], AlertPhone] = {
        (p.rule, p.phone): p for p in await spool.alerts.phones_of(record.id)
    }
    deliveries = []
    for d in record.deliveries:
        number, kind = rounds.get(d.id, (0, RoundKind.PAGE))
        entry: dict[str, Any] = {
            "id": d.id,
            "rule": d.rule,
            "phone": d.phone,
            "state": d.state,
            "kind": kind,
            "round": number,
            "attempts": d.attempts,
            "error": d.error,
            "created_at": d.created_at,
            "expires_at": d.expires_at,
        }
        ack = acks.get((d.rule, d.phone))
        if d.state is DeliveryState.ACKNOWLEDGED and ack is not None:
            entry["acknowledged_at"] = ack.acked_at
            entry["acknowledged_from"] = ack.acked_by
        deliveries.append(entry)
    alerts = [
        {
            "rule": a.rule,
            "state": a.state,
            "scope": a.scope,
            "rounds": a.rounds,
            "max_repeats": a.max_repeats,
            "next_at": a.next_at,
            "ended_at": a.ended_at,
            "ended_by": a.ended_by,
            "acknowledged": [
                {"phone": p.phone, "at": p.acked_at, "from": p.acked_by}
                for p in acks.values()
                if p.rule == a.rule and p.acked_at is not None
            ],
        }
        for a in await spool.alerts.of_event(record.id)
    ]
    presses = [
        {
            "phone": p.phone,
            "rule": p.rule,
            "action": p.label,
            "at": p.at,
            "result": p.result,
            "error": p.error,
            "from": p.by,
        }
        for p in await spool.alerts.presses_of(record.id)
    ]
    return {
        "event": record.id,
        "rule": record.rules[0] if record.rules else None,
        "rules": list(record.rules),
        "source": record.source,
        "topic": record.topic,
        "received_at": record.received_at,
        "deliveries": deliveries,
        "alerts": alerts,
        "actions": presses,
    }


def api_routes(state: ServerState, *, bearer_ok: Callable[[Request, str], bool]) -> list[Route]:
    """The routes above, over ``state`` (``state.acks`` answers the phones' requests)."""

    async def ack_page(request: Request) -> Response:
        acks = state.acks
        if acks is None:
            return Response("acknowledgements are off", status_code=404)
        try:
            answer = await acks.page(request.path_params["page_id"], request.path_params["token"])
        except SpoolError:
            return Response("spool unavailable", status_code=503, headers={"Retry-After": "5"})
        return Response(answer.xml, status_code=answer.status, media_type=_XML)

    async def ack(request: Request) -> Response:
        acks = state.acks
        if acks is None:
            return Response("acknowledgements are off", status_code=404)
        address = request.client.host if request.client is not None else ""
        try:
            answer = await acks.acknowledge(request.path_params["token"], request.headers, address)
        except SpoolError:
            return Response("spool unavailable", status_code=503, headers={"Retry-After": "5"})
        return Response(answer.xml, status_code=answer.status, media_type=_XML)

    async def act(request: Request) -> Response:
        if request.method == "HEAD":
            # Starlette answers HEAD on GET routes; a link checker's HEAD must not open a door.
            return Response(status_code=405, headers={"Allow": "GET, POST"})
        actions = state.actions
        if actions is None:
            return Response("actions are off", status_code=404)
        address = request.client.host if request.client is not None else ""
        try:
            answer = await actions.press(
                request.path_params["token"],
                confirmed=request.query_params.get("confirm") == "1",
                headers=request.headers,
                address=address,
            )
        except SpoolError:
            return Response("spool unavailable", status_code=503, headers={"Retry-After": "5"})
        return Response(answer.xml, status_code=answer.status, media_type=_XML)

    async def event(request: Request) -> Response:
        if state.token is not None and not bearer_ok(request, state.token):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        event_id = request.path_params["event_id"]
        try:
            record = await state.spool.events.get(event_id)
            if record is None:
                return JSONResponse({"error": f"no event {event_id[:64]!r}"}, status_code=404)
            return JSONResponse(await event_status(state.spool, record))
        except SpoolError:
            return JSONResponse(
                {"error": "spool unavailable"}, status_code=503, headers={"Retry-After": "5"}
            )

    async def phones(request: Request) -> Response:
        if state.token is not None and not bearer_ok(request, state.token):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if state.health is None:
            return JSONResponse({"error": "phone health not running"}, status_code=503)
        return JSONResponse(state.health.phones())

    return [
        Route("/pages/{page_id}/{token}", ack_page, methods=["GET"]),
        Route("/ack/{token}", ack, methods=["GET", "POST"]),
        Route("/act/{token}", act, methods=["GET", "POST"]),
        Route("/api/events/{event_id}", event, methods=["GET"]),
        Route("/api/phones", phones, methods=["GET"]),
    ]
