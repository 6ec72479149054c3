"""A stage-1 epoch with the latent cache vs recomputing the plan-conditioned states each step.

    python benchmarks/latent_cache.py [--batch-size 64] [--steps 0 (= one epoch)]

Both variants run the same stage-1 step (hyper-network, guided forward/backward, losses,
optimizer) on the same batches; only where the targets come from differs.
"""

from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch

from _common import DATA, report, require
from pilot.config import GuidanceParams, LatentsParams
from pilot.latents import CachedLatents, LatentCache, RecomputedLatents, plan_cache_build, select_examples
from pilot.models import load_causal_lm
from pilot.training.common import sample_batch
from pilot.training.stage1 import GuidedStudent, stage1_losses
from pilot.guidance import HyperNetwork


def epoch(student, hypernet, source, examples, align_layers, batch_size, steps) -> float:
    hypernet = copy.deepcopy(hypernet).train()
    guided = GuidedStudent(student, hypernet)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=1e-3)
    questions, answers = examples["question"].tolist(), examples["answer"].tolist()
    started = time.perf_counter()
    for step in range(steps):
        index = torch.tensor(sample_batch(len(examples), batch_size, 0, step))
        batch = source.batch(index, "cpu")
        vectors = hypernet(batch.query_states, batch.query_mask)
        rows = index.tolist()
        terms = stage1_losses(guided, batch, vectors, [questions[i] for i in rows], [answers[i] for i in rows],
                              align_layers, 0.1)
        (terms["alignment"] + terms["contrastive"] + terms["lm"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    guided.remove()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=0)
    args = parser.parse_args()

    student = load_causal_lm(require(DATA / "06_models/student", "The student"))
    cache = LatentCache(require(DATA / "05_model_input/latent_cache", "The latent cache"))
    hypernet = HyperNetwork.load(require(DATA / "06_models/hypernet_stage1", "The stage-1 hyper-network"))
    plans = pd.read_parquet(DATA / "04_feature/teacher_plans.parquet")
    tasks = pd.concat([pd.read_parquet(DATA / f"03_primary/tasks_{s}.parquet") for s in ("train", "val")])
    settings = cache.manifest["settings"]
    site = GuidanceParams(read_layer=settings["read_layer"], inject_layer=settings["inject_layer"],
                          align_layers=settings["align_layers"], reader=hypernet.config.reader)
    latents = LatentsParams(shard_size=settings["shard_size"], dtype=settings["dtype"])
    build = plan_cache_build(plans, tasks, student, site, latents)
    cache.check_fingerprint(build.fingerprint)
    examples = select_examples(plans, tasks, latents.splits)
    steps = args.steps or len(examples) // args.batch_size
    loaded = time.perf_counter()
    cached = CachedLatents(cache.load())
    load_seconds = time.perf_counter() - loaded
    with_cache = epoch(student, hypernet, cached, examples, settings["align_layers"], args.batch_size, steps)
    recomputed = epoch(student, hypernet, RecomputedLatents(build), examples, settings["align_layers"],
                       args.batch_size, steps)
    rows = [
        {"variant": "latent cache", "steps": steps, "seconds": with_cache, "ms_per_step": 1000 * with_cache / steps},
        {"variant": "recompute each step", "steps": steps, "seconds": recomputed,
         "ms_per_step": 1000 * recomputed / steps},
    ]
    report("Latent cache vs recomputing the plan-conditioned states", rows, [
        f"Cache speed-up: {recomputed / with_cache:.2f}x per epoch ({len(examples)} examples, batch {args.batch_size}); "
        f"loading the whole cache once took {load_seconds:.2f} s ({cache.manifest['bytes'] / 2**20:.1f} MiB)."])


if __name__ == "__main__":
    main()
