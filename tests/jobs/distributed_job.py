"""A data-parallel training job for the tests, started by torchrun with any number of processes.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/jobs/distributed_job.py \
        {stage1,lora,stage2} WORKDIR OUT STEPS

WORKDIR holds ``student/`` (a saved tiny model), ``tasks.parquet``, ``plans.parquet`` and ``cache/`` (the
latent cache); the job trains with checkpoints in OUT/checkpoints (gloo, one thread per process) and rank
0 writes the trained module's last weights to OUT/weights.safetensors and its history to OUT/history.json.
"""

import json
import logging
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from pilot import distributed
from pilot.config import GenerationParams, GuidanceParams, LatentsParams, LMTrainConfig, Stage1Config, Stage2Config
from pilot.guidance import make_hypernet
from pilot.latents import LatentCache
from pilot.methods.lora import train_lora
from pilot.models import load_causal_lm
from pilot.training import stage2
from pilot.training.stage1 import run_stage1
from pilot.training.stage2 import run_stage2

GENERATION = GenerationParams(max_new_tokens=4, batch_size=16)
SITE = GuidanceParams(read_layer=-1, reader="mean", modulation="add", init_log_std=-1.0, mlp_hidden=16,
                      attention_heads=2)
LATENTS = LatentsParams(shard_size=64, batch_size=128)


def main() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)   # the run says when it resumed
    what, workdir, out, steps = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    ranks = distributed.init_from_env("gloo", timeout_s=60)
    student = load_causal_lm(workdir / "student")
    tasks, plans = pd.read_parquet(workdir / "tasks.parquet"), pd.read_parquet(workdir / "plans.parquet")
    val_rows = tasks[tasks["split"] == "val"].head(8)
    if what == "stage1":
        config = Stage1Config(steps=steps, batch_size=8, learning_rate=3e-3, warmup_steps=1, rl_every=2, rl_batch=3,
                              rl_samples=2, eval_every=4, checkpoint_every=2, seed=3)
        result = run_stage1(student, LatentCache(workdir / "cache"), plans, tasks, val_rows, SITE, LATENTS, config,
                            GENERATION, checkpoint_dir=str(out / "checkpoints"))
        last = sorted((out / "checkpoints").glob("*/step-*"))[-1]   # the last step's weights, not the best's
        weights = {k[len("model."):]: v for k, v in load_file(last / "weights.safetensors").items()
                   if k.startswith("model.")}
    elif what == "stage2":
        # Greedy rollouts (the same replies however the groups are dealt) in a stand-in environment: the tiny
        # random student answers every question alike and never right, so each row's reply is cut to a length
        # and scored by a rule of the row's id. Right replies of different lengths on each rank is what tests
        # self-supervision's token weighting.
        answer_and_score = stage2.answer_and_score

        def stand_in_environment(student, rows, **kwargs):
            scored = answer_and_score(student, rows, **kwargs)
            code = [sum(map(ord, row_id)) for row_id in rows["id"]]
            return scored.assign(reply=[reply[:1 + c % 4] for reply, c in zip(scored["reply"], code)],
                                 correct=[c % 3 != 0 for c in code])

        stage2.answer_and_score = stand_in_environment
        # every group: with greedy rollouts each reply is the greedy one, so greedy-wrong groups hold no right reply
        config = Stage2Config(steps=steps, batch_size=6, group_size=2, rollout_temperature=0.0, dynamic_sampling=False,
                              policy_groups="all", learning_rate=3e-2, warmup_steps=1, eval_every=steps, checkpoint_every=2,
                              grad_norm_every=0, seed=5)
        stage1 = make_hypernet(SITE, student.hidden_size, student.num_layers, seed=0)
        result = run_stage2(student, stage1, tasks[tasks["split"] == "train"].head(24), val_rows, config, GENERATION,
                            checkpoint_dir=str(out / "checkpoints"))
        last = sorted((out / "checkpoints").glob("*/step-*"))[-1]
        weights = {k[len("model."):]: v for k, v in load_file(last / "weights.safetensors").items()
                   if k.startswith("model.")}
    else:
        config = LMTrainConfig(steps=steps, batch_size=8, learning_rate=3e-3, warmup_steps=1, length_buckets=2, seed=1)
        adapter, result = train_lora(student, tasks[tasks["split"] == "train"], 2048, ["q_proj", "v_proj"], 0.9, 2.0,
                                     config)   # no validation: the last weights are returned
        weights = {name: p for name, p in result.model.named_parameters() if p.requires_grad}
    if ranks.is_main:
        save_file({name: t.detach().contiguous().cpu() for name, t in weights.items()}, out / "weights.safetensors")
        (out / "history.json").write_text(json.dumps({"history": result.history, "validation": result.validation,
                                                      "processes": ranks.size}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
