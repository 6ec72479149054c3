"""Each trainer's step against what its arithmetic needs on these cores (issue 46: measure first).

For every method that trains on the default run's data (LoRA, ReFT, pause tokens, soft thoughts, PILOT
stage 1), ``--steps`` steps of its real trainer (the project's own functions, the configured settings,
no validation) under ``torch.utils.flop_counter.FlopCounterMode``: FLOPs per step (forward and
backward, every aten op the step runs), seconds per step, and the achieved GFLOP/s against a plain
matmul's on the same cores. The gap between the two is time spent on things other than arithmetic
(Python, hooks, small ops, allocation, data collation), which cheaper steps could cut.

    python benchmarks/trainer_steps.py --data /path/to/a/run/data --steps 40

Needs a finished default run (``make run``): its student, teacher, splits, plans and latent cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import ROOT, base_parameters, report, require
from pilot.config import GenerationParams, GuidanceParams, LatentsParams, Stage1Config
from pilot.latents import LatentCache
from pilot.methods.lora import LoraParams, train_lora
from pilot.methods.reft import ReftParams, reft_layers, train_reft
from pilot.methods.soft_prompts import PauseTokenParams, SoftThoughtParams, make_soft_prompt, train_soft_prompt
from pilot.methods.trained import hypernet_budget
from pilot.models import load_causal_lm
from pilot.runtime import configure_threads
from pilot.training.stage1 import run_stage1


def matmul_gflops(size: int = 512, repeats: int = 50) -> float:
    """What these cores reach on a plain float32 matmul: the ceiling a step's arithmetic could run at."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(5):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def measured(name: str, train, steps: int) -> dict:
    """Seconds and FLOPs per step, and the GFLOP/s achieved: ``train(2 * steps)`` minus ``train(steps)``,
    so one-time work (copying the student, reading every prompt once, building the optimizer) is left out."""
    train(2)                                     # warm-up: first-call allocation, lazy imports

    def timed(count: int) -> tuple[float, float]:
        start = time.perf_counter()
        train(count)
        seconds = time.perf_counter() - start
        counter = FlopCounterMode(display=False)
        with counter:
            train(count)
        return seconds, counter.get_total_flops()

    (seconds1, flops1), (seconds2, flops2) = timed(steps), timed(2 * steps)
    seconds, flops = (seconds2 - seconds1) / steps, (flops2 - flops1) / steps
    return {"trainer": name, "ms_per_step": 1000 * seconds, "gflop_per_step": flops / 1e9,
            "gflop_per_s": flops / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="a finished default run's data folder")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's policy)")
    args = parser.parse_args()
    configure_threads(args.threads)
    settings = base_parameters()
    data = args.data
    student = load_causal_lm(require(data / "06_models/student", "the student"))
    teacher = load_causal_lm(require(data / "06_models/teacher", "the teacher"))
    rows = pd.read_parquet(require(data / "03_primary/tasks_train.parquet", "the training split"))
    guidance = GuidanceParams(**settings["guidance"])
    stage1 = Stage1Config(**settings["stage1"]["training"])
    budget = hypernet_budget(student, guidance, 0)
    blocks = settings["baselines"]

    def loop(params, steps: int):
        return params.training.for_run(stage1, 0).model_copy(update={"steps": steps, "eval_every": 0})

    lora, reft = LoraParams(**blocks["lora"]), ReftParams(**blocks["reft"])
    pause, thoughts = PauseTokenParams(**blocks["pause_tokens"]), SoftThoughtParams(**blocks["soft_thoughts"])
    trainers = {
        "lora": lambda steps: train_lora(student, rows, budget, lora.target_modules, lora.match_tolerance,
                                         lora.lora_alpha_ratio, loop(lora, steps)),
        "reft": lambda steps: train_reft(student, rows, budget, reft_layers(reft.layers, guidance.inject_layer,
                                                                            student.num_layers),
                                         reft.match_tolerance, loop(reft, steps)),
        "pause_tokens": lambda steps: train_soft_prompt(
            student, make_soft_prompt("pause_tokens", student, pause.num_tokens, budget, 0), rows, loop(pause, steps)),
        "soft_thoughts": lambda steps: train_soft_prompt(
            student, make_soft_prompt("soft_thoughts", student, thoughts.num_tokens, budget, 0, assistant=teacher),
            rows, loop(thoughts, steps), assistant=teacher),
    }
    cache = data / "05_model_input/latent_cache"
    if cache.exists():
        plans = pd.read_parquet(data / "04_feature/teacher_plans.parquet")
        one_question = pd.read_parquet(data / "03_primary/tasks_val.parquet").head(1)   # stage 1 always validates
        latents = LatentsParams(**settings["latents"])
        trainers["pilot_stage1"] = lambda steps: run_stage1(
            student, LatentCache(cache), plans, rows, one_question, guidance, latents,
            stage1.model_copy(update={"steps": steps, "eval_every": steps, "checkpoint_every": 0}),
            GenerationParams(**settings["generation"]), checkpoint_dir=None)
    results = [measured(name, train, args.steps) for name, train in trainers.items()]
    peak = matmul_gflops()
    for row in results:
        row["share_of_matmul_peak"] = row["gflop_per_s"] / peak
    report("Trainer steps against the arithmetic they need", results,
           [f"Plain 512 x 512 float32 matmul on these cores: {peak:.1f} GFLOP/s (torch threads: "
            f"{torch.get_num_threads()}). Per step: a run of {2 * args.steps} steps minus one of {args.steps} (one-time "
            "work left out), the configured batch size and settings, no validation (stage 1: one question at "
            "its start and end); FLOPs from torch.utils.flop_counter (forward and backward)."])


if __name__ == "__main__":
    main()
