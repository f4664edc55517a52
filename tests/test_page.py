"""The web page in a real browser: Debian's headless Chromium driven by Playwright, against a
live server on the fast bundled model. Skipped, with the reason, where either is missing
(``scripts/test.sh`` installs both).

Screenshots of the chat and knowledge-base pages (zh and en) are written to
``$ZHIKU_SCREENSHOTS`` when it is set (docs/images holds the committed ones).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.state import ServerState
from settings import Settings
from tests.fixtures import make_chinese_pdf, make_malformed_pdf
from tests.live_server import LiveServer, serving_state

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/test.sh installs it)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium; scripts/test.sh does)")

POLICY_PAGES = [
    ["退货政策：商品签收后七天内可以无理由退货，运费由买家承担。", "质量问题退货的运费由商家承担。"],
    ["保修期为一年，自购买之日起计算。"],
]
XSS_TEXT = (
    "恶意文档 <script>window.__xss = 1</script> and <img src=x onerror=\"window.__xss = 2\"> "
    "with [a link](javascript:window.__xss=3) and <a href=\"javascript:window.__xss=4\">click</a>."
)
XSS_NAME = "<img src=x onerror=window.__xss=5>.txt"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def state(tmp_path_factory, models_dir, embedder):
    settings = Settings(home=tmp_path_factory.mktemp("page-home"), models_dir=models_dir, generator_max_batch_size=2, max_tokens_limit=2048)
    with serving_state(settings, embedder, {}) as state:
        yield state


@pytest.fixture(scope="module")
def server(state):
    with LiveServer.serving(state) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def page_for(browser):
    """``page_for(url, locale)``: a fresh browser page that records scripts run by untrusted text."""
    contexts = []

    def open_page(url: str, locale: str = "en-US"):
        context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.add_init_script("window.__xss = 0")
        page.alerts = []
        page.on("dialog", lambda d: d.accept() if d.type == "confirm" else (page.alerts.append(d.message), d.dismiss()))
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        return page

    yield open_page
    for context in contexts:
        context.close()


def screenshot(page, name: str) -> None:
    folder = os.environ.get("ZHIKU_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def wait_for_job(page, state: str = "done"):
    page.wait_for_selector(f".job[data-state={state}]")
    return page.locator(f".job[data-state={state}]").first


def test_the_page_is_served_with_a_strict_content_security_policy(server):
    response = httpx.get(server.url)
    policy = response.headers["content-security-policy"]
    assert response.status_code == 200 and "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy
    assert "http" not in response.text.split("<body>")[0].replace("http-equiv", "")  # no external asset
    assert httpx.get(f"{server.url}/static/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{server.url}/static/..%2Fjobs.py").status_code == 404


def test_knowledge_base_upload_search_chat_and_delete(server, state, page_for, tmp_path):
    good = make_chinese_pdf(tmp_path / "退货政策.pdf", pages=POLICY_PAGES)
    broken = make_malformed_pdf(tmp_path / "损坏.pdf")
    page = page_for(f"{server.url}/#kbs")
    page.fill("#new-kb-name", "手册")
    page.click("#create-kb button[type=submit]")
    page.wait_for_selector("#kb-title:has-text('手册')")
    page.set_input_files("#file-input", [str(good), str(broken)])
    job = wait_for_job(page)
    assert "1 of 2 files failed" in job.inner_text()
    files = page.locator(".job-files li")
    assert files.count() == 2
    assert "ingested" in page.locator(".job-files li:has-text('退货政策.pdf')").inner_text()
    failed = page.locator(".job-files li.file-failed").inner_text()
    assert "损坏.pdf" in failed and "malformed PDF" in failed
    rows = page.locator("#document-rows tr")
    page.wait_for_function("() => document.querySelectorAll('#document-rows tr').length === 2")
    assert "malformed PDF" in page.locator("#document-rows tr:has-text('损坏.pdf')").inner_text()

    page.fill("#search-query", "退货的运费谁承担？")
    page.click("#search-form button")
    page.wait_for_selector("#search-results li")
    first = page.locator("#search-results li").first.inner_text()
    assert "退货政策.pdf" in first and "运费" in first
    screenshot(page, "page-knowledge-base-en.png")

    page.click("#tab-chat")
    page.wait_for_function("() => document.querySelector('#kb-select').value === '手册'")
    page.fill("#prompt", "Who pays the shipping cost of a return?")
    page.click("#send")
    page.wait_for_selector("#stop", state="hidden")
    answer = page.locator(".message.assistant").last.inner_text()
    assert answer.strip() and "copy" in answer.lower()
    assert "退货政策.pdf" in page.locator("#source-list li").first.inner_text()
    assert page.evaluate("JSON.parse(localStorage.getItem('zhiku.conversations'))[0].messages.length") == 2
    screenshot(page, "page-chat-en.png")

    page.click("#tab-kbs")
    page.click("#kb-rows tr:has-text('手册') button:has-text('Open')")
    page.click("#document-rows tr:has-text('损坏.pdf') button:has-text('Delete')")
    page.wait_for_function("() => document.querySelectorAll('#document-rows tr').length === 1")
    assert [d.path.rsplit("/", 1)[-1] for d in state.knowledge_bases.documents("手册")] == ["退货政策.pdf"]
    assert page.alerts == []


def test_a_citation_opens_its_passage(server, page_for):
    page = page_for(server.url)
    conversation = {
        "id": "1", "title": "t",
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "Returns are free within 7 days [2].", "sources": [
                {"index": 1, "source": "a.txt", "page": None, "pages": [], "score": 0.5, "text": "first passage"},
                {"index": 2, "source": "policy.pdf", "page": 3, "pages": [3], "score": 0.8, "text": "seven days"},
            ]},
        ],
    }
    page.evaluate("c => localStorage.setItem('zhiku.conversations', JSON.stringify([c]))", conversation)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click(".message.assistant .cite")
    highlighted = page.locator("#source-list li.highlight")
    assert highlighted.count() == 1 and "policy.pdf · page 3" in highlighted.inner_text()


def test_stop_cancels_the_generation_on_the_server(server, page_for):
    page = page_for(server.url)
    page.select_option("#kb-select", "")
    page.click(".settings summary")
    page.fill("#max-tokens", "2000")
    page.fill("#temperature", "1")
    page.fill("#prompt", "Write a very long story about a lighthouse, chapter by chapter.")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('.message.assistant:last-child .body').innerText.length > 20")
    assert httpx.get(f"{server.url}/ready").json()["generator"]["running"] == 1
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    assert "(stopped)" in page.locator(".message.assistant").last.inner_text()
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/ready").json()["generator"]["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{server.url}/ready").json()["generator"]["running"] == 0


def test_untrusted_text_renders_inert(server, page_for, tmp_path):
    api = f"{server.url}/v1/knowledge_bases"
    httpx.post(api, json={"name": "xss"}).raise_for_status()
    files = [("files", (XSS_NAME, XSS_TEXT.encode(), "text/plain"))]
    assert httpx.post(f"{api}/xss/documents", params={"wait": "true"}, files=files, timeout=120).json()["failed"] == 0
    page = page_for(f"{server.url}/#kbs")
    page.click("#kb-rows tr:has-text('xss') button:has-text('Open')")
    page.wait_for_selector("#document-rows tr:has-text('onerror')")
    page.fill("#search-query", "恶意文档")
    page.click("#search-form button")
    page.wait_for_selector("#search-results li:has-text('window.__xss = 1')")
    # model output, as the chat renders it: Markdown of text that tries every trick
    conversation = {"id": "x", "title": XSS_NAME, "messages": [
        {"role": "user", "content": XSS_TEXT},
        {"role": "assistant", "content": XSS_TEXT + "\n\n```\n<script>window.__xss=6</script>\n```",
         "sources": [{"index": 1, "source": XSS_NAME, "page": None, "pages": [], "score": 1, "text": XSS_TEXT}]},
    ]}
    page.evaluate("c => localStorage.setItem('zhiku.conversations', JSON.stringify([c]))", conversation)
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector(".message.assistant:has-text('window.__xss = 1')")
    page.wait_for_timeout(500)  # an image's onerror would have fired by now
    assert page.evaluate("window.__xss") == 0
    assert page.locator("#messages img, #source-list img, #search-results img, #conversation-list img").count() == 0
    assert page.locator("#messages script").count() == 0
    assert page.locator("a[href^='javascript']").count() == 0
    assert page.alerts == []


@pytest.fixture(scope="module")
def keyed_server(state):
    settings = state.settings.model_copy(update={"api_keys": ["user-key"], "admin_api_keys": ["admin-key"]})
    with LiveServer(create_app(settings, state=ServerState(**{**state.__dict__, "settings": settings}))) as live:
        yield live


def test_the_page_asks_for_a_key_and_hides_admin_actions_from_a_plain_key(keyed_server, page_for):
    page = page_for(f"{keyed_server.url}/#kbs")
    assert page.locator("#key-dialog").is_visible()
    page.fill("#key-input", "wrong")
    page.click("#key-form button")
    page.wait_for_selector("#key-error:has-text('invalid key')")
    page.fill("#key-input", "user-key")
    page.click("#key-form button")
    page.wait_for_selector("#key-dialog", state="hidden")
    page.wait_for_selector("#kb-rows tr:has-text('手册')")
    assert not page.locator("#create-kb").is_visible()
    assert page.locator("#kb-rows button:has-text('Delete')").count() == 0
    page.click("#kb-rows tr:has-text('手册') button:has-text('Open')")
    assert not page.locator("#drop-zone").is_visible()  # a plain key may not upload
    page.click("#tab-chat")
    page.wait_for_function("() => [...document.querySelectorAll('#kb-select option')].some(o => o.value === '手册')")

    admin = page_for(f"{keyed_server.url}/#kbs")
    admin.fill("#key-input", "admin-key")
    admin.click("#key-form button")
    admin.wait_for_selector("#kb-rows tr:has-text('手册') button:has-text('Delete')")
    assert admin.locator("#create-kb").is_visible()


def test_the_interface_follows_the_browser_language_and_switches(server, page_for):
    page = page_for(server.url, locale="zh-CN")
    assert page.locator("#tab-chat").inner_text() == "对话" and page.locator("#send").inner_text() == "发送"
    screenshot(page, "page-chat-zh.png")
    page.click("#tab-kbs")
    page.wait_for_selector("#kb-rows tr")
    page.click("#kb-rows tr:has-text('手册') button:has-text('打开')")
    page.wait_for_selector("#document-rows tr:has-text('退货政策.pdf')")
    screenshot(page, "page-knowledge-base-zh.png")
    page.click("#lang-button")
    assert page.locator("#tab-chat").inner_text() == "Chat"
    assert page.evaluate("document.documentElement.lang") == "en"


@pytest.fixture(scope="module")
def small_limit_server(state):
    settings = state.settings.model_copy(update={"max_upload_bytes": 100_000})
    with LiveServer(create_app(settings, state=ServerState(**{**state.__dict__, "settings": settings}))) as live:
        yield live


def test_a_big_selection_goes_up_in_requests_under_the_limit_and_one_oversized_file_fails_alone(small_limit_server, page_for, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"条例-{i}.txt")
        paths[-1].write_text(f"第{i}号条例：设备每月检修一次。\n" * 1200, encoding="utf-8")  # ~54 KB each
    oversized = tmp_path / "巨大.txt"
    oversized.write_text("过大的文件。\n" * 10_000, encoding="utf-8")  # ~180 KB: over the limit alone
    page = page_for(f"{small_limit_server.url}/#kbs")
    page.fill("#new-kb-name", "分批")
    page.click("#create-kb button[type=submit]")
    page.wait_for_selector("#kb-title:has-text('分批')")
    page.set_input_files("#file-input", [str(p) for p in [*paths, oversized]])
    try:
        page.wait_for_function("() => document.querySelectorAll('.job[data-state=done]').length === 3", timeout=30_000)
    except Exception:
        print(page.locator("#jobs").inner_text()); raise
    refused = page.locator(".job[data-state=failed]")
    assert refused.count() == 1 and "100000" in refused.inner_text()
    page.wait_for_function("() => document.querySelectorAll('#document-rows tr').length === 3")
    assert "巨大.txt" not in page.locator("#document-rows").inner_text()
