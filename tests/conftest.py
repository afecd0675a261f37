"""Shared fixtures. Each section belongs to the module it serves; add sections, keep others."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from defectd.testing.mosquitto import Mosquitto

# --- engines: a tiny trained U-Net exported to ONNX, its checkpoint and an INT8 QDQ copy ---

TINY_SIZE = 64


def blob_batch(
    rng: np.random.Generator, n: int, size: int = TINY_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy gray images ``(n, 1, size, size)`` float32 pixels in 0..255 with bright discs,
    and their masks ``(n, 1, size, size)`` float32 in {0, 1}."""
    yy, xx = np.mgrid[0:size, 0:size]
    images = rng.normal(0.45, 0.08, size=(n, 1, size, size)).astype(np.float32)
    masks = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(6, size - 6, size=2)
            r = rng.uniform(2.5, 7.0)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            masks[i, 0][disc] = 1.0
            images[i, 0][disc] += 0.35
    return np.clip(images, 0.0, 1.0) * 255.0, masks


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` (+ card, + ``model.pt`` checkpoint) of a U-Net (base 4, depth 2, 1x64x64)
    trained for a few seconds to find bright discs, so thresholded masks mean something."""
    import torch

    from defectd.model import ModelCard, UNet, UNetConfig
    from defectd.model.checkpoint import save_checkpoint
    from defectd.model.export import export_onnx

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    card = ModelCard(name="tiny", input={"channels": 1, "height": TINY_SIZE, "width": TINY_SIZE})
    net = UNet(UNetConfig(base=4, depth=2))
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))
    net.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest on a busy machine
    for _ in range(60):
        images, masks = blob_batch(rng, 8)
        x = torch.from_numpy(card.normalisation.apply(images))
        loss = loss_fn(net(x), torch.from_numpy(masks))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    net.eval()
    out = tmp_path_factory.mktemp("tiny") / "model.onnx"
    card = export_onnx(net, card, out)
    save_checkpoint(out.with_suffix(".pt"), net, card)
    return out


@pytest.fixture(scope="session")
def tiny_int8_model(tiny_model: Path) -> Path:
    """``model.int8.onnx`` beside ``tiny_model``: min/max QDQ (uint8 activations, the CPU
    form) from 32 calibration images."""
    from defectd.calibration.int8 import quantize_qdq
    from defectd.model import load_card

    card = load_card(tiny_model)
    rng = np.random.default_rng(1)
    batches = [card.normalisation.apply(blob_batch(rng, 8)[0]) for _ in range(4)]
    out = tiny_model.with_name("model.int8.onnx")
    quantize_qdq(tiny_model, out, batches)
    return out


@pytest.fixture(scope="session")
def tiny_int8_trt_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``tiny_model`` with ``model.int8-sym.onnx`` beside it: symmetric-int8 QDQ
    (what TensorRT takes), with its card."""
    import shutil

    from defectd.calibration.int8 import quantize_qdq
    from defectd.model import card_path, load_card

    folder = tmp_path_factory.mktemp("tiny_trt")
    fp32 = folder / "model.onnx"
    shutil.copy(tiny_model, fp32)
    shutil.copy(card_path(tiny_model), card_path(fp32))
    card = load_card(fp32)
    rng = np.random.default_rng(1)
    batches = [card.normalisation.apply(blob_batch(rng, 8)[0]) for _ in range(4)]
    quantize_qdq(fp32, folder / "model.int8-sym.onnx", batches, symmetric_activations=True)
    return fp32


# --- publish: Mosquitto brokers on free ports (persistence on; SIGKILL, restart) ---


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Factory of local brokers: ``broker = mosquitto()`` starts one on a free port with
    persistence on (saved every second); ``broker.host``/``broker.port``, ``broker.kill()``
    (SIGKILL), ``broker.stop()``, ``broker.start()`` (same port), ``broker.restart()``.
    Keyword arguments go to ``defectd.testing.mosquitto.Mosquitto`` (``listener_conf``,
    ``extra_conf``, ``allow_anonymous`` ...). Every broker is stopped at teardown."""
    from defectd.testing.mosquitto import Mosquitto, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("the mosquitto broker binary is not installed")
    brokers: list[Mosquitto] = []

    def factory(**kwargs: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(brokers)}", **kwargs)
        brokers.append(broker)
        broker.start()
        return broker

    yield factory
    for broker in brokers:
        broker.close()


class MqttCollector:
    """A QoS 1 subscriber (MQTT 5) that records every message on ``topic`` and re-subscribes
    on every (re)connect; ``persistent`` keeps its session on the broker (clean start off)."""

    def __init__(
        self, host: str, port: int, topic: str, *, client_id: str = "", persistent: bool = False
    ) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.topic = topic
        self.messages: list[Any] = []  # paho MQTTMessage objects, in arrival order
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self._client.connect(host, port, 30, clean_start=not persistent, properties=props)
        self._client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(messages)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def payloads(self, suffix: str) -> list[dict[str, Any]]:
        """JSON payloads of the messages whose topic ends with ``suffix``, in arrival order."""
        import json

        with self._cond:
            return [json.loads(m.payload) for m in self.messages if m.topic.endswith(suffix)]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def mqtt_collector() -> Iterator[Callable[..., MqttCollector]]:
    """Factory: ``mqtt_collector(host, port, "prefix/#", persistent=..., client_id=...)``."""
    collectors: list[MqttCollector] = []

    def factory(*args: Any, **kwargs: Any) -> MqttCollector:
        collectors.append(MqttCollector(*args, **kwargs))
        return collectors[-1]

    yield factory
    for c in collectors:
        c.close()


# --- logging: every test starts with logs going to its own captured stderr ---
# A CLI test that runs ``main()`` in-process configures structlog to write to that test's
# captured stream, which pytest closes afterwards; background threads of later tests (camera
# sources, publishers) would then fail on their first log line.


@pytest.fixture(autouse=True)
def _structlog_to_this_tests_stderr() -> Iterator[None]:
    import sys

    import structlog

    from defectd.log import configure_logging

    saved = structlog.get_config()
    configure_logging("info", "console", sys.stderr)
    yield
    structlog.configure(**saved)


# --- storage faults: a small tmpfs to fill (the outbox, the daemon's state directory) ---


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``tmpfs(size_bytes)`` mounts a tmpfs of that size and returns it; skips the test where
    mounting is not allowed (not root, no CAP_SYS_ADMIN, no mount binary)."""
    import os
    import shutil
    import subprocess
    import uuid

    mounts: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


# --- bench scripts (bench/NAME.py) loaded as modules, for the tests of their helpers ---

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="session")
def bench_module() -> Callable[[str], ModuleType]:
    """``bench_module("demo_line")`` loads bench/demo_line.py once per session. Bench scripts
    import ``_common`` from their own folder, so bench/ is on ``sys.path`` while one loads."""
    loaded: dict[str, ModuleType] = {}

    def load(name: str) -> ModuleType:
        if name not in loaded:
            sys.path.insert(0, str(BENCH))
            try:
                spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(BENCH))
            loaded[name] = module
        return loaded[name]

    return load
