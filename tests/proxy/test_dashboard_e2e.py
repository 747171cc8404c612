"""The dashboard end to end: the real gateway on loopback, the cookie flow over httpx, the page in a real
headless Chromium (Debian's ``chromium``, driven by its command line; CI installs it, so a missing browser
fails here rather than skipping)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from proxy.dashboard import COOKIE, read_view, session_token
from proxy.dashboard_render import word_diff
from proxy.events import STREAM_FIELD
from proxy.report import load_events, summarize
from tests.fakes.proxy_server import RunningProxy

from .conftest import StartProxy

ADMIN_KEY = "adm-dashboard-test-key-0123"
HOSTILE = "Say hi <script>document.title='pwned'</script> & <b>bold</b>"
PROMPTS = ["Suggest a name for a bakery", "Explain recursion briefly", HOSTILE]
BROWSER_TIMEOUT = 120


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "Debian's chromium is needed for the dashboard tests: apt-get install -y chromium"
    return path


def browse(url: str, profile: Path, *extra: str) -> str:
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={profile}", "--window-size=1400,1800", *extra, url],
        capture_output=True, timeout=BROWSER_TIMEOUT, check=True)
    return result.stdout.decode()


class Dom(HTMLParser):
    """The rendered DOM's element names and its text, as the browser serialized them."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture
def dashboard(start_proxy: StartProxy, tmp_path: Path) -> tuple[RunningProxy, Path]:
    events = tmp_path / "events.jsonl"
    proxy = start_proxy(admin_key=ADMIN_KEY, events=f"jsonl:{events}", events_include_text=True,
                        ab_treatment_percent=50, ab_salt="dash")
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=30)
    sent = 0
    for i in range(24):
        client.chat.completions.create(model="fake-model", user=f"user-{i}",
                                       messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        sent += 1
    deadline = time.monotonic() + 30
    while (not events.exists() or len(events.read_text().splitlines()) < sent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(events.read_text().splitlines()) == sent
    return proxy, events


def test_the_cookie_flow_never_shows_or_keeps_the_key(dashboard: tuple[RunningProxy, Path]) -> None:
    proxy, _ = dashboard
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        anonymous = http.get("/dashboard")
        assert anonymous.status_code == 401 and 'name="key"' in anonymous.text and 'id="arms"' not in anonymous.text
        assert http.get("/dashboard?key=wrong").status_code == 403
        assert http.post("/dashboard/login", data={"key": "wrong"}).status_code == 403

        signed_in = http.get("/dashboard", params={"key": ADMIN_KEY, "window": "1h"})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard?window=1h"
        cookie = signed_in.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and ADMIN_KEY not in cookie

        page = http.get("/dashboard?window=1h")
        assert page.status_code == 200 and 'id="arms"' in page.text and ADMIN_KEY not in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp

    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        posted = http.post("/dashboard/login", data={"key": ADMIN_KEY})
        assert posted.status_code == 303 and http.cookies[COOKIE] == session_token(ADMIN_KEY)
        assert http.get("/dashboard").status_code == 200
    bearer = httpx.get(proxy.url + "/dashboard", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert bearer.status_code == 200


def test_the_browser_shows_both_arms_the_same_numbers_and_prompts_as_text(
        dashboard: tuple[RunningProxy, Path], tmp_path: Path) -> None:
    proxy, events = dashboard
    locked = Dom(browse(proxy.url + "/dashboard", tmp_path / "anonymous", "--dump-dom"))
    assert "form" in locked.tags and "Sign in" in "".join(locked.text) and "table" not in locked.tags

    url = f"{proxy.url}/dashboard?key={ADMIN_KEY}&window=1h"
    html = browse(url, tmp_path / "admin", "--dump-dom")
    dom = Dom(html)
    text = " ".join(dom.text)
    assert ADMIN_KEY not in html
    assert "script" not in dom.tags  # the hostile prompt did not become an element
    assert "<script>document.title='pwned'</script>" in text  # ...it is shown as text
    assert "pwned" not in "".join(re.findall(r"<title>(.*?)</title>", html))

    report = summarize(load_events(str(events)), str(events))
    for arm in report.arms:  # the page's numbers are bpo ab report's numbers
        row = re.search(rf"<tr><td class=\"text\">{arm.arm}</td><td[^>]*>(\d+)</td>", html)
        assert row is not None and int(row.group(1)) == arm.requests
    assert {a.arm for a in report.arms} == {"treatment", "control"}
    assert html.count('class="rewrite"') == 24 and "<ins>" in html and "accepted" in text
    assert "control-arm" in text  # the control arm's prompts went out as written, with the reason

    filtered = Dom(browse(f"{proxy.url}/dashboard?key={ADMIN_KEY}&window=1h&arm=control", tmp_path / "filter",
                          "--dump-dom"))
    assert "accepted" not in " ".join(filtered.text) and "control-arm" in " ".join(filtered.text)

    screenshot = tmp_path / "dashboard.png"
    browse(url, tmp_path / "shot", f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000


def test_the_word_diff_marks_changed_words_and_escapes_them() -> None:
    before, after = word_diff("Write a poem <b>", "Write a short poem <b> please")
    assert before == "Write a poem &lt;b&gt;"
    assert after == "Write a <ins>short</ins> poem &lt;b&gt; <ins>please</ins>"
    assert word_diff("drop <i>this</i> word", "drop word")[0] == "drop <del>&lt;i&gt;this&lt;/i&gt;</del> word"


def test_a_redis_stream_read_over_a_window_with_filters() -> None:
    """Every replica reading one stream sees one picture; events older than the window are left out."""
    stream = f"bpo-dashboard-test-{uuid.uuid4().hex}"
    client = redis.Redis(host="127.0.0.1", port=6379)
    now = 1_800_000_000.0

    def request(arm: str, when: float, prompt: str) -> dict[str, Any]:
        return {"type": "request", "request_id": uuid.uuid4().hex, "time": when, "arm": arm, "status": 200,
                "applied": arm == "treatment", "reason": None if arm == "treatment" else "control-arm",
                "model": "m", "cache": "miss", "prompt": prompt, "optimized_prompt": prompt + " more"}

    events = [request("treatment", now - 60, "new t"), request("control", now - 30, "new c"),
              request("treatment", now - 7200, "old t")]
    try:
        for event in events:
            client.xadd(stream, {STREAM_FIELD: json.dumps(event).encode()})
        spec = f"redis://127.0.0.1:6379/0?stream={stream}"
        view = read_view(spec, "1h", {"arm": "treatment"}, include_text=True, now=now)
        assert view.report is not None and view.recent is not None
        assert {a.arm: a.requests for a in view.report.arms} == {"treatment": 1, "control": 1}
        assert [e["prompt"] for e in view.recent.rewrites] == ["new t"]
        assert view.recent.choices["arm"] == {"treatment", "control"}
        everything = read_view(spec, "all", {}, include_text=True, now=now)
        assert everything.report is not None and sum(a.requests for a in everything.report.arms) == 3
    finally:
        client.delete(stream)
        client.close()
    assert read_view("jsonl:/nonexistent/events.jsonl", "1h", {}, True).error is not None
