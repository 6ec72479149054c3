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
import yaml

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


def base_parameters() -> dict:
    """``conf/base``'s parameters, every ``parameters*.yml`` merged by top-level key (as Kedro does)."""
    merged = {}
    for path in sorted((ROOT / "conf/base").glob("parameters*.yml")):
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


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


# ------------------------------------------------------------------------------ the real stage-1 step
def env_config(env: str, name: str) -> dict:
    """``env``'s ``name`` configuration (``parameters``, ``globals``, ...) as a run reads it: conf/base,
    or conf/<env> over it."""
    from kedro.config import OmegaConfigLoader

    from pilot.settings import CONFIG_LOADER_ARGS

    return OmegaConfigLoader(str(ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)[name]


def project_settings(env: str = "base") -> dict:
    """The project's typed parameters for ``env`` (conf/base, or conf/<env> over it)."""
    from pilot.framework.hooks import validate_parameters

    return validate_parameters(env_config(env, "parameters"))


def configured_generation(env: str = "base", **changes):
    """``env``'s decoding settings (its ``generation`` block: what a run answers with), with each of
    ``changes`` that is not None laid over them (a benchmark's ``--batch-size``, ``--max-new-tokens``)."""
    generation = project_settings(env)["generation"]
    return generation.model_copy(update={key: value for key, value in changes.items() if value is not None})


def synthetic_stage1(hidden: int, layers: int, terms: int, examples: int = 160, device: str = "cpu",
                     dtype: str = "float32", env: str = "base"):
    """A randomly initialised Llama student of the given size and a latent cache of chain_sum
    examples with ``terms`` terms (longer expressions: longer plans and sequences).

    The guidance site and the cache settings are ``env``'s configured ones (the PILOT a run
    trains), with the injection moved to the student's middle layer so that every size guides the
    same relative depth. Returns ``(student, cached latents, examples, site)`` for
    :func:`stage1_seconds_per_step`.
    """
    import tempfile

    from pilot.latents import CachedLatents, LatentCache, plan_cache_build, select_examples, write_cache
    from pilot.models import build_causal_lm, train_tokenizer
    from pilot.prompts import answer_prompt, continuation
    from pilot.tasks import build_task_table

    table = build_task_table([{"name": "chain_sum", "size": examples, "kwargs": {
        "min_terms": terms, "max_terms": terms, "min_digits": 1, "max_digits": 1}}], 8, 8, seed=0)
    tokenizer = train_tokenizer([answer_prompt(q, p) + continuation(a) for q, p, a in
                                 zip(table["question"], table["oracle_plan"], table["answer"])], 400)
    student = build_causal_lm(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=max(2, hidden // 64),
                              max_positions=512)
    student.model.to(device=device, dtype=getattr(torch, dtype))
    plans = table[["id", "task", "split"]].assign(plan=table["oracle_plan"], kept=True)
    settings = project_settings(env)
    site = settings["guidance"].model_copy(update={"inject_layer": layers // 2})
    site.check_against(layers, hidden)   # e.g. the attention reader's heads must divide this student's width
    latents = settings["latents"]
    with tempfile.TemporaryDirectory() as folder:
        write_cache(plan_cache_build(plans, table, student, site, latents), folder)
        cached = CachedLatents(LatentCache(folder).load())
    return student, cached, select_examples(plans, table), site


def stage1_seconds_per_step(student, latents, examples, site, config, generation, warmup_steps: int = 1) -> float:
    """Seconds per step of the real stage-1 training (:func:`pilot.training.engine.train` on
    :func:`pilot.training.stage1.stage1_objective`: loss weights, schedule, clipping and all),
    after ``warmup_steps`` untimed steps, for any source of latents (cached or recomputed)."""
    from pilot.guidance import GuidedStudent, make_hypernet
    from pilot.training.engine import train
    from pilot.training.stage1 import stage1_objective

    align_layers = site.resolved_align_layers(student.num_layers)
    seconds = []
    for steps in (warmup_steps, config.steps):
        if steps == 0:
            continue
        hypernet = make_hypernet(site, student.hidden_size, student.num_layers, 0).to(student.device)
        run = config.model_copy(update={"steps": steps})
        with GuidedStudent(student, hypernet) as guided:
            objective = stage1_objective(guided, latents, examples, align_layers, run, generation)
            started = time.perf_counter()
            train(hypernet, objective, run, name="timed stage-1 steps")
            if student.device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append((time.perf_counter() - started) / steps)
    return seconds[-1]
