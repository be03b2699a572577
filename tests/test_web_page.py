"""The token explorer at ``/`` and the offline ``/docs``, in a real browser: headless Chromium (Debian's
``chromium`` and ``chromium-driver``) driven by Selenium against a real ``vqtok serve`` process with the
bundled model (f=4, K=512).

Chromium runs with its background traffic off (component updates, sync, pings, ...) and a host resolver
that can only reach 127.0.0.1; the DevTools network log of the page itself is checked for any request
to another host. Screenshots go to ``$VQTOK_TEST_ARTIFACTS`` (default: pytest's temporary folder).
Skipped, with the reason, where no Chromium or chromedriver is installed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.processes import free_port, wait_until_ready

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:  # pragma: no cover - the dev extra installs it
    HAVE_SELENIUM = False
else:
    HAVE_SELENIUM = True

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None or not HAVE_SELENIUM,
        reason="browser tests need Chromium and chromedriver (Debian: apt-get install chromium chromium-driver) "
        "and selenium (the dev extra)",
    ),
]

API_KEY = "test-key-0123"
WAIT_S = 60.0
# Flags that keep Chromium to the page's own traffic.
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
    "--disable-client-side-phishing-detection", "--disable-breakpad", "--no-pings", "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,InterestFeedContentSuggestions",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--force-device-scale-factor=1",
)


def _artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("VQTOK_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("web-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _serve(port: int, *flags: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VQTOK_LOG_LEVEL": "warning"}
    for name in ("VQTOK_CHECKPOINT", "VQTOK_PORT", "PORT", "VQTOK_API_KEY"):
        env.pop(name, None)
    command = [sys.executable, "-m", "vqtok.service", "--device", "cpu", "--port", str(port), "--no-warmup", *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """Two real ``vqtok serve`` processes with the bundled model: one open, one with an API key."""
    open_port, key_port = free_port(), free_port()
    processes = [_serve(open_port), _serve(key_port, "--api-key", API_KEY)]
    try:
        wait_until_ready(processes[0], open_port)
        wait_until_ready(processes[1], key_port)  # /ready is public with a key too
        yield {"open": f"http://127.0.0.1:{open_port}", "key": f"http://127.0.0.1:{key_port}"}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.communicate(timeout=60)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1200,1400")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    downloads = tmp_path_factory.mktemp("downloads")
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory, coffee: np.ndarray) -> Path:
    """A real photo as a JPEG file (600x400, scikit-image's coffee)."""
    path = tmp_path_factory.mktemp("photo") / "coffee.jpg"
    Image.fromarray(coffee).save(path, format="JPEG", quality=92)
    return path


# ------------------------------------------------------------------------------------------------ helpers


def wait(driver: object, script: str, timeout: float = WAIT_S) -> object:
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({script});")  # type: ignore[attr-defined]
        if value:
            return value
        if time.monotonic() > deadline:
            errors = driver.execute_script("return document.getElementById('error')?.textContent")  # type: ignore[attr-defined]
            raise AssertionError(f"timed out waiting for {script!r}; page error: {errors!r}")
        time.sleep(0.05)


def canvas_pixels(driver: object, canvas_id: str) -> np.ndarray:
    url = driver.execute_script(  # type: ignore[attr-defined]
        "return document.getElementById(arguments[0]).toDataURL('image/png')", canvas_id)
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def figure(driver: object, name: str) -> str:
    return driver.execute_script(  # type: ignore[attr-defined]
        "return document.getElementById(arguments[0]).dataset.value", f"fig-{name}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * np.log10(255.0**2 / max(mse, 1e-12))


def page_requests(driver: object) -> list[dict[str, object]]:
    """The page's own requests since the last call (DevTools ``Network.requestWillBeSent``)."""
    requests = []
    for entry in driver.get_log("performance"):  # type: ignore[attr-defined]
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requests.append(message["params"]["request"])
    return requests


def assert_local_only(requests: list[dict[str, object]], base: str) -> None:
    host = urlparse(base).netloc
    for request in requests:
        url = str(request["url"])
        scheme = urlparse(url).scheme
        assert scheme in ("data", "blob") or urlparse(url).netloc == host, f"request left the server: {url}"


def console_errors(driver: object) -> list[dict[str, object]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]  # type: ignore[attr-defined]


def open_page(driver: object, base: str) -> None:
    driver.get_log("performance")  # type: ignore[attr-defined]  # drop what came before
    driver.get_log("browser")  # type: ignore[attr-defined]
    driver.get(f"{base}/")  # type: ignore[attr-defined]


def api_encode(base: str, path: Path, **options: str) -> dict[str, object]:
    with path.open("rb") as file:
        answer = httpx.post(f"{base}/encode", files={"image": (path.name, file, "image/jpeg")}, data=options,
                            timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def api_decode_png(base: str, indices: np.ndarray) -> np.ndarray:
    answer = httpx.post(f"{base}/decode", json={"indices": indices.tolist()}, timeout=60)
    assert answer.status_code == 200, answer.text
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))


# ------------------------------------------------------------------------------------------------ tests


def test_upload_shows_images_figures_hover_and_downloads(servers, browser, photo, artifacts) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    base = servers["open"]
    open_page(browser, base)
    wait(browser, "document.body.dataset.ready === 'true'")
    browser.find_element(By.ID, "size").clear()
    browser.find_element(By.ID, "size").send_keys("128")
    browser.find_element(By.ID, "file-input").send_keys(str(photo))
    wait(browser, "document.getElementById('reconstruction').dataset.decodes === '1'")

    # the figures are the API's
    api = api_encode(base, photo, size="128", fit="crop", layout="flat")
    image = api["images"][0]
    indices = np.asarray(image["indices"])
    assert figure(browser, "grid") == "32,32" == ",".join(map(str, image["grid"]))
    assert figure(browser, "tokens") == str(indices.size)
    assert float(figure(browser, "bits")) == 9.0  # log2(512)
    assert figure(browser, "distinct") == str(len(np.unique(indices)))
    assert float(figure(browser, "encode-time")) > 0 and float(figure(browser, "decode-time")) > 0

    # three images: the original as encoded, the API's reconstruction of the API's indices, the token map
    original, reconstruction = canvas_pixels(browser, "original"), canvas_pixels(browser, "reconstruction")
    token_map = canvas_pixels(browser, "token-map")
    assert original.shape == reconstruction.shape == (128, 128, 3) and token_map.shape == (32, 32, 3)
    assert original.std() > 20 and reconstruction.std() > 20 and token_map.std() > 20
    assert np.abs(reconstruction.astype(int) - api_decode_png(base, indices).astype(int)).max() <= 1
    same_code = indices == indices[0, 0]  # one code, one colour
    assert (token_map[same_code] == token_map[0, 0]).all()
    assert abs(float(figure(browser, "psnr")) - psnr(original, reconstruction)) < 0.01
    pillow_fit = np.asarray(Image.open(photo).convert("RGB").resize((192, 128), Image.Resampling.LANCZOS))[:, 32:160]
    assert abs(psnr(pillow_fit, reconstruction) - float(figure(browser, "psnr"))) < 1.5  # the page fits as vqtok does

    # hover a token-map cell: row, column, code and token id
    token_map_element = browser.find_element(By.ID, "token-map")
    width, height = token_map_element.size["width"], token_map_element.size["height"]
    row, col = 5, 21
    ActionChains(browser).move_to_element_with_offset(
        token_map_element, int((col + 0.5) * width / 32 - width / 2), int((row + 0.5) * height / 32 - height / 2)
    ).perform()
    hover = browser.find_element(By.ID, "hover-info")
    assert (hover.get_attribute("data-row"), hover.get_attribute("data-col")) == (str(row), str(col))
    assert hover.get_attribute("data-code") == str(indices[row, col])
    assert f"row {row}, column {col}: code {indices[row, col]}" in hover.text
    assert f"token id {image['tokens'][row * 32 + col]} at position {row * 32 + col} in flat" in hover.text

    # downloads: a replayable /decode body, the (1, h, w) int64 array, the PNG
    for button in ("download-json", "download-npy", "download-png"):
        browser.find_element(By.ID, button).click()
    names = ("vqtok-tokens.json", "vqtok-indices.npy", "vqtok-reconstruction.png")
    deadline = time.monotonic() + 20
    while not all((browser.downloads / n).exists() for n in names) and time.monotonic() < deadline:
        time.sleep(0.1)
    body = json.loads((browser.downloads / "vqtok-tokens.json").read_text())
    assert body["indices"] == image["indices"] and body["crop_to"] == image["content_size"]
    assert httpx.post(f"{base}/decode", json=body, timeout=60).status_code == 200
    array = np.load(browser.downloads / "vqtok-indices.npy", allow_pickle=False)
    assert array.dtype == np.int64 and array.shape == (1, 32, 32) and (array[0] == indices).all()
    png = np.asarray(Image.open(browser.downloads / "vqtok-reconstruction.png").convert("RGB"))
    assert (png == reconstruction).all()

    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(artifacts / "token-explorer.png"))
    assert console_errors(browser) == []
    assert_local_only(page_requests(browser), base)


def test_an_edited_region_changes_the_reconstruction_only_there(servers, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base = servers["open"]
    assert browser.execute_script("return document.getElementById('reconstruction').dataset.decodes") == "1"
    before = canvas_pixels(browser, "reconstruction")
    grid_before = canvas_pixels(browser, "token-map")
    # keyboard: cursor to row 12, column 10, then extend the selection to row 15, column 13
    token_map = browser.find_element(By.ID, "token-map")
    token_map.click()
    browser.execute_script("arguments[0].focus()", token_map)
    token_map.send_keys(*([Keys.ARROW_UP] * 40 + [Keys.ARROW_LEFT] * 40))  # to (0, 0)
    token_map.send_keys(*([Keys.ARROW_DOWN] * 12 + [Keys.ARROW_RIGHT] * 10))
    token_map.send_keys(Keys.SHIFT, *([Keys.ARROW_DOWN] * 3 + [Keys.ARROW_RIGHT] * 3))
    assert "rows 12–15, columns 10–13 (16 cells)" in browser.find_element(By.ID, "selection-info").text
    code = browser.find_element(By.ID, "edit-code")
    code.clear()
    code.send_keys("7")
    browser.find_element(By.ID, "fill-button").click()
    browser.find_element(By.ID, "decode-button").click()
    wait(browser, "document.getElementById('reconstruction').dataset.decodes === '2'")
    after = canvas_pixels(browser, "reconstruction")
    grid_after = canvas_pixels(browser, "token-map")

    edited = np.zeros((32, 32), dtype=bool)
    edited[12:16, 10:14] = True
    changed_cells = (grid_before != grid_after).any(axis=-1)
    assert not changed_cells[~edited].any()  # the map changed only in the selection
    diff = np.abs(after.astype(int) - before.astype(int)).max(axis=-1)  # (128, 128)
    margin = 3  # cells: the f=4 decoder's receptive field reaches this far
    near = np.zeros((128, 128), dtype=bool)
    near[(12 - margin) * 4:(16 + margin) * 4, (10 - margin) * 4:(14 + margin) * 4] = True
    assert diff[~near].max() <= 1, f"pixels changed outside the region: {np.argwhere(diff * ~near > 1)[:5]}"
    assert diff[48:64, 40:56].mean() > 10  # and the region itself changed
    assert figure(browser, "distinct")  # figures updated with the edited grid
    assert "edited" in browser.find_element(By.ID, "recon-note").text
    assert console_errors(browser) == []
    assert_local_only(page_requests(browser), base)


def test_pasted_tokens_are_decoded_leniently_with_the_repairs_shown(servers, browser) -> None:
    from selenium.webdriver.common.by import By

    base = servers["open"]
    browser.find_element(By.ID, "paste-fill").click()
    area = browser.find_element(By.ID, "paste-tokens")
    tokens = [int(t) for t in area.get_attribute("value").split()]
    assert len(tokens) == 32 * 32
    cut = tokens[:-40]  # an LLM that stopped early
    browser.execute_script("arguments[0].value = arguments[1]", area, json.dumps(cut))
    browser.find_element(By.ID, "paste-decode").click()
    count = int(wait(browser, "document.getElementById('paste-summary').dataset.repairs"))
    api = httpx.post(f"{base}/decode", json={"tokens": cut, "layout": "flat", "grid": [32, 32], "repair": "lenient"},
                     headers={"accept": "application/json"}, timeout=60).json()
    repairs = api["images"][0]["repairs"]
    assert count == len(repairs) >= 1
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#paste-repairs li")]
    assert items == [f"position {r['position']}: {r['kind']}: {r['detail']}" for r in repairs]
    assert any("cut_short" in item for item in items)
    assert browser.execute_script("return document.getElementById('paste-image').naturalWidth") == 128
    assert console_errors(browser) == []
    assert_local_only(page_requests(browser), base)


def test_phone_width_has_no_horizontal_overflow(servers, browser, artifacts) -> None:
    browser.set_window_size(390, 900)
    try:
        browser.execute_script("document.getElementById('paste-result').hidden = false")
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
        inner = browser.execute_script("return window.innerWidth")
        assert inner <= 420
        browser.save_screenshot(str(artifacts / "token-explorer-phone.png"))
    finally:
        browser.set_window_size(1200, 1400)


def test_with_an_api_key_the_page_asks_for_it_and_sends_it(servers, browser) -> None:
    from selenium.webdriver.common.by import By

    base = servers["key"]
    for path in ("/", "/web/explorer.js", "/web/samples/coffee.jpg", "/docs"):
        assert httpx.get(base + path, timeout=10).status_code == 200  # public pages and assets
    open_page(browser, base)
    form = browser.find_element(By.ID, "key-form")
    wait(browser, "!document.getElementById('key-form').hidden")
    field = browser.find_element(By.ID, "api-key")
    assert browser.execute_script("return document.activeElement.id") == "api-key"
    assert field.get_attribute("type") == "password"
    field.send_keys("wrong")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser, "document.getElementById('key-error').textContent.includes('wrong API key')")
    field.send_keys(API_KEY)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser, "document.body.dataset.ready === 'true'")
    assert not form.is_displayed()
    browser.find_element(By.CSS_SELECTOR, 'button[data-sample="chelsea"]').click()
    wait(browser, "document.getElementById('reconstruction').dataset.decodes === '1'")
    # drag and drop: a file dropped on the drop zone is encoded like a picked one
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('web/samples/coffee.jpg').then((r) => r.blob()).then((blob) => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([blob], 'dropped.jpg', { type: 'image/jpeg' }));
          const zone = document.getElementById('drop-zone');
          zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: transfer, bubbles: true, cancelable: true }));
          zone.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
          done();
        });
    """)
    wait(browser, "document.getElementById('reconstruction').dataset.decodes === '2'")
    assert figure(browser, "grid") == "32,32"
    requests = page_requests(browser)
    assert_local_only(requests, base)
    api_calls = [r for r in requests if urlparse(str(r["url"])).path in ("/encode", "/decode", "/codebook", "/layouts")]
    assert {urlparse(str(r["url"])).path for r in api_calls} == {"/encode", "/decode", "/codebook", "/layouts"}
    for request in api_calls:
        headers = {k.lower(): v for k, v in dict(request["headers"]).items()}  # type: ignore[call-overload]
        assert headers.get("authorization") == f"Bearer {API_KEY}", request["url"]
    # in memory only: nothing stored, nothing in the URL
    stored = browser.execute_script(
        "return JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie + location.href")
    assert API_KEY not in stored
    # only the expected 401s of the unkeyed and wrong-key /info calls were logged
    errors = console_errors(browser)
    assert all("401" in str(e["message"]) for e in errors), errors


def test_the_offline_docs_render_their_operations(servers, browser, artifacts) -> None:
    base = servers["open"]
    open_page(browser, base)  # clears the logs
    browser.get(f"{base}/docs")
    operations = int(wait(browser, "document.querySelectorAll('.swagger-ui .opblock').length"))
    assert operations >= 9  # encode, decode, codebook, info, layouts x2, health, ready, metrics
    text = browser.find_element("css selector", ".swagger-ui").text
    assert "/encode" in text and "/metrics" in text
    browser.save_screenshot(str(artifacts / "docs.png"))
    browser.get(f"{base}/redoc")
    wait(browser, "document.querySelector('.redoc-wrap') && document.body.innerText.includes('/encode')")
    assert console_errors(browser) == []
    assert_local_only(page_requests(browser), base)
