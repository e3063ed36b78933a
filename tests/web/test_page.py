"""The web page in real headless Chromium (Debian's, driven by PyPI playwright) over a real
scheduler and three real fornax-node daemons: what an operator sees and does on it reaches the
9P tree, and what happens in the 9P tree shows on the page (docs/web.8.md).

Screenshots go to the test's tmp dir; with FORNAX_DOCS_SHOTS=1 the dashboard's and the builder's
are also copied to docs/ (the README's).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ..helpers import free_port, run
from ..node.cluster import read, three_nodes
from ..sched.harness import SchedProc, ctl, ls
from .browser import launch, missing

T = TypeVar("T")
DOCS = Path(__file__).resolve().parent.parent.parent / "docs"
WAIT = 20_000  # ms: generous, for a loaded machine; the assertions are on what shows, not how fast

_why = missing()
if _why:
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"the page's browser tests cannot run: {_why}")  # in CI a missing part fails
    pytest.skip(_why, allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402


def nine(coro: Awaitable[T]) -> T:
    """A 9P call from its own thread (playwright's sync API keeps an event loop on this one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run, coro).result()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("page")
    nodes = three_nodes(tmp)
    port = free_port()
    sched = None
    try:
        sched = SchedProc(tmp / "sched", [n.addr for n in nodes[:1]], extra=["--http", f"127.0.0.1:{port}"]).start()
        token = (tmp / "sched" / "http.token").read_text().strip()
        with sync_playwright() as p:
            browser = launch(p)
            try:
                yield {"sched": sched, "base": f"http://127.0.0.1:{port}", "token": token, "browser": browser,
                       "shots": tmp / "screenshots"}
            finally:
                browser.close()
    finally:
        if sched is not None:
            sched.stop()
        for n in nodes:
            n.stop()


@pytest.fixture(scope="module")
def page(cluster: dict[str, Any]) -> Iterator[Page]:
    """One tab with the token, as the URL the scheduler prints gives it."""
    ctx = cluster["browser"].new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{cluster['base']}/#token={cluster['token']}")
    yield pg
    ctx.close()
    assert not errors, errors  # no script error on the page, in any of the tests


def shot(cluster: dict[str, Any], page: Page, name: str) -> Path:
    cluster["shots"].mkdir(exist_ok=True)
    path = cluster["shots"] / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("FORNAX_DOCS_SHOTS") == "1":
        shutil.copy(path, DOCS / name)
    return path


def placements(cluster: dict[str, Any]) -> list[str]:
    return sorted(e.name for e in nine(ls(cluster["sched"].addr, "cluster/scheduler/placements")))


def test_the_dashboard_shows_three_nodes(cluster: dict[str, Any], page: Page) -> None:
    rows = page.locator("#nodes tbody tr")
    expect(rows).to_have_count(3, timeout=WAIT)
    expect(page.locator("#nodes tbody tr td.status-online")).to_have_count(3, timeout=WAIT)
    assert [rows.nth(i).get_attribute("data-node") for i in range(3)] == ["fornax-01", "fornax-02", "fornax-03"]
    expect(page.locator("#mode")).to_have_text("mode normal")
    assert "token" not in page.url  # the token left the address bar (kept in the tab alone)


def test_a_place_made_on_the_page_appears_in_the_9p_placements(cluster: dict[str, Any], page: Page) -> None:
    form = page.locator("#place-form")
    form.locator("[name=image]").fill("hello")
    form.locator("[name=name]").fill("from-page")
    form.locator("[name=replicas]").fill("2")
    form.locator("[name=env]").fill("GREETING=hi MODE=page")
    expect(page.locator("#place-cmd")).to_have_text(
        "place hello name=from-page replicas=2 env:GREETING=hi env:MODE=page")
    page.click("#place-go")
    expect(page.locator("#answer-text")).to_contain_text("from-page-2 node=fornax-", timeout=WAIT)
    assert page.locator("#answer").get_attribute("data-kind") == "ok"
    assert {"from-page-1", "from-page-2"} <= set(placements(cluster))
    text = nine(read(cluster["sched"].addr, "cluster/scheduler/placements/from-page-1"))
    assert text.startswith("node=fornax-") and "image=hello" in text
    assert "\nenv.GREETING=hi\nenv.MODE=page\n" in text, text
    expect(page.locator('#prows .prow[data-name="from-page-1"]')).to_have_count(1, timeout=WAIT)
    expect(page.locator('#prows .prow[data-name="from-page-2"] span').nth(3)).to_have_text("running", timeout=WAIT)
    # And an action on a row: select it, stop it, through the same command path as a ctl write.
    page.click('#prows .prow[data-name="from-page-2"] span >> nth=1')
    expect(page.locator("#sel-name")).to_have_text("from-page-2")
    page.click("#row-stop")
    expect(page.locator("#answer-text")).to_contain_text("stop from-page-2", timeout=WAIT)
    assert "(by " in nine(read(cluster["sched"].addr, "cluster/scheduler/log")).split("stop from-page-2 on")[-1]
    expect(page.locator("#row-start")).to_be_visible(timeout=WAIT)  # stopped now: it can be started
    # A command written as text; a placement that waits says why.
    page.fill("#ctl-text", "place hello name=huge cpu>=64")
    page.click("#ctl-form button")
    expect(page.locator("#answer-text")).to_contain_text("huge", timeout=WAIT)
    why = page.locator('#prows .prow[data-name="huge"] .why')
    expect(why).to_contain_text("cpu", timeout=WAIT)
    assert "cpu" in nine(read(cluster["sched"].addr, "cluster/scheduler/placements/huge"))
    page.select_option("#f-status", "running")
    expect(page.locator("#prows .prow")).to_have_count(1)  # the filters: by status
    page.select_option("#f-status", "")
    page.fill("#f-name", "*-2")
    expect(page.locator("#prows .prow")).to_have_count(1)  # by name (a glob)
    page.fill("#f-name", "")
    page.click("#answer-close")
    shot(cluster, page, "web-dashboard.png")


def test_a_log_line_appears_live(cluster: dict[str, Any], page: Page) -> None:
    expect(page.locator("#log-state")).to_have_text("live", timeout=WAIT)
    t0 = time.monotonic()
    nine(ctl(cluster["sched"].addr, "cordon fornax-03"))
    expect(page.locator("#log")).to_contain_text("cordon fornax-03", timeout=WAIT)
    took = time.monotonic() - t0
    print(f"a log line written over 9P showed on the page {took:.2f}s later")
    expect(page.locator('#nodes tr[data-node="fornax-03"] td').nth(2)).to_have_text("online cordoned", timeout=WAIT)
    page.click('#nodes tr[data-node="fornax-03"] button[data-do=uncordon]')
    expect(page.locator("#log")).to_contain_text("uncordon fornax-03", timeout=WAIT)
    assert nine(read(cluster["sched"].addr, "cluster/nodes/fornax-03/status")).strip() == "online"


def test_a_rule_built_in_the_form_compiles_simulates_and_deploys(cluster: dict[str, Any], page: Page) -> None:
    addr = cluster["sched"].addr
    before = int(nine(read(addr, "cluster/scheduler/policy.status")).split()[1])
    page.click("button[data-tab=builder]")
    page.click("#add-rule")
    rule = page.locator("#rules .rule").last
    rule.locator(".r-name").fill("page-pack")
    rule.locator(".r-priority").fill("500")
    rule.locator(".r-select").select_option("most-loaded")
    rule.locator(".r-add-when").click()
    test = rule.locator(".r-when .test").last
    test.locator(".t-op").select_option("glob")
    test.locator(".t-value").fill("hello*")
    code = page.locator("#code")
    expect(code).to_have_value(lambda_contains('- name: "page-pack"'), timeout=WAIT)
    expect(code).to_have_value(lambda_contains('request.image: {glob: "hello*"}'))
    expect(page.locator("#lua")).to_contain_text("-- page-pack: priority 500", timeout=WAIT)
    expect(page.locator("#lua")).to_contain_text('if not (glob(req.image, "hello*")) then return end')
    page.click("#validate")
    expect(page.locator("#builder-answer")).to_contain_text("ok: yaml", timeout=WAIT)
    page.fill("#sim-place", "place hello replicas=2")
    page.click("#simulate")
    answer = page.locator("#builder-answer")
    expect(answer).to_contain_text("(policy draft yaml my-policy): nothing changed", timeout=WAIT)
    expect(answer).to_contain_text("(rule page-pack)")
    if page.locator("#answer").is_visible():
        page.click("#answer-close")  # (the dashboard's last answer, over the builder)
    shot(cluster, page, "web-builder.png")
    page.click("#deploy")
    expect(answer).to_contain_text(f"policy v{before + 1} active", timeout=WAIT)
    status = nine(read(addr, "cluster/scheduler/policy.status"))
    assert status.startswith(f"version {before + 1}\nkind yaml\n"), status
    assert 'name: "page-pack"' in nine(read(addr, "cluster/scheduler/policy"))
    assert "-- page-pack: priority 500" in nine(read(addr, "cluster/scheduler/policy.lua"))
    expect(page.locator(f'#history tr[data-version="{before + 1}"]')).to_contain_text("(active)", timeout=WAIT)
    # Written by hand, wrong: the error is shown at its line, and nothing is deployed.
    code.fill("scheduler:\n  rules:\n    - name: x\n      condition: always\n      action: {use: nowhere}\n")
    expect(page.locator("#code-error")).to_contain_text("line 5: rule 'x': use wants platform", timeout=WAIT)
    expect(page.locator('#gutter span.bad[data-line="5"]')).to_have_count(1)
    page.click("#deploy")
    expect(answer).to_contain_text("policy refused, the old one stays", timeout=WAIT)
    assert nine(read(addr, "cluster/scheduler/policy.status")).startswith(f"version {before + 1}\n")
    page.click("button[data-tab=dashboard]")


def test_a_change_without_the_token_is_refused(cluster: dict[str, Any]) -> None:
    ctx = cluster["browser"].new_context(viewport={"width": 1400, "height": 900})
    try:
        pg = ctx.new_page()
        pg.goto(cluster["base"] + "/")
        expect(pg.locator("#nodes tbody tr")).to_have_count(3, timeout=WAIT)  # reading needs none on loopback
        before = placements(cluster)
        pg.locator("#place-form [name=image]").fill("hello")
        pg.locator("#place-form [name=name]").fill("tokenless")
        pg.click("#place-go")
        expect(pg.locator("#answer-text")).to_contain_text("a change needs the scheduler's token", timeout=WAIT)
        assert pg.locator("#answer").get_attribute("data-kind") == "error"
        pg.fill("#token", "wrong-token-0123456789")
        pg.click("#token-form button")
        pg.click("#place-go")
        expect(pg.locator("#answer-text")).to_contain_text("is not one of this scheduler's", timeout=WAIT)
        assert placements(cluster) == before and "tokenless" not in before
    finally:
        ctx.close()


def test_a_dead_node_is_forgotten_from_the_page(cluster: dict[str, Any], page: Page, tmp_path: Path) -> None:
    """A fourth node joins, dies (kill -9): its row offers forget, which takes it out of the table and
    of /cluster/nodes.  (Last in the module: the three nodes the other tests see stay as they were.)"""
    import socket

    from ..node.cluster import NodeProc

    extra = NodeProc("fornax-09", free_port(), free_port(socket.SOCK_DGRAM), tmp_path / "n9").start()
    try:
        nine(ctl(cluster["sched"].addr, f"join {extra.addr}"))
        row = page.locator('#nodes tbody tr[data-node="fornax-09"]')
        expect(row.locator("td.status-online")).to_have_count(1, timeout=WAIT)
        expect(row.locator('button[data-do="forget"]')).to_have_count(0)  # only a dead node has it
        extra.kill9()
        expect(row.locator("td.status-dead")).to_have_count(1, timeout=WAIT)
        row.locator('button[data-do="forget"]').click()
        expect(page.locator("#answer-text")).to_contain_text("fornax-09 forgotten", timeout=WAIT)
        expect(row).to_have_count(0, timeout=WAIT)
        assert "fornax-09" not in [e.name for e in nine(ls(cluster["sched"].addr, "cluster/nodes"))]
    finally:
        extra.stop()


def lambda_contains(text: str) -> Any:
    """A pattern for expect(...).to_have_value: the value holds ``text``."""
    import re

    return re.compile(re.escape(text))
