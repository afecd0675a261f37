"""The operator view in a real browser: headless Chromium driven by Playwright, against a
station running in this process with a real Mosquitto broker, the tiny ONNX model on ONNX
Runtime and its image archive on disk."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from conftest import MqttCollector
from defectd.daemon.config import load_station_config
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.log import configure_logging
from defectd.testing.mosquitto import Mosquitto, find_mosquitto
from station_support import model_section

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "s3cret-view-token-4711"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() or find_spec("playwright") is None,
        reason="needs Debian's chromium (/usr/bin/chromium; apt-get install chromium) and the "
        "playwright package: Playwright's own browser download is not reachable here",
    ),
]


def _config(tmp: Path, model: Path, broker_port: int, health: str) -> Path:
    text = f"""
station = "web"
{model_section(model)}
[[cameras]]
type = "synthetic"
camera = "cam0"
rate_hz = 8
height = 128
width = 128
defect_rate = 0.5
seed = 5
[mqtt]
host = "127.0.0.1"
port = {broker_port}
reconnect_min_s = 0.2
reconnect_max_s = 0.5
[archive]
pass_sample = 0.0
[health]
{health}
view_fps = 4
[daemon]
state_dir = "{tmp / "state"}"
drain_timeout_s = 2
"""
    path = tmp / "station.toml"
    path.write_text(text)
    return path


class Station:
    """A service on a thread with its broker and a collector of its MQTT results."""

    def __init__(self, tmp: Path, model: Path, health: str) -> None:
        self.broker = Mosquitto(tmp / "mosquitto")
        self.broker.start()
        self.results = MqttCollector("127.0.0.1", self.broker.port, "defectd/web/cam0/result")
        self.config = load_station_config(_config(tmp, model, self.broker.port, health))
        self.service = Service(self.config, notifier=SdNotifier({}), install_signals=False)
        self._thread = threading.Thread(target=self.service.serve, name="test-station")
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.service.ready:
            assert self._thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        assert self.service.http_url is not None
        self.url = self.service.http_url

    def mqtt_result(self, result_id: str) -> dict[str, Any]:
        """The result published over MQTT under ``result_id`` (waits for it, bounded)."""

        def find(_: list[Any]) -> bool:
            return any(p["result_id"] == result_id for p in self.results.payloads("/result"))

        assert self.results.wait_for(find, timeout=10), f"{result_id} never reached MQTT"
        return next(p for p in self.results.payloads("/result") if p["result_id"] == result_id)

    def close(self) -> None:
        self.service.should_exit = True
        self._thread.join(20)
        self.results.close()
        self.broker.close()
        assert not self._thread.is_alive()


def _start(factory: pytest.TempPathFactory, model: Path, health: str) -> Callable[[], Station]:
    def start() -> Station:
        if find_mosquitto() is None:
            pytest.skip("the mosquitto broker binary is not installed")
        return Station(factory.mktemp("view"), model, health)

    return start


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Station]:
    s = _start(tmp_path_factory, tiny_model, 'address = "127.0.0.1:0"')()
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def _recent(page: Any) -> list[dict[str, str]]:
    return page.eval_on_selector_all(
        'article.camera[data-camera="cam0"] ol.recent li',
        "els => els.map(e => ({result_id: e.dataset.resultId, verdict: e.dataset.verdict,"
        " part_id: e.dataset.partId}))",
    )


def test_page_shows_live_verdicts_that_match_the_mqtt_results(station: Station, page: Any) -> None:
    page.goto(station.url + "/")
    assert page.title() == "defectd station"
    page.wait_for_function(
        "document.querySelectorAll('article.camera[data-camera=\"cam0\"] ol.recent li').length >= 6"
    )
    shown = _recent(page)
    for part in shown:
        published = station.mqtt_result(part["result_id"])
        assert part["verdict"] == published["verdict"]
        assert part["part_id"] == (published["part_id"] or "")
    card = page.locator('article.camera[data-camera="cam0"]')
    newest = station.mqtt_result(card.get_attribute("data-result-id") or "")
    assert card.locator(".verdict").inner_text() == newest["verdict"]
    # the station panel: ready, the model, counts that follow the line
    page.wait_for_function("document.querySelector('#state').textContent === 'ready'")
    assert page.locator("#model-name").inner_text() == "tiny"
    assert page.locator("#broker").inner_text().startswith("connected")
    counts = sum(int(page.locator(f"#n-{v}").inner_text()) for v in ("pass", "fail", "error"))
    assert counts >= len(shown)


def test_overlay_image_updates(station: Station, page: Any) -> None:
    page.goto(station.url + "/")
    image = 'article.camera[data-camera="cam0"] img.live'
    loaded = f"(() => {{ const i = document.querySelector('{image}'); "
    loaded += "return i && i.complete && i.naturalWidth > 0 ? i.src : null; })()"
    first = page.wait_for_function(loaded).json_value()
    # one look at a newer image that has loaded (the next one may replace it at any time)
    newer = f"(() => {{ const i = document.querySelector('{image}'); "
    newer += f"return i.complete && i.naturalWidth > 0 && i.src !== {json.dumps(first)} "
    newer += "? i.naturalWidth : null; })()"
    width = page.wait_for_function(newer).json_value()
    assert width == 128  # the camera's width: below view_width, so not scaled
    with urllib.request.urlopen(station.url + "/api/frame/cam0.jpg", timeout=5) as resp:
        assert resp.headers["Content-Type"] == "image/jpeg"
        assert resp.read(3) == b"\xff\xd8\xff"


def test_reject_gallery_opens_a_part(station: Station, page: Any) -> None:
    page.goto(station.url + "/")
    tile = page.locator("#gallery .reject").first
    tile.wait_for()
    stem = tile.get_attribute("data-stem") or ""
    # New rejects keep arriving and re-render the gallery: click the tile read, not "the first".
    page.locator(f'#gallery .reject[data-stem="{stem}"]').click()
    dialog = page.locator("dialog#part[open]")
    dialog.wait_for()
    assert dialog.get_attribute("data-stem") == stem
    archived = json.loads((station.config.archive.dir / "results" / f"{stem}.json").read_text())
    assert dialog.locator(".verdict").inner_text() == archived["verdict"]
    assert archived["verdict"] in ("fail", "error")
    assert dialog.get_attribute("data-result-id") == archived["result_id"]
    page.wait_for_function(
        "(() => { const i = document.querySelector('dialog#part img.overlay');"
        " return i.complete && i.naturalWidth > 0; })()"
    )
    assert dialog.locator("table.defects tbody tr").count() == len(archived["defects"])


def test_view_off_loopback_needs_its_token_and_never_shows_it(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    browser: Any,
) -> None:
    logs = io.StringIO()
    configure_logging("debug", "json", logs)  # every event, to look for the token in
    token_file = tmp_path_factory.mktemp("token") / "view.token"
    token_file.write_text(TOKEN + "\n")
    health = f'address = "0.0.0.0:0"\ntoken_file = "{token_file}"'
    station = _start(tmp_path_factory, tiny_model, health)()
    try:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(20_000)
        for path in ("/", "/api/station", "/api/live", "/api/rejects", "/api/frame/cam0.jpg"):
            response = page.goto(station.url + path)
            assert response is not None and response.status == 401, path
        assert page.goto(station.url + "/?token=wrong").status == 401  # type: ignore[union-attr]
        # probes and scrapers keep working without it
        with urllib.request.urlopen(station.url + "/metrics", timeout=5) as resp:
            assert resp.status == 200
        response = page.goto(station.url + f"/?token={TOKEN}")
        assert response is not None and response.status == 200
        assert page.url == station.url + "/"  # the token left the address bar
        page.wait_for_function(
            "document.querySelectorAll('article.camera ol.recent li').length >= 2"
        )
        page.locator("#gallery .reject").first.wait_for()
        assert TOKEN not in page.content()
        cookies = context.cookies()
        assert cookies and all(TOKEN not in c["value"] and c["httpOnly"] for c in cookies)
        request = urllib.request.Request(
            station.url + "/api/station", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert json.loads(resp.read())["station"] == "web"
        context.close()
    finally:
        station.close()
    text = logs.getvalue()
    assert "view_access_denied" in text
    assert TOKEN not in text
