"""A stage-1 training job run as a real subprocess by the kill-and-resume tests.

    python tests/jobs/stage1_job.py WORKDIR STEPS

WORKDIR holds ``student/`` (a saved tiny model), ``tasks.parquet`` and ``plans.parquet``; the
job builds the latent cache, trains with checkpoints in WORKDIR/checkpoints and saves the best
hyper-network to WORKDIR/hypernet.
"""

import sys
from pathlib import Path

import pandas as pd
import torch

from pilot.config import GenerationParams, GuidanceParams, LatentsParams, Stage1Config
from pilot.latents import LatentCache, plan_cache_build, write_cache
from pilot.models import load_causal_lm
from pilot.training.stage1 import run_stage1


def main() -> None:
    torch.set_num_threads(1)
    workdir, steps = Path(sys.argv[1]), int(sys.argv[2])
    student = load_causal_lm(workdir / "student")
    tasks, plans = pd.read_parquet(workdir / "tasks.parquet"), pd.read_parquet(workdir / "plans.parquet")
    site = GuidanceParams(read_layer=-1, reader="attention", modulation="add", init_log_std=-1.0, mlp_hidden=16,
                          attention_heads=2)
    latents = LatentsParams(shard_size=64, batch_size=128)
    write_cache(plan_cache_build(plans, tasks, student, site, latents), workdir / "cache")
    config = Stage1Config(steps=steps, batch_size=8, rl_every=3, rl_batch=2, rl_samples=2, eval_every=10,
                          checkpoint_every=4, seed=3)
    result = run_stage1(student, LatentCache(workdir / "cache"), plans, tasks, tasks[tasks["split"] == "val"].head(8),
                        site, latents, config, GenerationParams(max_new_tokens=4, batch_size=16),
                        checkpoint_dir=str(workdir / "checkpoints"))
    result.model.save(workdir / "hypernet")
    pd.DataFrame(result.history).to_parquet(workdir / "history.parquet")


if __name__ == "__main__":
    main()
