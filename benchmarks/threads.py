"""Seconds per training step under each CPU thread setting, on an idle machine and beside one busy job.

    python benchmarks/threads.py [--steps 8] [--repeats 4] [--loads idle loaded] [--wait-quiet SECONDS]

The workload is the default run's first training: the embedded student (conf/base: 128 wide,
2 layers, batch 64, plan loss) trained on the default tasks by the project's own
:func:`pilot.training.base_lm.train_causal_lm`, a few steps after two untimed ones. Each setting
runs in a fresh subprocess, because OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads it.
"Loaded" means one single-threaded busy loop (``while True: pass``) that this script starts
beside the workload and stops after it. Settings are interleaved (A B C A B C ...) so the drift of
a shared machine hits all alike; the median and the fastest repeat are reported, with the cores other
processes kept busy meanwhile. The default thread policy must be, idle, within 10 % of the best
setting and, beside the busy job, at most 1.5x the best; the tables mark which settings are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pilot.runtime import available_cores, configure_threads

HERE = Path(__file__).resolve().parent

# (label, torch threads (None: `threads: null`, the cores other processes leave free), extra environment).
SETTINGS = [
    ("1 thread (`threads: 1`)", 1, {}),
    ("2 threads, OpenMP's default wait (spins)", 2, {}),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE (sleeps)", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("shared cores (`threads: null`), spinning wait", None, {}),
    ("shared cores (`threads: null`), PASSIVE wait", None, {"OMP_WAIT_POLICY": "PASSIVE"}),
]


def project_policy() -> str:
    """The OMP_WAIT_POLICY a `kedro run` process has when torch loads (the project's settings loaded first)."""
    probe = "import os, pilot.settings; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env=_clean_env({})).stdout.strip().splitlines()[-1]


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))}
    env["KEDRO_DISABLE_TELEMETRY"] = "1"
    return {**env, **extra}


def worker(threads: int | None, steps: int, warmup: int) -> None:
    """One measurement, in this process: prints ``{"seconds_per_step": ...}``."""
    import logging

    import torch

    from _common import base_parameters
    from pilot.config import LMTrainConfig
    from pilot.models import build_causal_lm, train_tokenizer
    from pilot.prompts import TOY, answer_prompt, continuation
    from pilot.tasks import build_task_table
    from pilot.training.base_lm import student_examples, train_causal_lm

    logging.disable(logging.INFO)
    count = configure_threads(threads)
    params = base_parameters()
    tasks = [{**task, "size": 600} for task in params["data"]["tasks"]]
    for task in tasks:
        task.pop("ood_kwargs", None)
    table = build_task_table(tasks, val_per_task=10, test_per_task=10, seed=0)
    train = table[table["split"] == "train"]
    spec = params["base"]["student"]
    tokenizer = train_tokenizer([answer_prompt(q, p) + continuation(a) for q, p, a in
                                 zip(train["question"], train["oracle_plan"], train["answer"])],
                                params["base"]["tokenizer"]["vocab_size"])
    lm = build_causal_lm(tokenizer, family=spec["family"], hidden_size=spec["hidden_size"],
                         num_layers=spec["num_layers"], num_heads=spec["num_heads"],
                         max_positions=spec["max_positions"], seed=0)
    examples = student_examples(train.to_dict("records"), spec["plan_loss"], TOY)
    config = LMTrainConfig(**{**spec["training"], "warmup_steps": 0})
    train_causal_lm(lm, examples, config.model_copy(update={"steps": warmup}), "warm-up")
    busy_before, own_before, started = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    train_causal_lm(lm, examples, config.model_copy(update={"steps": steps, "seed": 1}), "timed")
    wall = time.perf_counter() - started
    others = (machine_busy_seconds() - busy_before - (own_cpu_seconds() - own_before)) / wall
    print(json.dumps({"seconds_per_step": wall / steps, "threads": count, "torch_threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "other_cores_busy": others}))


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has spent so far (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


def own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(threads: int | None, env: dict[str, str], steps: int, warmup: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker",
               "--steps", str(steps), "--warmup", str(warmup)]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=_clean_env(env), cwd=HERE)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def busy_job() -> subprocess.Popen:
    """One single-threaded competing job: a Python busy loop, one core at 100 %."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def others_busy(seconds: float = 3.0) -> float:
    """Cores the machine keeps busy over ``seconds`` while this script only waits (other people's jobs)."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - before) / seconds


def wait_until_quiet(limit_s: float, threshold: float = 0.2) -> float:
    """Wait (at most ``limit_s``) until other processes keep less than ``threshold`` cores busy; their load."""
    deadline = time.monotonic() + limit_s
    while (busy := others_busy()) >= threshold and time.monotonic() < deadline:
        pass
    return busy


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats of every setting")
    parser.add_argument("--loads", nargs="+", choices=["idle", "loaded"], default=["idle", "loaded"])
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement wait (at most this long) until other processes keep less "
                             "than 0.2 cores busy, for an idle baseline on a shared machine")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.threads, args.steps, args.warmup)

    settings = SETTINGS
    print(f"`kedro run` (threads: null) shares {available_cores()} cores with other processes; OMP_WAIT_POLICY="
          f"{project_policy()}", flush=True)
    print(f"load average before: {load_average()} (1, 5, 15 min), {os.cpu_count()} CPUs", flush=True)
    results: dict[tuple[str, str], list[float]] = {}
    others: dict[tuple[str, str], list[float]] = {}   # cores the rest of the machine kept busy meanwhile
    for load in args.loads:
        competitor = busy_job() if load == "loaded" else None
        try:
            time.sleep(1.0 if competitor else 0.0)
            for repeat in range(args.repeats):
                for label, threads, env in settings:
                    if args.wait_quiet and competitor is None:
                        wait_until_quiet(args.wait_quiet)
                    result = measure(threads, env, args.steps, args.warmup)
                    results.setdefault((load, label), []).append(result["seconds_per_step"])
                    others.setdefault((load, label), []).append(result["other_cores_busy"])
                    print(f"{load:6s} #{repeat} {label:40s} {result['seconds_per_step']:.3f} s/step "
                          f"(torch threads {result['torch_threads']}, OMP_WAIT_POLICY="
                          f"{result['omp_wait_policy'] or 'unset'}; other processes busy "
                          f"{result['other_cores_busy']:.2f} cores; load {load_average()})", flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    print(f"load average after: {load_average()}")

    # The rule for the default: idle within 10 % of the best idle setting, and beside the busy job at
    # most 1.5x the best setting under that load; judged on the medians, and on the fastest repeat of
    # each (the one other jobs disturbed least).
    for statistic, reduce in (("median", statistics.median), ("fastest repeat", min)):
        value = {key: reduce(values) for key, values in results.items()}
        best = {load: min(v for (l, _), v in value.items() if l == load) for load in args.loads}
        print(f"\n{statistic} of {args.repeats} repeats, seconds per step:\n")
        print("| setting | " + " | ".join(f"{load} | ÷ best {load}" for load in args.loads) + " | within bounds |")
        print("|" + " --- |" * (2 * len(args.loads) + 2))
        for label, _, _ in settings:
            cells, meets = [], True
            for load, bound in (("idle", 1.10), ("loaded", 1.5)):
                if load in args.loads:
                    ratio = value[(load, label)] / best[load]
                    cells += [f"{value[(load, label)]:.3f}", f"{ratio:.2f}"]
                    meets = meets and ratio <= bound
            print(f"| {label} | " + " | ".join(cells) + f" | {'yes' if meets else 'no'} |")
    for load in args.loads:
        busy = [v for (l, _), values in others.items() if l == load for v in values]
        print(f"\nOther processes kept {statistics.median(busy):.2f} cores busy (median; range "
              f"{min(busy):.2f}-{max(busy):.2f}) during the {load} measurements"
              + (" (the busy job included)." if load == "loaded" else "."))
    print("\n" + json.dumps({"title": "Threads: idle and under load",
                             "rows": {f"{load} / {label}": values for (load, label), values in results.items()}}))


if __name__ == "__main__":
    main()
