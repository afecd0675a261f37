"""The OPC UA server on loopback, checked with a real asyncua client over Basic256Sha256
Sign&Encrypt: nodes, Verdict events, history, the Trigger method and who is let in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from defectd.errors import ConfigError
from defectd.opcua.records import StationState, VerdictQueue
from defectd.opcua.server import OpcUaServer
from defectd.pipeline.inspection import Defect, Inspection, Verdict
from defectd.pipeline.parts import parse_trigger
from opcua_support import (
    STATION,
    Events,
    Pki,
    closing,
    connect,
    make_pki,
    opcua_config,
    read,
    station_node,
    verdict_type,
    wait_for,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Triggers:
    """What the server handed to the line: (camera, parsed trigger) per accepted call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, camera: str, payload: bytes, t_wall: float, t_ns: int) -> None:
        ticket = parse_trigger(payload, camera=camera, now_wall=t_wall, now_ns=t_ns)
        self.calls.append((camera, {"part_id": ticket.part_id, "gate": ticket.gate_deadline}))


@pytest.fixture(scope="module")
def served(pki: Pki) -> Iterator[tuple[OpcUaServer, Triggers]]:
    triggers = Triggers()
    server = OpcUaServer(
        opcua_config(pki, history_size=5000, recent_size=4),
        STATION,
        ["cam0", "cam1"],
        trigger_cameras=["cam1"],
        on_trigger=triggers,
    )
    server.start()
    yield server, triggers
    server.stop()


def inspection(part: str, verdict: Verdict = Verdict.PASS, camera: str = "cam0") -> Inspection:
    defects = ()
    if verdict is Verdict.FAIL:
        defects = (Defect(120, (4, 5, 10, 12), (9.0, 11.0), 0.97, 0.8, 0.31),)
    return Inspection(
        station=STATION,
        camera=camera,
        seq=0,
        verdict=verdict,
        defects=defects,
        rule="area>=0.5mm2" if verdict is Verdict.FAIL else None,
        part_id=part,
        model_name="tiny",
        model_sha256="ab" * 32,
        t_grab_wall=1.7e9,
        latencies_ms={"total": 7.5},
    )


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_a_subscriber_gets_one_verdict_event_per_part_and_the_last_verdict_nodes(
    served: tuple[OpcUaServer, Triggers], pki: Pki
) -> None:
    server, _ = served

    async def go() -> None:
        client = await connect(server.endpoint_url, pki)
        async with closing(client):
            station, ns = await station_node(client)
            events, changes = Events(), Events()
            sub = await client.create_subscription(10, events)
            await sub.subscribe_events(station, await verdict_type(client), queuesize=0)
            sub2 = await client.create_subscription(10, changes)
            await sub2.subscribe_data_change(
                client.get_node(ua.NodeId(f"{STATION}/cam0/LastPartId", ns))
            )
            await wait_for(lambda: len(changes.items) >= 1)  # the initial value
            server.submit(inspection("A-1"))
            server.submit(inspection("A-2", Verdict.FAIL))
            assert await wait_for(lambda: len(events.items) >= 2)
            assert await wait_for(lambda: "A-2" in changes.items)
            await asyncio.sleep(0.2)
            first, second = events.items[:2]
            assert [e.PartId for e in events.items] == ["A-1", "A-2"]
            assert (first.Verdict, first.VerdictCode, first.Camera) == ("pass", 1, "cam0")
            assert (second.Verdict, second.VerdictCode, second.Defects) == ("fail", 2, 1)
            assert second.Sequence == first.Sequence + 1
            assert json.loads(second.DefectsJson)[0]["area_px"] == 120
            assert second.ModelSha256 == "ab" * 32 and second.Rule == "area>=0.5mm2"
            assert await read(client, ns, f"{STATION}/cam0/LastPartId") == "A-2"
            assert await read(client, ns, f"{STATION}/cam0/LastVerdict") == "fail"
            assert await read(client, ns, f"{STATION}/cam0/LastVerdictCode") == 2
            assert await read(client, ns, f"{STATION}/cam0/LastSequence") == second.Sequence
            assert await read(client, ns, f"{STATION}/cam0/LastModelSha256") == "ab" * 32
            fails = await read(client, ns, f"{STATION}/cam0/Counters/Fail")
            assert fails >= 1
            assert await read(client, ns, f"{STATION}/cam1/LastVerdict") == "none"

    run(go())


def test_station_status_and_health_are_nodes(
    served: tuple[OpcUaServer, Triggers], pki: Pki
) -> None:
    server, _ = served
    server.set_state(
        StationState(
            status="online",
            live=True,
            ready=False,
            health="broker unreachable",
            model_name="tiny",
            model_sha256="cd" * 32,
            outbox_depth=12,
        )
    )

    async def go() -> None:
        client = await connect(server.endpoint_url, pki)
        async with closing(client):
            _, ns = await station_node(client)
            assert await wait_for(lambda: True)
            for _ in range(50):
                if await read(client, ns, f"{STATION}/Status") == "online":
                    break
                await asyncio.sleep(0.05)
            assert await read(client, ns, f"{STATION}/Status") == "online"
            assert await read(client, ns, f"{STATION}/Live") is True
            assert await read(client, ns, f"{STATION}/Ready") is False
            assert await read(client, ns, f"{STATION}/Health") == "broker unreachable"
            assert await read(client, ns, f"{STATION}/ModelSha256") == "cd" * 32
            assert await read(client, ns, f"{STATION}/OutboxDepth") == 12

    run(go())


def test_a_reconnecting_client_reads_the_verdicts_it_missed(
    served: tuple[OpcUaServer, Triggers], pki: Pki
) -> None:
    server, _ = served
    parts = [f"H-{i}" for i in range(20)]

    async def go() -> None:
        # Nobody is connected while these parts pass.
        for part in parts:
            server.submit(inspection(part, camera="cam1"))
        client = await connect(server.endpoint_url, pki)
        async with closing(client):
            station, ns = await station_node(client)
            assert await wait_for(lambda: server.stats().waiting == 0)
            await asyncio.sleep(0.1)
            history = await station.read_event_history(None, None, 0, [await verdict_type(client)])
            missed = [e.PartId for e in history if e.PartId.startswith("H-")]
            assert missed == parts
            sequences = [e.Sequence for e in history if e.PartId.startswith("H-")]
            assert sequences == list(range(sequences[0], sequences[0] + 20))
            # The ring of recent verdicts, for clients that can only read: newest first.
            recent = await read(client, ns, f"{STATION}/cam1/Recent/PartIds")
            assert recent == ["H-19", "H-18", "H-17", "H-16"]
            seqs = await read(client, ns, f"{STATION}/cam1/Recent/Sequences")
            assert seqs == sequences[::-1][:4]

    run(go())


def test_the_trigger_method_hands_the_part_to_the_line(
    served: tuple[OpcUaServer, Triggers], pki: Pki
) -> None:
    server, triggers = served
    gate = datetime.now(UTC) + timedelta(seconds=2)

    async def go() -> None:
        client = await connect(server.endpoint_url, pki)
        async with closing(client):
            _, ns = await station_node(client)
            cam1 = client.get_node(ua.NodeId(f"{STATION}/cam1", ns))
            method = ua.NodeId(f"{STATION}/cam1/Trigger", ns)
            null_time = ua.Variant(ua.get_win_epoch(), ua.VariantType.DateTime)  # "none"
            ok = await cam1.call_method(
                method,
                ua.Variant("P-7", ua.VariantType.String),
                null_time,
                ua.Variant(800.0, ua.VariantType.Double),
            )
            assert ok == [True, "accepted"]
            absolute = await cam1.call_method(
                method,
                ua.Variant("P-9", ua.VariantType.String),
                ua.Variant(gate, ua.VariantType.DateTime),
                ua.Variant(0.0, ua.VariantType.Double),
            )
            assert absolute == [True, "accepted"]
            bad = await cam1.call_method(
                method,
                ua.Variant("has space", ua.VariantType.String),
                null_time,
                ua.Variant(0.0, ua.VariantType.Double),
            )
            assert bad[0] is False and "part_id: expected 1-128 printable ASCII" in bad[1]
            cam0 = client.get_node(ua.NodeId(f"{STATION}/cam0", ns))
            free = await cam0.call_method(
                ua.NodeId(f"{STATION}/cam0/Trigger", ns),
                ua.Variant("P-8", ua.VariantType.String),
                null_time,
                ua.Variant(0.0, ua.VariantType.Double),
            )
            assert free[0] is False and "takes no triggers over OPC UA" in free[1]

    run(go())
    assert [(c, t["part_id"]) for c, t in triggers.calls] == [("cam1", "P-7"), ("cam1", "P-9")]
    assert triggers.calls[0][1]["gate"] is not None
    assert abs(triggers.calls[1][1]["gate"] - gate.timestamp()) < 1e-3


def test_a_wrong_password_is_refused(served: tuple[OpcUaServer, Triggers], pki: Pki) -> None:
    server, _ = served
    refused = server.stats().refused_sessions
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        run(connect(server.endpoint_url, pki, password="wrong"))
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        run(connect(server.endpoint_url, pki, user="intruder"))
    assert server.stats().refused_sessions == refused + 2


def test_an_untrusted_client_certificate_is_refused(
    served: tuple[OpcUaServer, Triggers], pki: Pki
) -> None:
    server, _ = served
    with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
        run(connect(server.endpoint_url, pki, cert=pki.rogue_cert, key=pki.rogue_key))


def test_anonymous_sessions_are_refused_by_default(
    served: tuple[OpcUaServer, Triggers], pki: Pki
) -> None:
    server, _ = served
    with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
        run(connect(server.endpoint_url, pki, user=None, password=None))


def test_there_is_no_unencrypted_endpoint_by_default(
    served: tuple[OpcUaServer, Triggers], pki: Pki
) -> None:
    server, _ = served

    async def go() -> list[Any]:
        from asyncua import Client

        client = Client(server.endpoint_url)
        endpoints: list[Any] = await client.connect_and_get_server_endpoints()
        return endpoints

    endpoints = run(go())
    assert {(e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode) for e in endpoints} == {
        ("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)
    }
    with pytest.raises(ua.UaError):
        run(connect(server.endpoint_url, pki, secure=False))


def test_anonymous_sessions_are_let_in_only_when_configured(pki: Pki) -> None:
    server = OpcUaServer(opcua_config(pki, allow_anonymous=True), STATION, ["cam0"])
    server.start()
    try:

        async def go() -> str:
            client = await connect(server.endpoint_url, pki, user=None, password=None)
            async with closing(client):
                _, ns = await station_node(client)
                value: str = await read(client, ns, f"{STATION}/cam0/LastVerdict")
                return value

        assert run(go()) == "none"
    finally:
        server.stop()


def test_a_certificate_for_another_application_stops_the_start(pki: Pki, tmp_path: Path) -> None:
    server = OpcUaServer(opcua_config(pki), "other-station", ["cam0"])
    with pytest.raises(ConfigError, match=r"opcua.certificate: .* not the application URI"):
        server.start()


def test_a_full_hand_over_queue_counts_the_verdicts_it_drops() -> None:
    woken: list[int] = []
    queue = VerdictQueue(16, on_first=lambda: woken.append(1))
    results = [queue.put(inspection(f"Q-{i}"), 1.7e9) for i in range(20)]
    assert results == [True] * 16 + [False] * 4
    assert (queue.accepted, queue.dropped, len(woken)) == (16, 4, 1)
    taken = queue.take()
    assert [r.part_id for r in taken] == [f"Q-{i}" for i in range(16)]
    queue.put(inspection("Q-20"), 1.7e9)
    # The dropped verdicts leave a gap in the sequence a client can see.
    assert queue.take()[0].sequence == 21 and len(woken) == 2
