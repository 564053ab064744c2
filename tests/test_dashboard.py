"""The live dashboard and the offline API docs, in a real headless Chromium (Debian's, driven by
Playwright), against a real server on loopback; the data endpoints' scopes over plain HTTP.

Screenshots go to ``build/test-output/`` (or ``$PROMPTCACHE_TEST_OUTPUT``)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from test_server_harness import KEYS, MODEL, Server, nonce, running, serve, text_of_tokens, tiny_engine, wait_until

CHROMIUM = "/usr/bin/chromium"  # Debian's package; `make test` installs it
OUTPUT = Path(os.environ.get("PROMPTCACHE_TEST_OUTPUT",
                            Path(__file__).resolve().parent.parent / "build" / "test-output"))
OPS = "sk-ops-dashboard-0003"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def open_server() -> Iterator[Server]:
    with running(tiny_engine(num_blocks=512)) as aengine, serve(aengine) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[Server]:
    with running(tiny_engine(num_blocks=512)) as aengine, serve(aengine, KEYS, admin_keys=(OPS,)) as srv:
        yield srv


def offline_page(browser, server: Server):
    """A page that may load only from ``server``: anything else is aborted and recorded."""
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    outside: list[str] = []

    def guard(route) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    return page, outside


def chat(server: Server, system: str, user: str, key: str = "unused") -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                   messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])


def hit_rate(page) -> float:
    return float(page.inner_text("#hit-rate").rstrip("%"))


def test_dashboard_shows_requests_hit_rate_memory_and_misses(browser, open_server: Server) -> None:
    srv = open_server
    page, outside = offline_page(browser, srv)
    page.goto(f"{srv.url}/")
    page.click("text=Dashboard")
    page.wait_for_selector("#status.live")
    assert page.inner_text("#requests") == "0" and hit_rate(page) == 0.0

    system = text_of_tokens(srv.aengine.info.tokenizer, 300, "You are the dashboard's test assistant.")
    chat(srv, system, "first question")
    page.wait_for_function("document.querySelectorAll('#requests-list .req').length === 1")
    assert hit_rate(page) == 0.0  # a cold prompt: computed, nothing reused
    assert page.locator("#requests-list .req .seg.computed").count() == 1
    assert page.locator("#requests-list .req .seg.cached").count() == 0

    chat(srv, system, "second question")
    chat(srv, system, "third question")
    page.wait_for_function("document.querySelectorAll('#requests-list .req').length === 3")
    assert hit_rate(page) > 40.0  # two of three prompts reused their ~300-token system prompt
    newest = page.locator("#requests-list .req").first
    assert newest.locator(".seg.cached").count() == 1 and newest.locator(".seg.generated").count() == 1
    assert page.locator("#chart circle").count() >= 1
    assert page.locator("#memory-bar .seg.cachedblk").count() == 1  # blocks kept for reuse
    assert page.locator("#tenants tbody tr").count() == 1

    chat(srv, "Today is 2026-12-01 09:30. " + system, "fourth question")  # a timestamp first: a miss
    page.wait_for_selector("#misses .miss[data-reason=diverged]")
    miss = page.inner_text("#misses .miss")
    assert "messages[0].content" in miss and "320 tokens lost" in miss
    assert "before:\nYou are the dashboard" in miss and "after:\nToday is 2026-12-01 09:30. You are" in miss
    assert page.locator("#misses .miss mark").count() == 2  # the first differing character, both sides

    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)
    assert outside == []  # nothing from a CDN or anywhere else
    page.close()


def test_dashboard_asks_for_a_key_and_shows_a_tenant_only_its_own(browser, keyed_server: Server) -> None:
    srv = keyed_server
    chat(srv, "acme's own system prompt " + nonce(), "hello", key="sk-acme-0001")
    chat(srv, "globex's own system prompt " + nonce(), "hello", key="sk-globex-0002")
    page, outside = offline_page(browser, srv)
    page.goto(f"{srv.url}/dashboard")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#key", "sk-wrong-key")
    page.click("#login button")
    page.wait_for_function("document.getElementById('login-error').textContent.includes('not accepted')")
    page.fill("#key", "sk-acme-0001")
    page.click("#login button")
    page.wait_for_selector("#status.live")
    page.wait_for_function("document.querySelectorAll('#tenants tbody tr').length === 1")
    assert page.inner_text("#scope") == "tenant acme"
    assert page.get_attribute("#tenants tbody tr", "data-tenant") == "acme"
    assert page.inner_text("#requests") == "1"
    assert page.locator("#memory-section").is_hidden()  # the server's memory is for operators
    page.close()

    page, _ = offline_page(browser, srv)
    page.goto(f"{srv.url}/dashboard")
    page.fill("#key", OPS)
    page.click("#login button")
    page.wait_for_function("document.querySelectorAll('#tenants tbody tr').length === 2")
    assert page.inner_text("#scope") == "all tenants" and page.locator("#memory-section").is_visible()
    assert outside == []
    page.close()


def test_docs_and_redoc_render_offline(browser, open_server: Server) -> None:
    page, outside = offline_page(browser, open_server)
    page.goto(f"{open_server.url}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)  # Swagger UI ran and read the spec
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/v1/chat/completions" in paths and "/dashboard/api/state" in paths
    page.goto(f"{open_server.url}/redoc")
    page.wait_for_selector("h1", timeout=30_000)
    assert re.search(r"promptcache", page.inner_text("h1"))
    assert "/v1/chat/completions" in page.inner_text("body")  # ReDoc rendered the operations
    # ReDoc's only outside reference is its decorative "powered by" footer image: blocked here, as
    # it would be offline, and the page renders without it
    assert [u for u in outside if u != "https://cdn.redoc.ly/redoc/logo-mini.svg"] == []
    page.close()


def test_dashboard_data_scopes_and_event_stream(keyed_server: Server) -> None:
    url = f"{keyed_server.url}/dashboard/api"
    chat(keyed_server, "scoped " + nonce(), "hi", key="sk-globex-0002")
    assert httpx.get(f"{url}/state").status_code == 401
    assert httpx.get(f"{url}/state", headers={"Authorization": "Bearer sk-nope"}).status_code == 401
    acme = httpx.get(f"{url}/state", headers={"Authorization": "Bearer sk-acme-0001"}).json()
    assert acme["scope"] == "tenant" and "engine" not in acme
    assert set(acme["tenants"]) <= {"acme"} and all(r["tenant"] == "acme" for r in acme["requests"])
    assert all(m["tenant"] == "acme" for m in acme["misses"])
    ops = httpx.get(f"{url}/state", headers={"Authorization": f"Bearer {OPS}"}).json()
    assert ops["scope"] == "all" and "globex" in ops["tenants"] and ops["engine"]["blocks"]["total"] == 512
    assert sum(r["computed"] + r["cached"] == r["prompt"] for r in ops["requests"]) == len(ops["requests"])

    with httpx.stream("GET", f"{url}/events", headers={"x-api-key": "sk-globex-0002"}, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "event: state"
        first = json.loads(next(lines).removeprefix("data: "))
    assert first["tenant"] == "globex" and first["totals"]["requests"] >= 1
    assert httpx.get(f"{url}/events").status_code == 401


def test_index_links_dashboard_and_docs(open_server: Server) -> None:
    r = httpx.get(f"{open_server.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for link in ('href="/dashboard"', 'href="/docs"', 'href="/redoc"', 'href="/metrics"'):
        assert link in r.text
    assert httpx.get(f"{open_server.url}/dashboard/nothing.js").status_code == 404


def test_a_tenants_stream_budget_is_its_own_and_slots_come_back(keyed_server: Server) -> None:
    from contextlib import ExitStack

    url = f"{keyed_server.url}/dashboard/api/events"
    acme = {"Authorization": "Bearer sk-acme-0001"}
    with ExitStack() as stack:
        for _ in range(16):
            r = stack.enter_context(httpx.stream("GET", url, headers=acme, timeout=10))
            assert r.status_code == 200
        refused = httpx.get(url, headers=acme, timeout=10)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        with httpx.stream("GET", url, headers={"Authorization": f"Bearer {OPS}"}, timeout=10) as ops:
            assert ops.status_code == 200  # one tenant's streams never lock operators out
    # every slot is given back when its client leaves (within a second or so: the stream notices
    # the disconnect when it next looks)
    def reopened() -> bool:
        with httpx.stream("GET", url, headers=acme, timeout=10) as again:
            return again.status_code == 200

    assert wait_until(reopened, timeout_s=20, interval_s=0.25)


def test_a_tenant_sees_nothing_of_other_tenants_pace(keyed_server: Server) -> None:
    url = f"{keyed_server.url}/dashboard/api/state"
    acme = {"Authorization": "Bearer sk-acme-0001"}
    before = httpx.get(url, headers=acme).json()["version"]
    chat(keyed_server, "globex again " + nonce(), "hi", key="sk-globex-0002")
    assert httpx.get(url, headers=acme).json()["version"] == before
    chat(keyed_server, "acme again " + nonce(), "hi", key="sk-acme-0001")
    assert httpx.get(url, headers=acme).json()["version"] > before


def test_a_prompt_kept_out_of_history_is_kept_off_the_dashboard(open_server: Server) -> None:
    srv = open_server
    system = text_of_tokens(srv.aengine.info.tokenizer, 200, "Private dashboard prompt.")
    chat(srv, system, "one")
    client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
        {"role": "system", "content": "SECRET 2026-12-01. " + system}, {"role": "user", "content": "two"}],
        extra_headers={"x-promptcache-history": "off"})
    state = httpx.get(f"{srv.url}/dashboard/api/state").json()
    assert "SECRET" not in json.dumps(state["misses"])
