"""Shared helpers for the benchmark scripts: timing, interleaving, tables, JSON.

Conventions every ``benchmarks/bench_*.py`` follows, so that ``run_all`` can drive it:

* **Standalone.** It runs as ``python -m benchmarks.bench_x`` and as
  ``python benchmarks/bench_x.py`` (``run_all`` uses the latter with the repository root
  on ``PYTHONPATH``). Options from :func:`make_parser`: ``--json PATH`` writes the
  results, ``--quick`` is a smoke run (fewer repetitions, smaller N, a few seconds),
  ``--loops asyncio,uvloop`` picks the event loops (both by default).
* **Ratios, not absolute times.** The machine is shared and noisy: every figure is
  stated as a ratio to the matching raw primitive measured *in the same run*.
* **Interleaved.** Variants of one case run ABC, BCA, CAB, ... (:func:`interleave`),
  never one block after the other, after warm-up rounds that are thrown away; many
  repetitions; p50 and p99 reported (:func:`summarize`).
* **Timed window.** ``time.perf_counter_ns``; set-up and tear-down stay outside it;
  the garbage collector runs just before it and is paused inside it
  (:func:`gc_paused`), as ``timeit`` does.
* **Results** are :class:`Row` objects. :func:`print_table` prints them and
  :func:`write_json` writes ``{"benchmark", "quick", "environment", "rows": [...]}``;
  each row carries ``p50_ns``/``p99_ns``, the baseline it is compared to, the ratios,
  and the target (text) with ``met`` (``true``/``false``/``null`` when untargeted).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime
import gc
import http.client
import json
import math
import os
import platform
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

    import kill_switch as ks

T = TypeVar("T")

now_ns = time.perf_counter_ns
LOOPS = ("asyncio", "uvloop")


# ------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0-100) of *values*, linearly interpolated (NumPy's default)."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(data[lo])
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Summary of one variant's samples (nanoseconds, or whatever unit they are in)."""

    samples: int
    p50: float
    p99: float
    mean: float
    minimum: float


def summarize(values: Sequence[float]) -> Stats:
    """p50, p99, mean and minimum of *values*."""
    if not values:
        return Stats(0, math.nan, math.nan, math.nan, math.nan)
    return Stats(
        samples=len(values),
        p50=percentile(values, 50),
        p99=percentile(values, 99),
        mean=sum(values) / len(values),
        minimum=float(min(values)),
    )


# ------------------------------------------------------------------- timing


@contextmanager
def gc_paused(*, collect: bool = True) -> Iterator[None]:
    """Collect garbage, then keep the collector off for the timed window.

    Pass ``collect=False`` for windows of a few microseconds: a full collection just
    before them evicts the caches and would be measured instead.
    """
    if collect:
        gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until *predicate* holds (a state counter, read between steps)."""
    while not predicate():  # noqa: ASYNC110  (counters of parked tasks have no event)
        await asyncio.sleep(0)


class Countdown:
    """A future resolved by the *n*-th :meth:`hit`: wait for *n* things to have happened
    without spinning the loop (a ``sleep(0)`` spin competes with what it waits for).

    Create it on the loop; :meth:`hit` there, :meth:`hit_threadsafe` from other threads.
    """

    def __init__(self, n: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.left = n
        self.done: asyncio.Future[None] = self.loop.create_future()
        if n <= 0:
            self.done.set_result(None)

    def hit(self) -> None:
        """One more (on the loop)."""
        self.left -= 1
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)

    def hit_threadsafe(self) -> None:
        """One more, from any thread."""
        self.loop.call_soon_threadsafe(self.hit)

    async def wait(self) -> None:
        """Until the *n*-th hit."""
        await self.done


def rotations(names: Sequence[str], reps: int) -> Iterator[list[str]]:
    """*reps* orders of *names*, each rotated by one from the last (ABC, BCA, CAB, ...)."""
    k = len(names)
    for i in range(reps):
        s = i % k if k else 0
        yield [*names[s:], *names[:s]]


async def interleave(
    variants: Mapping[str, Callable[[], Awaitable[float]]],
    *,
    reps: int,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Run each variant *warmup* + *reps* times, interleaved; keep the last *reps* samples.

    Each variant is a coroutine function that does its own set-up, times its own window
    and returns one sample (ns).
    """
    out: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i, order in enumerate(rotations(names, warmup + reps)):
        for name in order:
            sample = await variants[name]()
            if i >= warmup:
                out[name].append(sample)
    return out


def batch_timer(
    call: Callable[[], Awaitable[object]], batch: int
) -> Callable[[], Awaitable[float]]:
    """A variant for :func:`interleave`: the ns of *batch* awaits of ``call()`` in a row.

    Each variant built with it pays the same ``call()`` indirection, so ratios between
    them hold; a loop timing a bare await stays written out where it is the baseline.
    """

    async def variant() -> float:
        with gc_paused(collect=False):
            t0 = now_ns()
            for _ in range(batch):
                await call()
            t1 = now_ns()
        return t1 - t0

    return variant


def interleave_sync(
    variants: Mapping[str, Callable[[], float]],
    *,
    reps: int,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """:func:`interleave` for plain functions."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i, order in enumerate(rotations(names, warmup + reps)):
        for name in order:
            sample = variants[name]()
            if i >= warmup:
                out[name].append(sample)
    return out


# ------------------------------------------------------------------- what a kill stops


async def parked_session(
    runtime: ks.Runtime,
    n: int,
    park: Callable[[], Awaitable[Any]] = anyio.sleep_forever,
    *,
    tool: str | None = "park",
) -> tuple[ks.Session, asyncio.Task[None]]:
    """A session of *runtime* in its own task, its body and *n* tool calls parked in
    *park*; returns once all *n* are in flight (set-up, outside any timed window).

    The task ends when the session is stopped: await it after the kill (tear-down).
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[ks.Session] = loop.create_future()

    async def host() -> None:
        async with runtime.session("bench") as session:
            for _ in range(n):
                session.start_soon(park, tool=tool)
            ready.set_result(session)
            await park()

    task = loop.create_task(host())
    session = await ready
    await until(lambda: session.info().calls_in_flight >= n)
    return session, task


async def timed_interrupt(
    session: ks.Session, *, collect: bool = True
) -> tuple[float, ks.StopReport]:
    """(ns, report) of ``session.interrupt()`` until its report, the collector paused
    (after a collection unless not *collect*: see :func:`gc_paused`)."""
    with gc_paused(collect=collect):
        t0 = now_ns()
        report = await session.interrupt("bench", trigger="supervisor")
        t1 = now_ns()
    return t1 - t0, report


async def cancel_all(tasks: Sequence[asyncio.Task[Any]], *, collect: bool = True) -> float:
    """ns to cancel *tasks* and gather them, the collector paused (after a collection
    unless not *collect*): a raw kill's floor."""
    with gc_paused(collect=collect):
        t0 = now_ns()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        t1 = now_ns()
    return t1 - t0


async def raw_kill(n: int, *, collect: bool = True) -> float:
    """*n* raw tasks parked on futures, then :func:`cancel_all` on them."""
    loop = asyncio.get_running_loop()
    parked = Countdown(n)

    async def park() -> None:
        parked.hit()
        await loop.create_future()

    tasks = [loop.create_task(park()) for _ in range(n)]
    await parked.wait()
    return await cancel_all(tasks, collect=collect)


class ControlClient:
    """A kept-alive HTTP/1.1 connection to the control plane, used from one thread
    (``http.client``: the least a client can add to the timed round trip)."""

    def __init__(self, url: str, token: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def ready(self) -> None:
        """A round trip before the timed one (set-up): reconnects if the server closed
        the idle kept-alive connection, so the kill never pays for a new connection."""
        for attempt in (1, 2):
            try:
                self.conn.request("GET", "/healthz")
                self.conn.getresponse().read()
                return
            except (OSError, http.client.HTTPException):
                self.conn.close()
                if attempt == 2:
                    raise

    def kill(self, session_id: str, calls: int | None = None) -> tuple[float, dict[str, Any]]:
        """``POST /api/sessions/{id}/kill`` until its JSON is read: (ns, the answer).

        Raises:
            RuntimeError: not a 200, or (*calls* given) the report is not quiescent with
                *calls* tool calls cancelled.
        """
        self.ready()
        with gc_paused(collect=False):
            t0 = now_ns()
            self.conn.request(
                "POST", f"/api/sessions/{session_id}/kill", b'{"reason": "bench"}', self.headers
            )
            response = self.conn.getresponse()
            data = json.loads(response.read())
            t1 = now_ns()
        if response.status != 200:
            raise RuntimeError(f"HTTP kill answered {response.status}: {data}")
        report = data["report"]
        if calls is not None and (
            not report["quiescent"] or report["tool_calls_cancelled"] != calls
        ):
            raise RuntimeError(f"bad stop report: {report}")
        return t1 - t0, data

    def health(self) -> float:
        """ns of one ``GET /healthz`` round trip: the HTTP floor."""
        with gc_paused(collect=False):
            t0 = now_ns()
            self.conn.request("GET", "/healthz")
            self.conn.getresponse().read()
            t1 = now_ns()
        return t1 - t0

    def close(self) -> None:
        self.conn.close()


# ------------------------------------------------------------------- one thread's system calls

_TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}  # the syscall's number
_PERF_TYPE_TRACEPOINT = 2
_PERF_FORMAT_GROUP = 1 << 3
_PERF_FLAG_FD_CLOEXEC = 1 << 3
_PERF_ATTR_SIZE = 64  # PERF_ATTR_SIZE_VER0: type, size, config, ..., read_format, flags


class SyscallCounter:
    """The system calls one thread makes between two :meth:`read` calls, by kind.

    The kernel counts them: ``perf_event_open`` (through ctypes: the standard library
    has no binding) on the ``raw_syscalls:sys_enter`` tracepoint, with one
    ``syscalls:sys_enter_<name>`` counter per name given, all in one group read in one
    call. Nothing runs in the counted thread but the reads, so what is timed in the
    same window is not slowed (``strace`` stops the thread at every call; ``perf stat``
    from outside cannot be bounded to one window without a control channel). A read is
    one ``read`` call, counted in the difference of two: :meth:`delta` takes it off.

    Needs Linux, tracefs mounted and the right to read tracepoints (root here);
    :meth:`open` says why not otherwise.
    """

    def __init__(self, fds: list[int], names: list[str]) -> None:
        self.fds = fds
        self.names = names  # "all" first: every system call

    @classmethod
    def open(cls, tid: int, names: Sequence[str]) -> tuple[SyscallCounter | None, str]:
        """Counters of thread *tid* (a native id), or ``(None, why not)``."""
        nr = _PERF_EVENT_OPEN.get(platform.machine())
        if sys.platform != "linux" or nr is None:
            return None, f"perf_event_open is not known on {sys.platform}/{platform.machine()}"
        root = next((r for r in _TRACEFS if os.path.isdir(f"{r}/events/raw_syscalls")), None)
        if root is None:
            return None, "tracefs is not mounted (/sys/kernel/tracing)"
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        fds: list[int] = []
        kept: list[str] = []
        try:
            for name in ("all", *names):
                event = "raw_syscalls/sys_enter" if name == "all" else f"syscalls/sys_enter_{name}"
                try:
                    tracepoint = int(Path(f"{root}/events/{event}/id").read_text())
                except (OSError, ValueError):
                    if name == "all":
                        raise
                    continue  # no such system call on this kernel
                attr = ctypes.create_string_buffer(_PERF_ATTR_SIZE)
                struct.pack_into(
                    "IIQQQQ",
                    attr,
                    0,
                    *(_PERF_TYPE_TRACEPOINT, _PERF_ATTR_SIZE, tracepoint, 0, 0),
                    _PERF_FORMAT_GROUP,
                )
                fd = libc.syscall(
                    ctypes.c_long(nr),
                    attr,
                    ctypes.c_int(tid),
                    ctypes.c_int(-1),
                    ctypes.c_int(fds[0] if fds else -1),
                    ctypes.c_ulong(_PERF_FLAG_FD_CLOEXEC),
                )
                if fd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"perf_event_open({event}): {os.strerror(err)}")
                fds.append(fd)
                kept.append(name)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            return None, str(exc)
        return cls(fds, kept), ""

    def read(self) -> tuple[int, ...]:
        """The counts so far (one ``read`` call)."""
        n = len(self.fds)
        values = struct.unpack(f"{n + 1}Q", os.read(self.fds[0], 8 * (n + 1)))
        return values[1:]

    def delta(self, before: Sequence[int], after: Sequence[int]) -> dict[str, int]:
        """Calls by name between two reads, the second read's own call taken off;
        ``other``: the calls of no name given."""
        out = {name: b - a for name, a, b in zip(self.names, before, after, strict=True)}
        out["all"] -= 1
        if "read" in out:
            out["read"] -= 1
        out["other"] = out["all"] - sum(v for k, v in out.items() if k != "all")
        return out

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


# ------------------------------------------------------------------- event loops


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop factory called *name* (``asyncio`` or ``uvloop``).

    Raises:
        ValueError: unknown name.
        ImportError: uvloop is not installed.
    """
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    raise ValueError(f"unknown event loop {name!r}; choose from {', '.join(LOOPS)}")


def run_on(loop: str, main: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``main(*args)`` to completion on a fresh event loop of kind *loop*."""

    async def runner() -> T:
        return await main(*args)

    with asyncio.Runner(loop_factory=loop_factory(loop)) as r:
        return r.run(runner())


# ------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of results: a variant of a case, on one event loop."""

    benchmark: str
    case: str
    variant: str
    loop: str
    n: int | None
    p50_ns: float
    p99_ns: float
    samples: int
    unit: str = "ns"
    baseline: str | None = None
    ratio_p50: float | None = None
    ratio_p99: float | None = None
    target: str | None = None
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_row(
    benchmark: str,
    case: str,
    variant: str,
    loop: str,
    n: int | None,
    stats: Stats,
    *,
    baseline: tuple[str, Stats] | None = None,
    unit: str = "ns",
    **extra: Any,
) -> Row:
    """A :class:`Row` from *stats*, with ratios to *baseline* (name, stats) if given."""
    row = Row(benchmark, case, variant, loop, n, stats.p50, stats.p99, stats.samples, unit)
    if baseline is not None:
        name, base = baseline
        row.baseline = name
        row.ratio_p50 = stats.p50 / base.p50 if base.p50 else math.nan
        row.ratio_p99 = stats.p99 / base.p99 if base.p99 else math.nan
    row.extra = dict(extra)
    return row


def fmt_value(value: float | None, unit: str = "ns") -> str:
    """A human-readable value: ns scaled to µs/ms/s, bytes to KiB/MiB, else as is."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "ns":
        v = float(value)
        if abs(v) < 1_000:
            return f"{v:.0f} ns"
        if abs(v) < 1_000_000:
            return f"{v / 1e3:.2f} µs"
        if abs(v) < 1_000_000_000:
            return f"{v / 1e6:.2f} ms"
        return f"{v / 1e9:.2f} s"
    if unit == "B":
        v = float(value)
        if abs(v) < 1024:
            return f"{v:.0f} B"
        if abs(v) < 1024 * 1024:
            return f"{v / 1024:.2f} KiB"
        return f"{v / 1024 / 1024:.2f} MiB"
    return f"{value:.4g} {unit}"


def fmt_ratio(value: float | None) -> str:
    """A ratio as ``1.23x`` (or ``-``)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2f}x"


def _met(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: ""}[met]


def table(rows: Sequence[Row]) -> str:
    """*rows* as an aligned text table."""
    head = [
        "bench",
        "case",
        "loop",
        "N",
        "variant",
        "p50",
        "p99",
        "n",
        "vs",
        "xp50",
        "xp99",
        "target",
        "",
    ]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r.benchmark,
                r.case,
                r.loop,
                "" if r.n is None else str(r.n),
                r.variant,
                fmt_value(r.p50_ns, r.unit),
                fmt_value(r.p99_ns, r.unit),
                str(r.samples),
                r.baseline or "",
                fmt_ratio(r.ratio_p50),
                fmt_ratio(r.ratio_p99),
                r.target or "",
                _met(r.met),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    right = {3, 5, 6, 7, 9, 10}
    out = []
    for j, line in enumerate(lines):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def print_table(rows: Sequence[Row], title: str | None = None) -> None:
    """Print *rows* (with an optional title) to stdout."""
    if title:
        print(f"\n== {title}")
    print(table(rows), flush=True)


def rows_from_json(data: Mapping[str, Any]) -> list[Row]:
    """The rows of a results file written by :func:`write_json`."""
    known = set(Row.__dataclass_fields__)
    return [Row(**{k: v for k, v in r.items() if k in known}) for r in data.get("rows", [])]


# ------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Python, anyio, uvloop, kill_switch versions, CPU, load, date: the block every
    result file carries."""
    try:
        load: list[float] | None = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "anyio": _version("anyio"),
        "uvloop": _version("uvloop"),
        "kill_switch": _version("kill-switch"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg": load,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def environment_line(env: Mapping[str, Any]) -> str:
    """:func:`environment` in one line."""
    return (
        f"Python {env['python']}, anyio {env['anyio']}, uvloop {env['uvloop']}, "
        f"{env['cpus']}x {env['cpu']}, load {env['loadavg']}, {env['date']}"
    )


def write_json(
    path: str | os.PathLike[str],
    benchmark: str,
    rows: Sequence[Row],
    *,
    quick: bool,
    **extra: Any,
) -> None:
    """Write *rows* with the environment block to *path* (creating its folder)."""
    data = {
        "benchmark": benchmark,
        "quick": quick,
        "environment": environment(),
        "rows": [asdict(r) for r in rows],
        **extra,
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------ per-call overheads


def per_call_rows(
    benchmark: str,
    loop: str,
    batch: int,
    samples: Mapping[str, list[float]],
    baselines: Mapping[str, str],
    *,
    target: tuple[str, str, float] | None = None,
) -> list[Row]:
    """Per-call rows from batch timings, each with the extra ns per call over its baseline.

    *samples* are ns per batch of *batch* calls, by variant; *baselines* maps a variant to
    the variant it is compared to (baselines themselves are absent). *target* is
    ``(variant, text, max extra p50 ns)``: that row states the target and whether it met it.
    """
    stats = {name: summarize([v / batch for v in vs]) for name, vs in samples.items()}
    rows = []
    for name, st in stats.items():
        base = baselines.get(name)
        row = make_row(
            benchmark,
            "per call",
            name,
            loop,
            None,
            st,
            baseline=(base, stats[base]) if base else None,
            batch=batch,
        )
        if base is not None:
            row.extra["extra_p50_ns"] = st.p50 - stats[base].p50
            row.extra["extra_p99_ns"] = st.p99 - stats[base].p99
        if target is not None and name == target[0]:
            row.target = target[1]
            row.met = row.extra["extra_p50_ns"] <= target[2]
        rows.append(row)
    return rows


def print_extra(rows: Sequence[Row]) -> None:
    """The table, plus the extra ns per call of each row over its baseline."""
    print_table(rows)
    width = max((len(r.variant) for r in rows), default=0)
    for r in rows:
        if "extra_p50_ns" in r.extra:
            print(
                f"  {r.loop:8} {r.variant:{width}} +{r.extra['extra_p50_ns']:.0f} ns/call p50, "
                f"+{r.extra['extra_p99_ns']:.0f} ns/call p99 over {r.baseline}"
            )


def per_call_main(
    argv: list[str] | None,
    description: str | None,
    benchmark: str,
    title: str,
    bench: Callable[[str, bool, int], Awaitable[list[Row]]],
) -> int:
    """The command line of a per-call benchmark: ``--batch`` (calls per sample) and the
    common options; runs ``bench(loop, quick, batch)`` on each loop, prints a summary."""
    parser = make_parser(description)
    parser.add_argument("--batch", type=int, default=1000, help="calls per sample")
    args = parser.parse_args(argv)
    print(f"{title}   [{environment_line(environment())}]")
    rows: list[Row] = []
    for loop in parse_loops(args.loops):
        rows += run_on(loop, bench, loop, args.quick, args.batch)
    print(f"\n== {benchmark} summary")
    print_extra(rows)
    if args.json:
        write_json(args.json, benchmark, rows, quick=args.quick)
    return 0


# ------------------------------------------------------------------- command line


def run_loops(
    args: argparse.Namespace,
    benchmark: str,
    title: str,
    summary: str,
    bench: Callable[..., Awaitable[list[Row]]],
    *bench_args: Any,
    **extra: Any,
) -> list[Row]:
    """A benchmark's run once its *args* are parsed: *title* with the environment,
    ``bench(loop, *bench_args)`` on each loop, the *summary* table, and the results
    file (with *extra*) if ``--json`` asked for one. Returns the rows."""
    print(f"{title}   [{environment_line(environment())}]")
    rows: list[Row] = []
    for loop in parse_loops(args.loops):
        rows += run_on(loop, bench, loop, *bench_args)
    print_table(rows, summary)
    if args.json:
        write_json(args.json, benchmark, rows, quick=args.quick, **extra)
    return rows


def make_parser(description: str | None) -> argparse.ArgumentParser:
    """The common options: ``--json PATH``, ``--quick``, ``--loops``."""
    parser = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: fewer repetitions, smaller N"
    )
    parser.add_argument(
        "--loops",
        default=",".join(LOOPS),
        help="comma-separated event loops to run on (default: %(default)s)",
    )
    return parser


def parse_loops(spec: str) -> list[str]:
    """``"asyncio,uvloop"`` → the loops that can run here (uvloop skipped if missing)."""
    loops = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        try:
            loop_factory(name)
        except ImportError:
            print(f"note: {name} is not installed; skipping it", file=sys.stderr)
            continue
        loops.append(name)
    return loops
