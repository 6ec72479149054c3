"""Seconds per stage-1 step with N data-parallel processes (the same global batch), on this machine.

    torchrun --standalone --nproc-per-node 1 benchmarks/distributed_step.py
    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_step.py

The default student's size (128 wide, 2 layers), the default stage-1 settings (global batch 64, latent
RL every 4 steps), a synthetic latent cache; gloo on CPU (one torch thread per process), nccl on GPUs
(``--device cuda``). Rank 0 prints the median seconds per step of the timed steps; figures in
docs/distributed.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import project_settings, synthetic_stage1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    from pilot import distributed
    from pilot.guidance import GuidedStudent, make_hypernet
    from pilot.training.engine import Objective, train
    from pilot.training.stage1 import stage1_objective

    if args.device == "cpu":
        torch.set_num_threads(1)
    ranks = distributed.init_from_env("nccl" if args.device == "cuda" else "gloo")
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    torch.manual_seed(0)
    student, cached, examples, site = synthetic_stage1(128, 2, 4, examples=256, device=device)
    settings = project_settings("base")
    config = settings["stage1"].training.model_copy(update={"steps": args.warmup + args.steps, "eval_every": 0})
    hypernet = make_hypernet(site, student.hidden_size, student.num_layers, 0).to(student.device)
    stamps: list[float] = []
    with GuidedStudent(student, hypernet) as guided:
        objective = stage1_objective(guided, cached, examples, site.resolved_align_layers(student.num_layers),
                                     config, settings["generation"])

        def timed(step: int):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            yield from objective.step_terms(step)

        train(hypernet, Objective(timed, objective.weights), config, name="timed stage-1 steps")
    per_step = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
    if ranks.is_main:
        print(f"processes={ranks.size} global_batch={config.batch_size} "
              f"per_process_batch={distributed.per_device_batch(config.batch_size, ranks.size)} "
              f"median_s_per_step={statistics.median(per_step):.4f} mean_s_per_step={statistics.mean(per_step):.4f} "
              f"steps_timed={len(per_step)}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
