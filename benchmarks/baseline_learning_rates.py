"""Learning rates for the adapter baselines (ReFT, pause tokens, soft thoughts), chosen on validation.

    python benchmarks/baseline_learning_rates.py [--steps 500] [--rates 1e-3 3e-3 1e-2 3e-2]
    python benchmarks/baseline_learning_rates.py --env smollm2 --methods reft --steps 150 --rates 1e-4 3e-4 1e-3

On ``--env``'s finished run's student (and teacher, for soft thoughts), each baseline is trained at each
rate for ``--steps`` steps with the configured batch size and its validation accuracy is read at
the end: the same short-budget search for each of them (LoRA has `kedro run --pipelines tune_lora`).
Nothing here reads the test split.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from _common import ROOT, env_config, report, require

from pilot.config import GenerationParams, GuidanceParams, LMTrainConfig
from pilot.evaluation import accuracy
from pilot.guidance import make_hypernet
from pilot.methods.reft import reft_layers, train_reft
from pilot.methods.soft_prompts import AttachedSoftPrompt, make_soft_prompt, train_soft_prompt
from pilot.models import count_parameters, load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="base", help="the Kedro environment whose run's models and data to use")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--methods", nargs="+", default=["reft", "pause_tokens", "soft_thoughts"])
    args = parser.parse_args()
    data = ROOT / env_config(args.env, "globals").get("data_root", "data")
    student = load_causal_lm(require(data / "06_models/student", "The student"))
    teacher = load_causal_lm(data / "06_models/teacher") if "soft_thoughts" in args.methods else None
    val = pd.read_parquet(data / "03_primary/tasks_val.parquet")
    train = pd.read_parquet(data / "03_primary/tasks_train.parquet")
    conf = env_config(args.env, "parameters")
    guidance = GuidanceParams(**conf["guidance"])
    generation = GenerationParams(**conf["generation"])
    budget = count_parameters(make_hypernet(guidance, student.hidden_size, student.num_layers, 0))
    batch_size = conf["stage1"]["training"]["batch_size"]
    rows = []
    for method in args.methods:
        settings = conf["baselines"][method]
        for rate in args.rates:
            config = LMTrainConfig(steps=args.steps, batch_size=batch_size, learning_rate=rate,
                                   warmup_steps=settings["training"]["warmup_steps"], weight_decay=0.0,
                                   length_buckets=1, seed=0)
            if method == "reft":
                layers = reft_layers(settings.get("layers"), guidance.inject_layer, student.num_layers)
                module, _ = train_reft(student, train, budget, layers, 0.1, config)
                with module.attached(student), module.frozen_weights():
                    value = accuracy(student, val, generation=generation)
            else:
                assistant = teacher if method == "soft_thoughts" else None
                module = make_soft_prompt(method, student, settings["num_tokens"], budget, 0, assistant=assistant)
                module, _ = train_soft_prompt(student, module, train, config, assistant=assistant)
                with AttachedSoftPrompt(module, student, assistant) as soft, torch.no_grad():
                    value = accuracy(student, val, generation=generation, soft_prompt=soft)
            rows.append({"method": method, "learning_rate": rate, f"val accuracy at {args.steps} steps": round(value, 3)})
            print(rows[-1], flush=True)
    report("Adapter baselines: learning rate on validation", rows,
           [f"env {args.env}: {args.steps} steps of batch {batch_size}, seed 0; budget {budget} parameters"])


if __name__ == "__main__":
    main()
