"""Stage-1 steps with the latent cache vs recomputing the plan-conditioned states each step.

    python benchmarks/latent_cache.py [--steps 40]

Both variants run the real stage-1 step (the training engine on stage 1's objective, with the
default run's loss weights, schedule and clipping) on the same batches; only where the targets
come from differs.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from _common import DATA, project_settings, report, require, stage1_seconds_per_step
from pilot.latents import CachedLatents, LatentCache, RecomputedLatents, plan_cache_build, select_examples
from pilot.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    settings = project_settings()
    site, latents, generation = settings["guidance"], settings["latents"], settings["generation"]
    config = settings["stage1"].training.model_copy(update={"steps": args.steps})
    student = load_causal_lm(require(DATA / "06_models/student", "The student"))
    cache = LatentCache(require(DATA / "05_model_input/latent_cache", "The latent cache"))
    plans = pd.read_parquet(DATA / "04_feature/teacher_plans.parquet")
    tasks = pd.concat([pd.read_parquet(DATA / f"03_primary/tasks_{s}.parquet") for s in ("train", "val")])
    build = plan_cache_build(plans, tasks, student, site, latents)
    cache.check_fingerprint(build.fingerprint)
    examples = select_examples(plans, tasks)
    loaded = time.perf_counter()
    cached = CachedLatents(cache.load())
    load_seconds = time.perf_counter() - loaded
    rows = []
    for variant, source in (("latent cache", cached), ("recompute each step", RecomputedLatents(build))):
        seconds = stage1_seconds_per_step(student, source, examples, site, config, generation)
        rows.append({"variant": variant, "steps": args.steps, "ms_per_step": 1000 * seconds})
    speedup = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
    report("Latent cache vs recomputing the plan-conditioned states", rows, [
        f"Cache speed-up: {speedup:.2f}x per step ({len(examples)} examples, batch {config.batch_size}, latent RL "
        f"every {config.rl_every} steps); loading the whole cache once took {load_seconds:.2f} s "
        f"({cache.manifest['bytes'] / 2**20:.1f} MiB)."])


if __name__ == "__main__":
    main()
