"""The inventory over real HTTP with a full book: stopped rows serialised once, and paged."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from unittest import mock

import anyio
import anyio.abc
import httpx
import pytest

import kill_switch as ks
from kill_switch import control
from kill_switch.control import _inventory
from kill_switch.control._events import Handoff
from kill_switch.control._inventory import RECENT, STOPPED_LIMIT, Entry, jsonable
from kill_switch.testing import MemoryAudit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

TOKEN, ENTRY = control.new_token("viewer", "viewer-t")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[ks.Runtime, httpx.AsyncClient]]:
    """A runtime (memory audit) with its control plane on its own thread, and a client."""
    async with served() as (runtime, _, client):
        yield runtime, client


@asynccontextmanager
async def served() -> AsyncIterator[tuple[ks.Runtime, control.ControlServer, httpx.AsyncClient]]:
    """``serving``, and the server."""
    async with (
        ks.Runtime(audit=MemoryAudit()) as runtime,
        control.serve(runtime, tokens=[ENTRY]) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30, headers=AUTH) as client,
    ):
        yield runtime, server, client


async def stop_sessions(runtime: ks.Runtime, n: int, agent: str = "worker") -> list[str]:
    """*n* sessions interrupted (``terminated`` rows with a StopReport); their ids."""
    ids = []
    for i in range(n):
        async with runtime.session(agent, labels={"half": str(i % 2)}) as session:
            ids.append(session.id)
            await session.interrupt("inventory test", trigger="operator")
    return ids


async def listing(client: httpx.AsyncClient, query: str = "") -> dict[str, Any]:
    """``GET /api/sessions?{query}`` (200), parsed."""
    r = await client.get(f"/api/sessions?{query}")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def until_reported(client: httpx.AsyncClient, n: int) -> None:
    """Wait until the control plane holds the StopReports of *n* terminated sessions."""
    with anyio.fail_after(60):
        while True:
            rows = (await listing(client, f"state=terminated&stopped_limit={RECENT}"))["sessions"]
            if sum(r["report"] is not None for r in rows) >= n:
                return
            await anyio.sleep(0.05)


async def hold(
    runtime: ks.Runtime,
    *,
    task_status: anyio.abc.TaskStatus[ks.Session] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A live session until cancelled."""
    async with runtime.session("live") as session:
        task_status.started(session)
        await anyio.sleep_forever()


async def test_a_full_book_is_not_serialised_again_on_each_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With 1,000 stopped sessions, a poll encodes only the live row; the bytes are the
    old encoding of the same rows."""
    serialised: list[str] = []
    to_json = Entry.to_json

    def counted(self: Entry) -> dict[str, Any]:
        serialised.append(self.info.session_id)
        return to_json(self)

    monkeypatch.setattr(Entry, "to_json", counted)
    async with served() as (runtime, server, client), anyio.create_task_group() as tg:
        await stop_sessions(runtime, RECENT)
        await until_reported(client, RECENT)
        live = await tg.start(hold, runtime)
        everything = f"stopped_limit={RECENT}"
        await listing(client, everything)  # rows not yet encoded are encoded here, once
        for query in (everything, ""):
            serialised.clear()
            r = await client.get(f"/api/sessions?{query}")
            assert r.status_code == 200
            # The negative control: the counter sees the live row, rebuilt per poll.
            assert serialised == [live.id]
        serialised.clear()
        r = await client.get(f"/api/sessions?{everything}")
        rows = r.json()["sessions"]
        assert len(rows) == RECENT  # the book is bounded: the live row trimmed the oldest
        assert rows[-1]["session_id"] == live.id
        assert all(row["state"] == "terminated" and row["report"] for row in rows[:-1])
        book = server.state.book.entries()  # the control loop is idle: nothing polls
        old = json.dumps(
            jsonable({"sessions": [e.to_json() for e in book], "count": len(book)}),
            ensure_ascii=True,
            separators=(",", ":"),
        )
        assert r.content == (old[:-1] + ',"stopped_next":null}').encode()
        tg.cancel_scope.cancel()


async def test_a_metrics_scrape_serialises_no_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """``/metrics`` counts sessions per state from the snapshots: a scrape with a full
    book encodes no row (it used to encode every one), and the counts are right."""
    serialised: list[str] = []
    to_json = Entry.to_json

    def counted(self: Entry) -> dict[str, Any]:
        serialised.append(self.info.session_id)
        return to_json(self)

    monkeypatch.setattr(Entry, "to_json", counted)
    async with served() as (runtime, _, client), anyio.create_task_group() as tg:
        await stop_sessions(runtime, 50)
        await until_reported(client, 50)
        await tg.start(hold, runtime)
        serialised.clear()
        text = (await client.get("/metrics")).text
        assert serialised == []
        assert 'kill_switch_sessions{state="terminated"} 50' in text
        assert 'kill_switch_sessions{state="running"} 1' in text
        await listing(client)  # the negative control: a listing does encode the live row
        assert serialised != []
        tg.cancel_scope.cancel()


async def test_stopped_sessions_are_paged_newest_first_by_cursor() -> None:
    """The default answer holds the newest STOPPED_LIMIT stopped rows (book order) and
    every live one; ``stopped_before`` walks the older ones exactly once."""
    async with serving() as (runtime, client), anyio.create_task_group() as tg:
        ids = await stop_sessions(runtime, STOPPED_LIMIT + 30)
        await until_reported(client, len(ids))
        live = await tg.start(hold, runtime)
        first = await listing(client)
        got = [r["session_id"] for r in first["sessions"]]
        assert got == [*ids[-STOPPED_LIMIT:], live.id]
        assert first["count"] == STOPPED_LIMIT + 1
        seen, cursor = got[:-1], first["stopped_next"]
        while cursor is not None:
            page = await listing(client, f"stopped_limit=7&stopped_before={cursor}")
            rows = [r["session_id"] for r in page["sessions"]]
            assert rows[-1] == live.id  # live sessions are on every page
            assert 0 < len(rows) - 1 <= 7
            seen = rows[:-1] + seen
            cursor = page["stopped_next"]
        assert seen == ids
        none = await listing(client, "stopped_limit=0")
        assert [r["session_id"] for r in none["sessions"]] == [live.id]
        assert none["stopped_next"] is not None
        newest = await listing(client, f"stopped_limit=1&stopped_before={none['stopped_next']}")
        assert [r["session_id"] for r in newest["sessions"]] == [ids[-1], live.id]
        # Filters apply before the page is counted.
        half = await listing(client, "label=half=1&stopped_limit=5&state=terminated")
        assert [r["session_id"] for r in half["sessions"]] == [
            i for n, i in enumerate(ids) if n % 2 == 1
        ][-5:]
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    "query",
    [
        "stopped_limit=-1",
        "stopped_limit=abc",
        f"stopped_limit={RECENT + 1}",
        "stopped_before=1.5",
        "stopped_before=%EF%BC%91",
    ],
)
async def test_bad_paging_parameters_are_refused(query: str) -> None:
    """A stopped_limit or stopped_before that is not a whole number in range is a 400."""
    async with serving() as (_, client):
        r = await client.get(f"/api/sessions?{query}")
        assert r.status_code == 400
        assert "stopped_" in r.json()["error"]["message"]


def test_entry_text_is_the_row_encoded_once() -> None:
    """``Entry.text`` is ``json_text`` of ``to_json``, computed on first use and kept."""
    info = ks.SessionInfo(
        session_id="s\udc80",
        agent="a",
        labels={},
        parent_id=None,
        state="finished",
        started_at=None,
        actions=0,
        cost=float("nan"),
        calls_in_flight=0,
        tool_tasks=0,
        interrupt_id=None,
        interrupt_trigger=None,
        interrupt_reason=None,
    )
    entry = Entry(info)
    assert entry.text == _inventory.json_text(entry.to_json())
    assert entry.text is entry.text
    assert "\\udc80" in entry.text
    assert '"cost":null' in entry.text


async def test_a_burst_from_another_thread_wakes_the_loop_once() -> None:
    """Items put by a thread while the loop is busy arrive in one callback, in order;
    items put while a burst lingers arrive with the next timed drain and wake nothing;
    once a drain finds nothing, the next item wakes the loop again."""
    loop = asyncio.get_running_loop()
    bursts: list[list[int]] = []
    arrived = asyncio.Event()  # set from a plain loop callback, not a task
    wakes = 0
    threadsafe = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any) -> Any:
        nonlocal wakes
        wakes += 1
        return threadsafe(callback, *args)

    def consume(burst: list[int]) -> None:
        bursts.append(burst)
        arrived.set()

    handoff = Handoff[int](loop, consume, linger=0.05)
    with mock.patch.object(loop, "call_soon_threadsafe", counting):

        def put_all(items: range) -> None:
            for i in items:
                handoff.put(i)

        putter = threading.Thread(target=put_all, args=(range(100),))
        putter.start()
        putter.join()  # the loop is held here on purpose: every put lands before a drain
        with anyio.fail_after(5):
            await arrived.wait()
        assert bursts == [list(range(100))]
        arrived.clear()
        putter = threading.Thread(target=put_all, args=(range(100, 150),))
        putter.start()
        putter.join()  # within the linger: taken by the timed drain
        with anyio.fail_after(5):
            await arrived.wait()
        assert bursts == [list(range(100)), list(range(100, 150))]
        assert wakes == 1  # the second burst lingered in: no wake of its own
        while handoff._scheduled:  # noqa: ASYNC110 - polling private state; the empty drain ends the burst
            await asyncio.sleep(0.01)
        arrived.clear()
        threading.Thread(target=handoff.put, args=(150,)).start()
        with anyio.fail_after(5):
            await arrived.wait()
    assert bursts == [list(range(100)), list(range(100, 150)), [150]]
    assert wakes == 2  # the control: a put after the burst ended is counted as a wake


@pytest.mark.parametrize("catch_up", [True, False])
async def test_a_read_sees_every_event_recorded_before_it(
    monkeypatch: pytest.MonkeyPatch, catch_up: bool
) -> None:
    """Events lingering in the hand-off (a burst in progress) reach the book before a
    read is served: a stop made through the Python API is in the very next listing.
    Negative control: without the catch-up the listing misses it while it lingers."""
    from kill_switch.control import _app

    monkeypatch.setattr(_app, "Handoff", functools.partial(Handoff, linger=30.0))
    if not catch_up:
        monkeypatch.setattr(Handoff, "catch_up", lambda self: None)
    async with serving() as (runtime, client), anyio.create_task_group() as tg:
        # A burst opens: this session's start wakes the control loop, whose drain then
        # lingers 30 s; what is recorded meanwhile waits for it.
        # (The drain was queued before this request reached the control loop: it ran.)
        live = await tg.start(hold, runtime)
        assert live.id in {r["session_id"] for r in (await listing(client))["sessions"]}
        async with runtime.session("late") as session:
            await session.interrupt("seen at once", trigger="operator")
        rows = {r["session_id"]: r for r in (await listing(client))["sessions"]}
        if catch_up:
            assert rows[session.id]["interrupt_reason"] == "seen at once"
            assert rows[session.id]["state"] == "terminated"
        else:
            assert session.id not in rows
        tg.cancel_scope.cancel()


def test_a_handoff_to_a_closed_loop_drops_quietly() -> None:
    """``put`` never raises into the recorder once the loop has closed."""
    loop = asyncio.new_event_loop()
    loop.close()
    Handoff[int](loop, lambda _: None).put(1)
