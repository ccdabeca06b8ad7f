"""The try-it page at `/`, rendered by headless Debian chromium against a real server (tiny random BERT)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
TEXT = "the movie was great"


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    # --virtual-time-budget: keep the page running (its fetches included) before dumping or capturing.
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--virtual-time-budget=15000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def server(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"Debian chromium not found at {CHROMIUM} (apt-get install chromium) -- the page is not rendered")
    pytest.importorskip("uvicorn")
    from serve_helpers import RunningServer

    from peftlab.serve.app import create_app

    root = tmp_path_factory.mktemp("page_adapters")
    for seed, (name, method) in enumerate({"lora": "lora", "ia3": "ia3", "prompt": "prompt_tuning"}.items()):
        make_adapter(tiny_bert, root / name, method, seed=seed)
    with RunningServer(create_app(str(tiny_bert), root, eager=True)) as running:
        yield running


def test_page_renders_every_adapter_side_by_side(server: Any, tmp_path: Path) -> None:
    url = f"{server.url}/?text={urllib.parse.quote(TEXT)}&run=1"
    dom = chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-state="done"' in dom.stdout, dom.stdout[-3000:]
    for name in ("lora", "ia3", "prompt"):
        assert f'data-adapter="{name}"' in dom.stdout  # one card with bars per adapter
    assert dom.stdout.count('class="fill"') >= 9  # 3 adapters x 3 classes

    screenshot = tmp_path / "page.png"
    shot = chromium(f"--screenshot={screenshot}", "--window-size=1200,900", url)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 900)
    assert len(data) > 20_000  # rendered content, not a blank page


def test_docs_render_offline(server: Any) -> None:
    # Swagger UI's script and CSS come from this server (swagger-ui-bundle-v2), not a CDN: it renders here,
    # where no CDN is reachable. The operations appear only once the script ran and read /openapi.json.
    dom = chromium("--dump-dom", f"{server.url}/docs")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'class="swagger-ui' in dom.stdout and "/v1/classify" in dom.stdout, dom.stdout[-3000:]
    assert "/v1/adapters/{name}/load" in dom.stdout


KEY = "page-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_server(server: Any, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from serve_helpers import RunningServer

    from peftlab.serve.app import create_app

    root = tmp_path_factory.mktemp("keyed_adapters")
    make_adapter(tiny_bert, root / "lora", "lora", seed=0)
    with RunningServer(create_app(str(tiny_bert), root, eager=True, api_key=KEY)) as running:
        yield running


def test_page_sends_the_api_key_from_the_fragment(keyed_server: Any) -> None:
    url = f"{keyed_server.url}/?text={urllib.parse.quote(TEXT)}&run=1"
    dom = chromium("--dump-dom", url + f"#key={KEY}")  # a fragment never reaches the server or its log
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-state="done"' in dom.stdout and 'data-adapter="lora"' in dom.stdout, dom.stdout[-3000:]
    dom = chromium("--dump-dom", url)  # no key: the page says why instead of showing results
    assert 'data-state="error"' in dom.stdout and "unauthorized" in dom.stdout, dom.stdout[-3000:]
