"""The live page in a real headless browser (Debian's chromium + chromium-driver, installed by
``make test``): a device connected to the real ingest moves, and the page shows it moving.

Selenium is blocking, so every browser call runs in a thread; the reactor keeps serving
the page, the feed and the device. The screenshot is written to the test's tmp dir and to
``artefacts/live-page.png`` at the repository root (git-ignored).
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from twisted.internet import reactor, threads

from teltonika_ingest.codec import AvlPacket, encode_avl_frame

from device import wait_for
from livefeed import IMEI_A, IMEI_B, IMEI_C, Snapshots, record, start_live
from redisproc import RedisProcess
from test_service_integration import start

pytestmark = pytest.mark.integration

ARTEFACTS = Path(__file__).resolve().parent.parent / "artefacts"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "chromium and chromium-driver: run `make browser`"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=ChromeService(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


PAGE_STATE = """
const d = window.__live && window.__live.devices.get(arguments[0]);
if (!d || !d.last) return null;
const p = window.__live.project;
const xy = p && d.trail.length ? p(d.trail[d.trail.length - 1]) : null;
let pixel = null;
if (xy) {
  const c = document.getElementById('canvas'), r = window.devicePixelRatio || 1;
  const x = Math.round(xy[0] * r), y = Math.round(xy[1] * r);
  pixel = Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data);
}
const row = document.querySelector('tr[data-imei="' + arguments[0] + '"]');
return {ts: d.last.ts, trail: d.trail.length, xy: xy, pixel: pixel,
        row: row ? row.innerText : null,
        status: document.getElementById('status').dataset.state};
"""


async def page_state(driver: webdriver.Chrome, imei: str) -> dict[str, Any] | None:
    result: dict[str, Any] | None = await in_thread(driver.execute_script, PAGE_STATE, imei)
    return result


@pytest_twisted.ensureDeferred
async def test_a_moving_device_moves_on_the_page(
    browser: webdriver.Chrome, redis_session: RedisProcess, tmp_path: Path
) -> None:
    ingest = await start(redis_session, tmp_path)
    no_fix = {
        "device_id": IMEI_C, "ts": "2026-12-01T09:00:00.000Z", "received_at": None,
        "longitude": 0.0, "latitude": 0.0, "speed": 0, "gps_valid": False, "time_valid": True,
    }  # fmt: skip
    live = await start_live(
        redis_session, tmp_path, tokens={"page-token": "*"}, snapshot=Snapshots({IMEI_C: no_fix})
    )
    try:
        await in_thread(browser.get, f"http://127.0.0.1:{live.port}/?token=page-token")
        await wait_for(lambda: live.sample("processor_live_subscriptions") == 1, timeout=15)

        moving = await ingest.device(IMEI_A)
        parked = await ingest.device(IMEI_B)
        parked.send(encode_avl_frame(AvlPacket("8E", (record(0, lon=25.30, lat=54.70, speed=0),))))
        assert await parked.expect(4) == struct.pack(">I", 1)

        seen: list[dict[str, Any]] = []
        for i in range(1, 9):
            # north-east, one step a packet (record() moves 1e-4 deg lon, 5e-5 lat per i)
            rec = record(i * 10, lon=25.28, lat=54.68, speed=30 + i)
            moving.send(encode_avl_frame(AvlPacket("8E", (rec,))))
            assert await moving.expect(4) == struct.pack(">I", 1)
            ts_text = f"{rec.timestamp_ms}"

            async def shown(ts_ms: str = ts_text) -> bool:
                state = await page_state(browser, IMEI_A)
                if state is None:
                    return False
                seen.append(state)
                return bool(state["ts"]) and _ms(state["ts"]) == int(ts_ms)

            await wait_for(shown, timeout=10)

        # the earliest state the page had drawn (the projection exists from the first frame on)
        first = next(state for state in seen if state.get("xy"))

        async def drawn() -> bool:  # the next animation frame has drawn the newest state
            state = await page_state(browser, IMEI_A)
            seen.append(state or {})
            return bool(state and state["pixel"] and state["pixel"][3] == 255)

        await wait_for(drawn, timeout=10)
        last = seen[-1]
        assert last["status"] == "connected"
        assert last["trail"] >= 8 and first["trail"] < last["trail"]  # the trail: every step
        assert last["xy"][0] > first["xy"][0] and last["xy"][1] < first["xy"][1]  # NE on screen
        assert last["pixel"][:3] != [15, 20, 25]  # the dot, not the background
        assert IMEI_A in last["row"] and "38" in last["row"]  # speed of the last step
        assert "gps" in last["row"] and "✗" not in last["row"]  # the ingest's quality flags
        other = await page_state(browser, IMEI_B)
        assert other is not None and other["trail"] == 1
        # quality flags, from the snapshot row of a device without a GPS fix
        flagged = await page_state(browser, IMEI_C)
        assert flagged is not None and "gps ✗" in flagged["row"] and "time" in flagged["row"]
        assert flagged["trail"] == 0  # no fix: listed, not drawn

        png = await in_thread(browser.get_screenshot_as_png)
        (tmp_path / "live-page.png").write_bytes(png)
        ARTEFACTS.mkdir(exist_ok=True)
        (ARTEFACTS / "live-page.png").write_bytes(png)
    finally:
        await live.stop()
        await ingest.svc.stopService()


def _ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
