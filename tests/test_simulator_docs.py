"""docs/simulator.md describes the control endpoint as it is: every fault mode and model is
documented, and each route answers with the status and shape the page gives."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from phonepush.sim.simulator import FAULT_MODES, MODELS, Fleet

DOC = Path(__file__).resolve().parent.parent / "docs" / "simulator.md"


def test_every_fault_mode_and_model_is_documented() -> None:
    text = DOC.read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, re.M))
    assert documented == set(FAULT_MODES)
    for model in MODELS:
        assert f"`{model}`" in text


async def test_the_control_routes_answer_as_documented() -> None:
    async with Fleet(1) as fleet, httpx.AsyncClient(base_url=fleet.control_url) as client:
        name = fleet.phones[0].name
        assert (await client.get("/")).text.startswith("phonepush simulator: 1 phone")
        (listed,) = (await client.get("/phones")).json()
        assert listed["name"] == name and "requests" in listed
        assert (await client.get(f"/phones/{name}")).json()["index"] == 0
        assert (await client.get("/phones/nobody")).status_code == 404

        answer = await client.post("/phones/0/fault", json={"mode": "error", "number": 4})
        assert answer.status_code == 200
        assert answer.json()["fault"] == {"mode": "error", "number": 4, "delay_ms": 0.0}
        assert answer.json()["requests"] == []
        assert (await client.post("/phones/0/fault", json={"mode": "bogus"})).status_code == 400
        model = await client.post("/phones/0/model", json={"model": "multiplatform"})
        assert model.json()["model"] == "multiplatform"
        assert (await client.post("/phones/0/model", json={"model": "9900"})).status_code == 400
        reset = (await client.post("/phones/0/reset")).json()  # no body
        assert reset["fault"]["mode"] == "none" and reset["model"] == "8800"
        assert (await client.post("/phones/0/press", json={"name": "Ack"})).status_code == 404

        assert (await client.post("/phones/0/reset", content=b"[1]")).status_code == 400
        assert (await client.post("/phones/0/reset", content=b"{nope")).status_code == 400
        assert (await client.post("/phones/0/reboot", json={})).status_code == 404
        assert (await client.delete("/phones/0")).status_code == 405
        assert (await client.get("/elsewhere")).status_code == 404
