"""Stage-1 step throughput on a GPU: a >= 100M-parameter student built from config, in bf16.

    python benchmarks/gpu_stage1.py                       # CUDA, ~100M-parameter Llama student
    python benchmarks/gpu_stage1.py --tiny --device cpu   # a seconds-long check that the script runs

Times the real stage-1 step (the training engine on stage 1's objective: loss weights, schedule,
clipping) on a latent cache of long chain_sum questions. Latent RL is off by default (``--rl``
turns it on) so the figure is the supervised step whose FLOPs are counted: the teacher-forced
guided pass through the frozen student, forward (2 N per token) and backward to the activations
only (2 N per token; the frozen weights get no gradients), plus attention (4 L T d per token);
the hyper-network is negligible. Reports tokens/s and model FLOPs utilisation (MFU) against the
GPU's peak dense bf16 rate.
"""

from __future__ import annotations

import argparse

import torch

from _common import configured_generation, report, stage1_seconds_per_step, synthetic_stage1

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, name
    return None, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small model, to check the script runs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--terms", type=int, default=40, help="chain_sum terms per question (sequence length)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rl", action="store_true", help="latent RL every 4 steps, as in training")
    args = parser.parse_args()
    from pilot.config import Stage1Config
    from pilot.prompts import answer_prompt, continuation

    device = torch.device(args.device)
    hidden, layers, terms, batch = (128, 2, 6, 8) if args.tiny else (768, 16, args.terms, args.batch_size)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    student, cached, examples, site = synthetic_stage1(hidden, layers, terms, examples=max(4 * batch, 64),
                                                       device=str(device), dtype=dtype)
    n_params = sum(p.numel() for p in student.model.parameters())
    config = Stage1Config(steps=args.steps, batch_size=batch, rl_weight=0.1 if args.rl else 0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = stage1_seconds_per_step(student, cached, examples, site, config, configured_generation(),
                                      warmup_steps=3)
    seq = sum(len(student.tokenizer(answer_prompt(q) + continuation(a))["input_ids"])
              for q, a in zip(examples["question"], examples["answer"])) / len(examples)
    tokens = batch * seq
    flops = 4 * n_params * tokens + 4 * layers * seq * hidden * tokens
    peak, name = peak_tflops(device)
    achieved = flops / seconds / 1e12
    row = {"device": name, "params_m": n_params / 1e6, "batch": batch, "mean_seq": seq, "latent_rl": args.rl,
           "ms_per_step": 1000 * seconds, "tokens_per_s": tokens / seconds, "achieved_tflops": achieved,
           "mfu": achieved / peak if peak else float("nan"),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}
    report("Stage-1 step on a GPU (bf16 student)", [row], [f"Peak bf16 dense TFLOP/s used for MFU: {peak} ({name})."])


if __name__ == "__main__":
    main()
