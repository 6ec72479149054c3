"""Shared set-up for the benchmark scripts: the default run's models when they exist.

Benchmarks print their figures; they are not tests and assert nothing about speed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()} ({os.cpu_count()} CPUs, {cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved(fns: dict[str, callable], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time several callables in turn (A B A B ...) so drift on a noisy machine hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise SystemExit(f"{what} not found at {path}: run `kedro run` (or `make run`) first.")
    return path


def report(title: str, rows: list[dict], notes: list[str] = ()) -> None:
    print(f"\n## {title}\n\nmachine: {machine()}\n")
    if rows:
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "|".join(" --- " for _ in keys) + "|")
        for row in rows:
            print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    for note in notes:
        print(f"\n{note}")
    print("\n" + json.dumps({"title": title, "rows": rows}, default=str))
