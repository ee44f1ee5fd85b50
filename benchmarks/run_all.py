"""Run every ``benchmarks/bench_*.py`` and write ``docs/benchmarks.md`` (``make bench``).

Each module's ``run(quick)`` returns :class:`benchmarks.common.Figure` objects; a module that
fails is reported as failed in the table rather than stopping the others.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import Figure, machine

HERE = Path(__file__).resolve().parent


def _load(path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"benchmarks.{path.stem}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fmt(v: float) -> str:
    if v == 0 or 0.01 <= abs(v) < 1e5:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:.3e}"


def render(figures: list[Figure], failures: dict[str, str], info: dict, seconds: float) -> str:
    """The markdown page."""
    gpu = info["gpu"] or "none"
    lines = [
        "# fedmed benchmarks",
        "",
        f"Written by `make bench` on {info['date']}: {info['cores']} cores ({info['cpu']}), "
        f"{info['memory_gib']} GiB memory, GPU: {gpu}; Python {info['python']}, "
        f"torch {info['torch']}; {seconds:.0f} s in all.",
        "",
        "Every figure is a ratio measured side by side in one run, or a count; the target says "
        "what the project holds itself to.",
        "",
        "| benchmark | figure | value | unit | target | met | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        met = {True: "yes", False: "**no**", None: "-"}[f.met]
        lines.append(
            f"| {f.benchmark} | {f.name} | {_fmt(f.value)} | {f.unit} | {f.target} | {met} | "
            f"{f.detail} |"
        )
    for name, err in failures.items():
        lines.append(f"| {name} | (failed) | - | - | - | **no** | {err} |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    """Run the benchmarks named (default all) and write the page."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument(
        "--update",
        action="store_true",
        help="keep the other benchmarks' figures on an existing page; replace those re-run",
    )
    ap.add_argument("only", nargs="*", help="benchmark names (e.g. bench_cache)")
    args = ap.parse_args()
    started = time.perf_counter()
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    info = machine()
    kept: list[Figure] = []
    if args.update and args.out.with_suffix(".json").is_file():
        old = json.loads(args.out.with_suffix(".json").read_text())
        kept = [Figure(**f) for f in old["figures"]]
        failures = {k: v for k, v in old.get("failures", {}).items() if k not in args.only}
    paths = [p for p in sorted(HERE.glob("bench_*.py")) if not args.only or p.stem in args.only]
    # Figures of the benchmarks being re-run are replaced; the others are kept (--update).
    rerun_names = {p.stem.removeprefix("bench_") for p in paths}
    kept = [f for f in kept if f.benchmark not in rerun_names]
    for done, path in enumerate(paths):
        # The page is rewritten after every benchmark, so an interrupted run keeps its figures.
        pending = [p.stem for p in paths[done:]]
        _write(args.out, kept + figures, failures, info, started, pending=pending)
        print(f"== {path.stem}", flush=True)
        try:
            got = _load(path).run(quick=args.quick)
        except Exception as exc:  # one failing benchmark must not hide the others
            traceback.print_exc()
            failures[path.stem] = f"{type(exc).__name__}: {exc}".replace("|", "/")[:300]
            continue
        for f in got:
            print(f"   {f.name}: {_fmt(f.value)} {f.unit} (target {f.target}, met {f.met})")
        figures.extend(got)
    rerun = {f.benchmark for f in figures}
    figures = [f for f in kept if f.benchmark not in rerun] + figures
    _write(args.out, figures, failures, info, started, pending=[])
    print(f"wrote {args.out}")
    return 1 if failures else 0


def _write(
    out: Path,
    figures: list[Figure],
    failures: dict[str, str],
    info: dict,
    started: float,
    pending: list[str],
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render(figures, failures, info, time.perf_counter() - started)
    if pending:
        page += f"\n(still running or not run: {', '.join(pending)})\n"
    out.write_text(page)
    record = {"machine": info, "figures": [f.as_dict() for f in figures]}
    record |= {"failures": failures, "pending": pending}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
