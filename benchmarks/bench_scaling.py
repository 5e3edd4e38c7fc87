"""Scaling: kill latency vs the number of parked tool calls and of sessions, and its plot.

Two curves, each point against its raw floor measured in the same run, interleaved:

* **tool calls** — one session with N tool calls parked (``session.start_soon``),
  N = 1, 10, 100, 1 000, 10 000: ``session.interrupt()`` + ``await handle`` until the
  StopReport, vs N raw asyncio tasks parked on futures, ``cancel()`` + ``gather``.
* **sessions** — M sessions, each parked in its body (M = 1, 10, 100, 1 000):
  ``runtime.interrupt_all()`` until every handle resolved, vs M raw tasks each parked
  in its own anyio ``CancelScope`` (what a session holds), ``scope.cancel()`` +
  ``gather``.

Set-up (session entered, calls parked) and tear-down stay outside the timed window. The
runtime has no audit sink: this measures the stop itself (``bench_e2e`` has the audit).
No targets: the curves are for the README's Performance section.

The plot — kill latency vs N (log-log), p50 lines with p99 dotted, kill_switch beside
the raw floor, asyncio and uvloop — is written to ``docs/perf/kill_latency.png`` (with
``--quick``: beside the ``--json`` file, so a smoke run never replaces the committed
figure; ``--plot PATH`` chooses). It needs matplotlib (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

import kill_switch as ks
from benchmarks import _harness as h

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

NAME = "scaling"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLOT = ROOT / "docs" / "perf" / "kill_latency.png"

CALLS = (1, 10, 100, 1_000, 10_000)
SESSIONS = (1, 10, 100, 1_000)
QUICK_CALLS = (1, 10, 100)
QUICK_SESSIONS = (1, 10, 100)
CASE_CALLS = "kill vs tool calls"
CASE_SESSIONS = "kill vs sessions"
KS = "kill_switch"
RAW = "raw"


def reps_for(n: int, quick: bool) -> int:
    """Kills per point: many where a kill is cheap, fewer where its set-up is not."""
    if quick:
        return 5
    return 200 if n <= 100 else 60 if n <= 1_000 else 30


# --------------------------------------------------------------------- tool calls


def call_variants(runtime: ks.Runtime, n: int) -> dict[str, Callable[[], Awaitable[float]]]:
    """One session with *n* parked calls vs *n* raw tasks; each returns one sample (ns)."""
    loop = asyncio.get_running_loop()

    async def session() -> float:
        parked = 0
        ready: asyncio.Future[ks.Session] = loop.create_future()

        async def park() -> None:
            nonlocal parked
            parked += 1
            await anyio.sleep_forever()

        async def host() -> None:
            async with runtime.session("scaling") as s:
                for _ in range(n):
                    s.start_soon(park, tool="park")
                ready.set_result(s)
                await anyio.sleep_forever()

        task = loop.create_task(host())
        s = await ready
        await h.until(lambda: parked >= n)
        with h.gc_paused():
            t0 = h.now_ns()
            report = await s.interrupt("bench", trigger="operator", operator="bench")
            t1 = h.now_ns()
        await task
        if not report.quiescent or report.tool_calls_cancelled != n:
            raise RuntimeError(f"kill of {n} calls did not stop them all:\n{report.summary()}")
        return t1 - t0

    async def raw() -> float:
        return await h.raw_kill(n)

    return {KS: session, RAW: raw}


# --------------------------------------------------------------------- sessions


def session_variants(runtime: ks.Runtime, m: int) -> dict[str, Callable[[], Awaitable[float]]]:
    """*m* parked sessions killed by ``interrupt_all`` vs *m* raw cancel scopes."""
    loop = asyncio.get_running_loop()

    async def sessions() -> float:
        parked = 0

        async def one() -> None:
            nonlocal parked
            async with runtime.session("scaling"):
                parked += 1
                await anyio.sleep_forever()

        tasks = [loop.create_task(one()) for _ in range(m)]
        await h.until(lambda: parked >= m)
        with h.gc_paused():
            t0 = h.now_ns()
            handles = runtime.interrupt_all("bench", trigger="operator", operator="bench")
            reports = [await handle for handle in handles]
            t1 = h.now_ns()
        await asyncio.gather(*tasks)
        if len(reports) != m or not all(r.quiescent for r in reports):
            raise RuntimeError(f"interrupt_all stopped {len(reports)} of {m} sessions")
        return t1 - t0

    async def raw() -> float:
        scopes: list[anyio.CancelScope] = []

        async def one() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await anyio.sleep_forever()

        tasks = [loop.create_task(one()) for _ in range(m)]
        await h.until(lambda: len(scopes) >= m)
        with h.gc_paused():
            t0 = h.now_ns()
            for scope in scopes:
                scope.cancel()
            await asyncio.gather(*tasks)
            t1 = h.now_ns()
        return t1 - t0

    return {KS: sessions, RAW: raw}


# --------------------------------------------------------------------- run


def point_rows(case: str, loop: str, n: int, samples: dict[str, list[float]]) -> list[h.Row]:
    stats = {k: h.summarize(v) for k, v in samples.items()}
    return [
        h.make_row(
            NAME,
            case,
            name,
            loop,
            n,
            st,
            baseline=None if name == RAW else (RAW, stats[RAW]),
            p95_ns=h.percentile(samples[name], 95),
            max_ns=max(samples[name]),
        )
        for name, st in stats.items()
    ]


async def bench(
    loop: str, calls: Sequence[int], sessions: Sequence[int], quick: bool
) -> list[h.Row]:
    """Every point of both curves on the running loop."""
    rows: list[h.Row] = []
    warmup = 1 if quick else 3
    async with ks.Runtime() as runtime:
        curves = ((CASE_CALLS, call_variants, calls), (CASE_SESSIONS, session_variants, sessions))
        for case, variants, points in curves:
            for n in points:
                samples = await h.interleave(
                    variants(runtime, n), reps=reps_for(n, quick), warmup=warmup
                )
                new = point_rows(case, loop, n, samples)
                h.print_table(new)
                rows += new
    return rows


# --------------------------------------------------------------------- plot


def require_matplotlib() -> str | None:
    """``None`` if matplotlib can be imported, else the message to print."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return (
            f"error: the plot needs matplotlib, which is not installed ({exc}).\n"
            "Install the bench extra:  .venv/bin/pip install -e '.[bench]'\n"
            "or run without the plot:  --no-plot"
        )
    return None


def plot(rows: Sequence[h.Row], path: Path, env: dict[str, Any]) -> None:
    """Kill latency vs N (log-log) for both cases: p50 lines, p99 dotted, both loops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    colors = {(KS, "asyncio"): "#1f77b4", (KS, "uvloop"): "#ff7f0e"}
    colors |= {(RAW, "asyncio"): "#555555", (RAW, "uvloop"): "#aaaaaa"}
    labels = {KS: "kill_switch", RAW: "raw floor"}
    cases = [
        (CASE_CALLS, "one session, N tool calls parked", "N tool calls", "interrupt → StopReport"),
        (CASE_SESSIONS, "N sessions, interrupt_all()", "N sessions", "until every handle resolved"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for ax, (case, title, xlabel, what) in zip(axes, cases, strict=True):
        for (variant, loop), color in colors.items():
            pts = sorted(
                (r.n, r.p50_ns / 1e6, r.p99_ns / 1e6)
                for r in rows
                if r.case == case and r.variant == variant and r.loop == loop and r.n
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            marker = "o" if variant == KS else "s"
            ax.plot(
                xs,
                [p[1] for p in pts],
                marker=marker,
                color=color,
                lw=2,
                label=f"{labels[variant]}, {loop} — p50",
            )
            ax.plot(
                xs,
                [p[2] for p in pts],
                ls=":",
                color=color,
                lw=1.5,
                label=f"{labels[variant]}, {loop} — p99",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"{title}\n{what}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("kill latency (ms)")
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.15)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"kill_switch kill latency vs raw asyncio floor — Python {env['python']}, "
        f"anyio {env['anyio']}, uvloop {env['uvloop']}, {env['cpus']} CPU, "
        f"{env['date'][:10]}",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_path(args: Any) -> Path | None:
    """Where the plot goes: ``--plot``, else the committed figure, else (``--quick``)
    beside the JSON or in a temporary folder."""
    if args.no_plot:
        return None
    if args.plot:
        return Path(args.plot)
    if not args.quick:
        return DEFAULT_PLOT
    if args.json:
        return Path(args.json).with_name("kill_latency.png")
    return Path(tempfile.mkdtemp(prefix="kill_switch-scaling-")) / "kill_latency.png"


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help=f"write the PNG here (default {DEFAULT_PLOT.relative_to(ROOT)}; "
        "with --quick, beside --json)",
    )
    parser.add_argument("--no-plot", action="store_true", help="measure only")
    parser.add_argument(
        "--curves",
        default="calls,sessions",
        help="which curves to measure: calls, sessions or both (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    curves = {c.strip() for c in args.curves.split(",") if c.strip()}
    if not curves or curves - {"calls", "sessions"}:
        parser.error(f"--curves takes calls and/or sessions, not {args.curves!r}")
    path = plot_path(args)
    if path is not None:
        missing = require_matplotlib()
        if missing is not None:
            print(missing, file=sys.stderr)
            return 2
    calls = (QUICK_CALLS if args.quick else CALLS) if "calls" in curves else ()
    sessions = (QUICK_SESSIONS if args.quick else SESSIONS) if "sessions" in curves else ()
    title = "scaling: kill latency vs tool calls and sessions"
    plotted = None if path is None else str(path)
    rows = h.run_loops(
        args, NAME, title, "scaling summary", bench, calls, sessions, args.quick, plot=plotted
    )
    if path is not None:
        plot(rows, path, h.environment())
        print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
