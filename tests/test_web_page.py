"""The chat page in a real browser: Debian's headless Chromium driven by selenium, against a live `herd serve` of the
default model behind an API key. A person's session, step by step: the key refused then given, a greedy answer
streamed equal to the API's (rendered as markdown-it renders it, with its token count and timings), regenerate,
stop, a server error, an attached image reaching the server as an image_url part, conversations kept across a
reload, and a console without errors. The page's Markdown renderer is checked against markdown-it on its own too.

HERD_SCREENSHOT=PATH (set by `make screenshots`) saves the page mid-conversation to PATH as a PNG."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test dependency (pip install -e .[test])")
MarkdownIt = pytest.importorskip("markdown_it", reason="markdown-it-py is a test dependency").MarkdownIt

from test_server import Server  # noqa: E402  (a `python -m herd serve` child on a free port)

KEY = "page-key-42"
SYSTEM = "You are a terse assistant."
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,860", "--lang=en-US"]
WAIT_S = 120  # one answer on a busy 2-core machine


def markdown_it(text: str) -> str:
    """The reference: markdown-it (CommonMark, raw HTML off, as the page) with GFM tables and strikethrough; the
    page writes HTML5 void tags (<br>, <hr>) where markdown-it writes XHTML (<br />)."""
    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    return md.render(text).replace(" />", ">")


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(smollm_gguf):
    s = Server(smollm_gguf, "--max-batch", "4", api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with its console and network logs, a fresh profile (the closed network refuses Chrome's own
    background connections, hence the flags)."""
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("Debian's chromium and chromium-driver are needed (apt-get install -y chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="herd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- helpers
def wait(driver, condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"the page did not {what} within {timeout} s; it shows: {state(driver)}")


def state(driver) -> dict:
    """What the page shows: the model name, the status line, and each message bubble."""
    return driver.execute_script("""
        const q = (s) => document.querySelector(s);
        return {model: q('#model').textContent, status: q('#status').textContent,
                busy: q('#send').disabled,
                conversations: [...document.querySelectorAll('#conversations li')].map(
                    (li) => ({title: li.querySelector('.open').textContent, active: li.className === 'active'})),
                bubbles: [...document.querySelectorAll('#log .msg')].map((d) => ({
                    role: d.querySelector('.role').textContent, error: d.classList.contains('error'),
                    text: d.querySelector('.body').innerText, html: d.querySelector('.body').innerHTML,
                    images: [...d.querySelectorAll('.images img')].map((i) => i.src),
                    stats: d.querySelector('.stats') ? {...d.querySelector('.stats').dataset,
                                                        text: d.querySelector('.stats').textContent} : null}))};
    """)


def open_page(driver, server, **settings) -> None:
    """A fresh page: no conversations, the given settings (system, temperature, max_tokens, apikey)."""
    driver.get(server.url + "/static/favicon.svg")  # the same origin, without the page's script running
    driver.execute_script("localStorage.clear(); localStorage.setItem('herd-chat', arguments[0]);",
                          json.dumps({k: str(v) for k, v in settings.items()}))
    driver.get(server.url + "/")
    wait(driver, lambda: state(driver)["model"] != "…", "ask the server for its model")


def idle(driver) -> dict:
    return wait(driver, lambda: (lambda s: not s["busy"] and s["status"] != "generating…" and s)(state(driver)),
                "finish the answer")


def send(driver, text: str) -> dict:
    from selenium.webdriver.common.keys import Keys

    n = len(state(driver)["bubbles"])
    box = driver.find_element("id", "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait(driver, lambda: len(state(driver)["bubbles"]) >= n + 2, "show the question and an answer bubble")
    return idle(driver)


def click(driver, element_id: str) -> None:
    driver.find_element("id", element_id).click()


def console_errors(driver) -> list[str]:
    """The console's errors since the last call (reading the log empties it)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def api(server, messages, max_tokens: int, key: str | None = KEY, **extra) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=WAIT_S,
                      json={"model": server.name, "messages": messages, "max_tokens": max_tokens, **extra})


def greedy(server, question: str, max_tokens: int, system: str | None = SYSTEM) -> dict:
    """The API's answer (message content and usage) to the same request the page makes, greedy."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    r = api(server, messages, max_tokens, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    return {"content": body["choices"][0]["message"]["content"], "tokens": body["usage"]["completion_tokens"]}


def stored(driver) -> dict:
    return json.loads(driver.execute_script("return localStorage.getItem('herd-conversations')"))


def as_shown(driver, html: str) -> str:
    """`html` as the browser holds it once parsed (its serialisation, e.g. `"` unescaped in text)."""
    return driver.execute_script("const d = document.createElement('div'); d.innerHTML = arguments[0]; "
                                 "return d.innerHTML", html)


def check_answer(driver, bubble: dict, want: dict) -> None:
    """An answer bubble shows the API's text rendered as markdown-it renders it, and measured stats."""
    assert bubble["role"] == "assistant" and not bubble["error"], bubble
    assert bubble["html"] == as_shown(driver, markdown_it(want["content"]))
    stats = bubble["stats"]
    assert int(stats["tokens"]) == want["tokens"]
    ttft, tps = float(stats["ttftMs"]), float(stats["tps"])
    assert 0 < ttft < WAIT_S * 1000 and tps > 0, stats
    assert f"{want['tokens']} tokens" in stats["text"] and "tokens/s" in stats["text"]
    assert "first token after" in stats["text"]


def png_bytes(w: int = 12, h: int = 8) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (w, h))
    img.putdata([(17 * x % 256, 29 * y % 256, 128) for y in range(h) for x in range(w)])
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def posted_bodies(driver, path: str) -> list[dict]:
    """The JSON bodies of the POSTs to `path` that the browser sent, from its DevTools network log."""
    bodies = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] != "Network.requestWillBeSent":
            continue
        req = msg["params"]["request"]
        if req["method"] != "POST" or not req["url"].endswith(path):
            continue
        data = req.get("postData")
        if data is None and req.get("hasPostData"):
            data = driver.execute_cdp_cmd("Network.getRequestPostData",
                                          {"requestId": msg["params"]["requestId"]})["postData"]
        bodies.append(json.loads(data))
    return bodies


# ------------------------------------------------------------------------------------------------- tests
MARKDOWN_CASES = [
    "# Title\n\nSome *em*, **strong**, ***both***, ~~gone~~ and `code <b>`; snake_case_name stays.",
    "Here is code:\n```js\nlet a = \"<script>alert(1)</script>\";\n```\nDone.",
    "```python\ndef f(x):\n\treturn x  # a tab\n```",
    "1. **Step one**: do this.\n2. **Step two**: do that.\n\nThen:\n\n- x\n  - nested\n- y\n\n3. three\n4. four",
    "- loose\n\n- items\n\n> quoted *text*\n> more\n\n---\n\nSetext\n===",
    "<img src=x onerror=alert(1)> [bad](javascript:alert(1)) [good](https://example.com/a?b=1&c=2 \"T\") "
    "<https://x.org>",
    "a\\*not em\\* and `` a`b `` line  \nbreak\n\n    indented code\n\n| x | y |\n| --- | ---: |\n| `a` | 2 |\n| 3 |",
    "```\nan unclosed fence, as while an answer streams",
    "Steps:\n- a list ends a paragraph\n- b\n\nbut 2. a number in text\n2. does not",
    "1. First\n   - nested\n   - more\n2. Second\n\n- ```\n  code in an item\n  ```\n-\n- after an empty item",
    "Intro\n| a | b |\n|---|:-:|\n| 1 | 2 |\n\n## A heading ##\n\n* star\n* list\n\n1) paren\n2) list",
    "```go\nfunc f() {\n\treturn\n}\n```\n\n~~~\n```not a close\n~~~",
]


def test_markdown_renderer_matches_markdown_it_and_escapes_html(browser, server):
    """The page's renderMarkdown gives markdown-it's HTML on headings, emphasis, code, lists (tight, loose, nested,
    numbered from 3), quotes, rules, tables, links, breaks; raw HTML and javascript: links stay text."""
    open_page(browser, server, apikey=KEY)
    got = browser.execute_script("return arguments[0].map(renderMarkdown)", MARKDOWN_CASES)
    for case, html in zip(MARKDOWN_CASES, got):
        assert html == markdown_it(case), case
    # Shown in the page, the hostile case makes no element beyond the fixed set and runs nothing.
    tags = browser.execute_script("""
        const d = document.createElement('div'); d.innerHTML = renderMarkdown(arguments[0]);
        return [...d.querySelectorAll('*')].map((e) => e.tagName + (e.getAttribute('href') ? ' ' + e.href : ''));
    """, MARKDOWN_CASES[5])
    assert tags == ["P", "A https://example.com/a?b=1&c=2", "A https://x.org/"]
    assert console_errors(browser) == []


def test_api_key_then_streamed_answer_equals_the_api_and_regenerates(browser, server):
    """Without the key the page says what the server said; with it the streamed greedy answer (system prompt
    included) equals the API's, with its token count; Regenerate gives it again. No console errors beyond the
    deliberate 401s."""
    open_page(browser, server, system=SYSTEM, temperature=0, max_tokens=12)
    s = state(browser)
    assert s["model"] == "(model unknown)" and "didn't provide an API key" in s["status"]
    s = send(browser, "What is 2+2?")
    assert s["bubbles"][0] == {**s["bubbles"][0], "role": "user", "text": "What is 2+2?"}
    assert s["bubbles"][1]["error"] and "didn't provide an API key" in s["bubbles"][1]["text"]
    errors = console_errors(browser)
    assert errors and all("/v1/" in e and "401" in e for e in errors), errors

    field = browser.find_element("id", "apikey")
    field.send_keys(KEY)
    browser.find_element("id", "input").click()  # the change event: the page asks for the model again
    wait(browser, lambda: state(browser)["model"] == server.name, "show the model name once the key is given")
    click(browser, "regen")  # asks again for the question that failed
    wait(browser, lambda: state(browser)["busy"], "start answering")
    s = idle(browser)
    want = greedy(server, "What is 2+2?", 12)
    assert [b["role"] for b in s["bubbles"]] == ["user", "assistant"]
    check_answer(browser, s["bubbles"][1], want)
    assert stored(browser)["list"][0]["messages"][1]["content"] == want["content"]

    click(browser, "regen")
    wait(browser, lambda: state(browser)["busy"], "start regenerating")
    s = idle(browser)
    assert len(s["bubbles"]) == 2
    check_answer(browser, s["bubbles"][1], want)
    assert console_errors(browser) == []


def test_markdown_answer_stop_error_image_and_reload(browser, server):
    """A code answer rendered as markdown-it renders the API's; a long answer stopped (the server's row freed); an
    impossible temperature shows the server's own message; an attached image goes out as an image_url data: URL and
    the default model's refusal is shown; after a reload the conversations are all there; the icon loads."""
    open_page(browser, server, temperature=0, max_tokens=60, apikey=KEY)
    question = "Show a Python hello world in a code block."
    s = send(browser, question)
    want = greedy(server, question, 60, system=None)
    check_answer(browser, s["bubbles"][1], want)
    assert "<pre><code" in s["bubbles"][1]["html"]
    first = stored(browser)["list"][0]

    # Stop: a long answer, stopped once some text has streamed; the part kept is marked stopped.
    click(browser, "clear")
    browser.execute_script("document.getElementById('max_tokens').value = '400'")
    box = browser.find_element("id", "input")
    box.send_keys("Write a very long story about a dragon.\n")
    wait(browser, lambda: len(state(browser)["bubbles"]) == 2 and len(state(browser)["bubbles"][1]["text"]) > 20,
         "stream the long answer")
    click(browser, "stop")
    s = idle(browser)
    assert s["status"] == "stopped" and "stopped" in s["bubbles"][1]["stats"]["text"]
    assert 20 < len(s["bubbles"][1]["text"]) < 2000
    deadline = time.monotonic() + 30
    while server.metric("herd_running_requests") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("herd_running_requests") == 0

    # A server error: the page sends what the person typed; the server's message is shown as it said it.
    browser.execute_script("document.getElementById('temperature').value = '-1'")
    s = send(browser, "Hello")
    r = api(server, [{"role": "user", "content": "x"}], 5, temperature=-1)
    assert r.status_code == 400
    assert s["bubbles"][-1]["error"] and s["bubbles"][-1]["text"] == "error: " + r.json()["error"]["message"]
    assert [e for e in console_errors(browser) if "status of 400" not in e] == []

    # An image: attached with the file picker, previewed, sent as an image_url part holding the file's bytes.
    browser.execute_script("document.getElementById('temperature').value = '0'")
    click(browser, "clear")
    image = png_bytes()
    path = Path(tempfile.mkdtemp(prefix="herd-page-")) / "picture.png"
    path.write_bytes(image)
    browser.get_log("performance")  # drop what came before
    browser.find_element("id", "file").send_keys(str(path))
    wait(browser, lambda: browser.execute_script("return document.querySelectorAll('#attachments img').length") == 1,
         "preview the attached image")
    s = send(browser, "What is in this picture?")
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    bodies = posted_bodies(browser, "/v1/chat/completions")
    assert len(bodies) == 1 and bodies[0]["messages"][-1] == {"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": url}}]}
    assert s["bubbles"][0]["images"] == [url]
    refusal = api(server, bodies[0]["messages"], 5).json()["error"]["message"]
    assert "takes no images" in refusal and s["bubbles"][-1]["text"] == "error: " + refusal
    assert [e for e in console_errors(browser) if "status of 400" not in e] == []

    # A reload keeps every conversation, newest first; opening the first shows its answer rendered again.
    browser.refresh()
    wait(browser, lambda: state(browser)["model"] == server.name, "load again")
    s = state(browser)
    assert [c["title"] for c in s["conversations"]] == ["What is in this picture?",
                                                        "Write a very long story about a dragon.", question]
    assert s["conversations"][0]["active"] and s["bubbles"][0]["images"] == [url]
    browser.find_elements("css selector", "#conversations .open")[2].click()
    s = state(browser)
    assert s["conversations"][2]["active"] and [b["text"] for b in s["bubbles"]][0] == question
    assert s["bubbles"][1]["html"] == as_shown(browser, markdown_it(want["content"]))
    assert s["bubbles"][1]["stats"]["tokens"] == str(want["tokens"])
    assert stored(browser)["list"][2]["messages"] == first["messages"]
    if os.environ.get("HERD_SCREENSHOT"):  # `make screenshots`: three conversations, the code answer open
        out = Path(os.environ["HERD_SCREENSHOT"])
        out.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out)), out
    browser.find_elements("css selector", "#conversations .delete")[1].click()
    assert [c["title"] for c in state(browser)["conversations"]] == ["What is in this picture?", question]

    icon = httpx.get(server.url + "/static/favicon.svg", timeout=10)  # open without the key, as the page is
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert browser.execute_script("return document.querySelector('link[rel=icon]').href") == str(icon.url)
    missing = httpx.get(server.url + "/static/app.py", timeout=10)
    assert missing.status_code == 404 and "favicon.svg" in missing.json()["error"]["message"]
    assert console_errors(browser) == []
