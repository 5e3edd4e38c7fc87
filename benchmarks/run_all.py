"""Run every ``benchmarks/bench_*.py``, each in its own interpreter, then one combined table.

    .venv/bin/python -m benchmarks.run_all            # full run, JSON in benchmarks/results/
    .venv/bin/python -m benchmarks.run_all --quick    # smoke run, JSON in a temporary folder
    python benchmarks/run_all.py --only fanout --only guard

Whatever ``bench_*.py`` exists is run (scripts added later included) as
``python benchmarks/bench_x.py --json <results>/bench_x.json [--quick]`` with the
repository root on ``PYTHONPATH``; ``--quick`` is passed only to scripts that accept it.
Result files in the ``_harness`` format (a ``rows`` list of :class:`_harness.Row`) go
into the combined table; other formats are summarised as they are. The exit status is
non-zero if any script failed.

Among them ``bench_e2e`` (a realistic session killed without load, under HTTP polling
and beside a CPU-bound sibling, every plane, against the raw critical-path floor) and
``bench_scaling`` (kill latency vs tool calls and sessions),
which also draws ``docs/perf/kill_latency.png`` in a full run; with ``--quick`` its plot
goes beside its JSON in the results folder, so a smoke run never replaces the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as h

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def discover(only: list[str] | None) -> list[Path]:
    """The benchmark scripts to run, by name (``fanout`` or ``bench_fanout``)."""
    scripts = sorted(HERE.glob("bench_*.py"))
    if only:
        wanted = {o if o.startswith("bench_") else f"bench_{o}" for o in only}
        wanted = {w.removesuffix(".py") for w in wanted}
        scripts = [s for s in scripts if s.stem in wanted]
    return scripts


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def accepts(script: Path, option: str) -> bool:
    """Whether *script*'s ``--help`` mentions *option*."""
    try:
        out = subprocess.run(
            [sys.executable, str(script), "--help"],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=ROOT,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return option in out.stdout


def run_one(
    script: Path, out: Path, *, quick: bool, timeout: float, extra: list[str]
) -> tuple[int, float]:
    """Run one script (its output streams through); return (exit status, seconds)."""
    cmd = [sys.executable, str(script), "--json", str(out)]
    if quick:
        if accepts(script, "--quick"):
            cmd.append("--quick")
        else:
            print(f"note: {script.name} has no --quick; running it in full", flush=True)
    cmd += extra
    print(f"\n##### {script.name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    try:
        rc = subprocess.run(cmd, env=_env(), cwd=ROOT, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"##### {script.name}: timed out after {timeout:.0f} s", flush=True)
        rc = -1
    return rc, time.monotonic() - t0


def summarise_foreign(data: Any, limit: int = 40) -> list[str]:
    """A few lines for a results file that is not in the ``_harness`` format."""
    lines: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if len(lines) >= limit:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                if k in ("environment", "env"):
                    continue
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            lines.append(f"  {prefix} = {value}")

    walk("", data)
    if len(lines) >= limit:
        lines.append("  ...")
    return lines


def _plot_of(path: Path) -> str | None:
    """The plot a results file says its script drew (``"plot"``), if any."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    plot = data.get("plot") if isinstance(data, dict) else None
    return plot if isinstance(plot, str) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every script")
    parser.add_argument("--only", action="append", help="run only this benchmark (repeatable)")
    parser.add_argument(
        "--results",
        help="folder for the JSON files (default: benchmarks/results, "
        "or a temporary folder with --quick)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per script")
    parser.add_argument("--loops", help="passed on to scripts that accept --loops")
    args = parser.parse_args(argv)

    if args.results:
        results = Path(args.results)
    elif args.quick:
        results = Path(tempfile.mkdtemp(prefix="kill_switch-bench-"))
    else:
        results = HERE / "results"
    results.mkdir(parents=True, exist_ok=True)

    scripts = discover(args.only)
    if not scripts:
        print("no benchmark scripts found", file=sys.stderr)
        return 2
    env = h.environment()
    print(f"running {len(scripts)} benchmark(s) into {results}   [{h.environment_line(env)}]")

    status: dict[str, tuple[int, float]] = {}
    for script in scripts:
        extra = []
        if args.loops and accepts(script, "--loops"):
            extra = ["--loops", args.loops]
        out = results / f"{script.stem}.json"
        if out.exists():
            out.unlink()
        status[script.stem] = run_one(
            script, out, quick=args.quick, timeout=args.timeout, extra=extra
        )

    rows: list[h.Row] = []
    foreign: dict[str, list[str]] = {}
    for stem in status:
        path = results / f"{stem}.json"
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            new = h.rows_from_json(data) if isinstance(data, dict) else []
        except (ValueError, TypeError):
            new = []
            data = None
        if new:
            rows += new
        else:
            foreign[stem] = summarise_foreign(data)

    print("\n" + "=" * 100)
    print(f"combined results   [{h.environment_line(env)}]")
    if rows:
        print(h.table(rows))
    for stem, lines in foreign.items():
        print(f"\n-- {stem} (own format)")
        print("\n".join(lines))
    print("\nscripts:")
    failed = 0
    for stem, (rc, secs) in status.items():
        print(f"  {stem:24} {'ok' if rc == 0 else f'FAILED ({rc})':12} {secs:7.1f} s")
        failed += rc != 0
    missed = [r for r in rows if r.met is False]
    if missed:
        print(f"\n{len(missed)} target(s) missed:")
        for r in missed:
            print(
                f"  {r.benchmark} {r.case} {r.loop} N={r.n} {r.variant}: "
                f"{h.fmt_value(r.p50_ns, r.unit)} p50 ({h.fmt_ratio(r.ratio_p50)}), "
                f"target {r.target}"
            )
    for stem in status:
        plot = _plot_of(results / f"{stem}.json")
        if plot:
            print(f"plot of {stem}: {plot}")
    print(f"\nJSON results in {results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
