"""The daemon with ``[opcua]``: the section's checks, and the synthetic line seen by an asyncua
client on loopback while MQTT runs beside it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from defectd.daemon.config import load_station_config
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.errors import ConfigError
from opcua_support import (
    STATION,
    Events,
    Pki,
    closing,
    connect,
    free_port,
    make_pki,
    opcua_toml,
    read,
    station_node,
    verdict_type,
    wait_for,
)
from station_support import NO_BROKER_NO_HEALTH, model_section, serving


def station_text(model: Path, state: Path, *, camera: str, extra: str = "") -> str:
    return f"""
station = "{STATION}"
{model_section(model)}
[[cameras]]
{camera}
{NO_BROKER_NO_HEALTH}
[archive]
enabled = false
[daemon]
state_dir = "{state}"
drain_timeout_s = 5
{extra}
"""


def test_an_opcua_section_without_its_certificate_names_the_keys(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    text = station_text(
        tmp_path / "m.onnx",
        tmp_path,
        camera='type = "synthetic"\ncamera = "cam0"',
        extra='[opcua]\nendpoint = "opc.tcp://0.0.0.0:4840/"\nusers_file = "users"\n',
    )
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_station_config(tmp_path / "s.toml", env={})
    assert "opcua: certificate, private_key, trusted_clients: required" in str(err.value)


def test_opcua_paths_are_relative_to_the_config_file_and_anonymous_is_off(
    tmp_path: Path,
) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    extra = (
        '[opcua]\ncertificate = "pki/s.der"\nprivate_key = "pki/s.key.pem"\n'
        'trusted_clients = "pki/trusted"\nusers_file = "pki/users"\n'
    )
    text = station_text(
        tmp_path / "m.onnx", tmp_path, camera='type = "synthetic"\ncamera = "cam0"', extra=extra
    )
    (tmp_path / "s.toml").write_text(text)
    cfg = load_station_config(tmp_path / "s.toml", env={})
    assert cfg.opcua is not None
    assert cfg.opcua.certificate == tmp_path / "pki" / "s.der"
    assert cfg.opcua.users_file == tmp_path / "pki" / "users"
    assert cfg.opcua.allow_anonymous is False
    assert cfg.opcua.security_policies == ("Basic256Sha256_SignAndEncrypt",)
    assert cfg.opcua.application_uri_for(cfg.station) == f"urn:defectd:{STATION}:server"


def test_a_plain_endpoint_needs_no_certificate_but_still_a_way_in(tmp_path: Path) -> None:
    from defectd.opcua.config import OpcUaConfig

    with pytest.raises(ValueError, match="users_file: required unless allow_anonymous"):
        OpcUaConfig(security_policies=("None",))
    cfg = OpcUaConfig(security_policies=("None",), allow_anonymous=True)
    assert not cfg.secure


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def line(tmp_path: Path, tiny_model: Path, pki: Pki) -> Iterator[tuple[Service, str]]:
    """The daemon on a thread: a synthetic line of 1,000 parts at 100 parts/s, the OPC UA
    server on a free loopback port, the broker unreachable (results wait in the outbox)."""
    port = free_port()
    camera = (
        'type = "synthetic"\ncamera = "cam0"\nrate_hz = 100\nheight = 64\nwidth = 64\n'
        "defect_rate = 0.3\ncount = 1000"
    )
    text = station_text(
        tiny_model,
        tmp_path / "state",
        camera=camera,
        # One post-processing worker, no admission errors: parts finish in frame order.
        extra=opcua_toml(pki, port, "") + '\n[pipeline]\nworkers = 1\nadmission = "block"\n',
    )
    (tmp_path / "s.toml").write_text(text)
    service = Service(
        load_station_config(tmp_path / "s.toml"), notifier=SdNotifier({}), install_signals=False
    )
    with serving(service):
        yield service, f"opc.tcp://127.0.0.1:{port}/defectd/"


def test_every_part_of_the_synthetic_line_is_seen_once_with_its_part_id(
    line: tuple[Service, str], pki: Pki
) -> None:
    """A client that subscribes while the line runs gets each later part once, as an event,
    and reads the earlier ones from the history: 1,000 parts, no gap, no duplicate."""
    service, url = line
    expected = [f"cam0-{n}" for n in range(1000)]

    async def go() -> tuple[list[Any], list[Any], dict[str, Any]]:
        client = None
        for _ in range(200):  # the server starts once the model is loaded
            try:
                client = await connect(url, pki)
                break
            except (TimeoutError, OSError):
                await asyncio.sleep(0.1)
        assert client is not None
        async with closing(client):
            station, ns = await station_node(client)
            etype = await verdict_type(client)
            events = Events()
            sub = await client.create_subscription(20, events)
            await sub.subscribe_events(station, etype, queuesize=0)
            assert await wait_for(lambda: len(events.items) >= 1, 60)
            first_live = events.items[0].Sequence
            assert await wait_for(
                lambda: events.items[-1].Sequence >= 1000 if events.items else False, 120
            )
            await asyncio.sleep(0.3)
            history = await station.read_event_history(None, None, 0, [etype])
            nodes = {
                "results": await read(client, ns, f"{STATION}/cam0/Counters/Results"),
                "last": await read(client, ns, f"{STATION}/cam0/LastPartId"),
                "status": await read(client, ns, f"{STATION}/Status"),
                "dropped": await read(client, ns, f"{STATION}/Counters/EventsDropped"),
                "sha": await read(client, ns, f"{STATION}/ModelSha256"),
            }
            missed = [e for e in history if e.Sequence < first_live]
            return missed, list(events.items), nodes

    missed, live, nodes = asyncio.run(asyncio.wait_for(go(), 240))
    seen = [e.PartId for e in missed] + [e.PartId for e in live]
    # Post-processing threads finish parts slightly out of order; each part comes once.
    assert len(seen) == 1000
    assert sorted(seen, key=lambda part: int(part.split("-")[1])) == expected
    sequences = [e.Sequence for e in missed] + [e.Sequence for e in live]
    assert sequences == list(range(1, 1001))
    assert len(live) > 500  # most parts passed while the client watched
    assert nodes["results"] == 1000 and nodes["last"] == "cam0-999"
    assert nodes["status"] == "online" and nodes["dropped"] == 0
    assert len(nodes["sha"]) == 64
    service.should_exit = True
    deadline = time.monotonic() + 30
    while service.outbox_left is None and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def triggered(tmp_path: Path, tiny_model: Path, pki: Pki) -> Iterator[tuple[Service, str]]:
    """The daemon with a PLC-triggered synthetic camera (one part per trigger) and OPC UA."""
    port = free_port()
    camera = (
        'type = "synthetic"\ncamera = "cam0"\ntrigger = "request"\nheight = 64\nwidth = 64\n'
        'defect_rate = 0.5\nseed = 5\n[cameras.line]\nmode = "plc-trigger"\n'
        "frame_timeout_ms = 2000"
    )
    extra = opcua_toml(pki, port)
    text = station_text(tiny_model, tmp_path / "state", camera=camera, extra=extra)
    text = text.replace("drain_timeout_s = 5\n", "drain_timeout_s = 5\ncamera_idle_ok = true\n")
    (tmp_path / "s.toml").write_text(text)
    service = Service(
        load_station_config(tmp_path / "s.toml"), notifier=SdNotifier({}), install_signals=False
    )
    with serving(service, lambda: service.line is not None, start_s=60):
        yield service, f"opc.tcp://127.0.0.1:{port}/defectd/"


def test_the_trigger_method_pairs_parts_with_their_frames(
    triggered: tuple[Service, str], pki: Pki
) -> None:
    """Parts announced with Trigger(PartId, GateDeadline, GateMs) are imaged one by one; each
    verdict event names its part, carries its gate, and the line paired every frame."""
    from asyncua import ua

    service, url = triggered
    parts = [f"P-{n:03d}" for n in range(30)]

    async def go() -> tuple[list[Any], list[Any]]:
        client = await connect(url, pki)
        async with closing(client):
            station, ns = await station_node(client)
            events = Events()
            sub = await client.create_subscription(10, events)
            await sub.subscribe_events(station, await verdict_type(client), queuesize=0)
            cam0 = client.get_node(ua.NodeId(f"{STATION}/cam0", ns))
            method = ua.NodeId(f"{STATION}/cam0/Trigger", ns)
            answers = []
            for part in parts:
                answers.append(
                    await cam0.call_method(
                        method,
                        ua.Variant(part, ua.VariantType.String),
                        ua.Variant(ua.get_win_epoch(), ua.VariantType.DateTime),
                        ua.Variant(20_000.0, ua.VariantType.Double),
                    )
                )
            assert await wait_for(lambda: len(events.items) >= len(parts), 60)
            await asyncio.sleep(0.3)
            return answers, list(events.items)

    answers, events = asyncio.run(asyncio.wait_for(go(), 120))
    assert answers == [[True, "accepted"]] * len(parts)
    assert sorted(e.PartId for e in events) == parts
    for e in events:
        assert e.Verdict in ("pass", "fail") and e.Camera == "cam0"
        assert e.GateDeadline is not None and e.Late is False
    assert service.line is not None
    stats = service.line.stats()["cam0"]
    assert (stats["paired"], stats["unpaired_frames"], stats["mispaired"]) == (30, 0, 0)


class SilentCamera:
    """A camera in request mode whose frames never come (a broken trigger line)."""

    camera = "cam0"

    def fire_trigger(self, world_key: str | None = None) -> None:
        return None


def test_a_triggered_part_without_a_frame_gets_an_error_no_frame_event(pki: Pki) -> None:
    """The Trigger method goes through the line intake; when no frame comes in
    ``frame_timeout_ms`` the part's verdict event is ``error:no_frame`` (code 3)."""
    from asyncua import ua

    from defectd.daemon.config import StationCamera
    from defectd.daemon.line import LineIntake
    from defectd.daemon.opcua_link import OpcUaLink
    from defectd.opcua.records import StationState
    from defectd.pipeline.parts import LineConfig
    from defectd.pipeline.sources import SyntheticSourceConfig
    from opcua_support import opcua_config

    camera = StationCamera(
        source=SyntheticSourceConfig(camera="cam0", trigger="request"),
        line=LineConfig(mode="plc-trigger", frame_timeout_ms=100),
    )
    link = OpcUaLink()
    link.start(opcua_config(pki), STATION, ["cam0"], StationState)
    server = link.server
    assert server is not None
    line = LineIntake(
        STATION,
        [camera],
        submit=lambda frame: None,
        on_no_frame=link.submit,
        publish_event=lambda kind, fields: None,
    )
    line.attach([SilentCamera()])  # type: ignore[list-item]
    line.start()
    link.set_trigger(["cam0"], line.on_trigger)

    async def go() -> list[Any]:
        client = await connect(server.endpoint_url, pki)
        async with closing(client):
            station, ns = await station_node(client)
            events = Events()
            sub = await client.create_subscription(10, events)
            await sub.subscribe_events(station, await verdict_type(client), queuesize=0)
            answer = await client.get_node(ua.NodeId(f"{STATION}/cam0", ns)).call_method(
                ua.NodeId(f"{STATION}/cam0/Trigger", ns),
                ua.Variant("P-404", ua.VariantType.String),
                ua.Variant(ua.get_win_epoch(), ua.VariantType.DateTime),
                ua.Variant(5000.0, ua.VariantType.Double),
            )
            assert answer == [True, "accepted"]
            assert await wait_for(lambda: len(events.items) >= 1, 10)
            assert await read(client, ns, f"{STATION}/cam0/LastRule") == "error:no_frame"
            return list(events.items)

    try:
        events = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        line.stop()
        link.stop("offline", 5.0)
    (event,) = events
    assert (event.PartId, event.Verdict, event.VerdictCode) == ("P-404", "error", 3)
    assert event.Rule == "error:no_frame" and "no frame in time" in event.Reason
    assert line.stats()["cam0"]["no_frame"] == 1
