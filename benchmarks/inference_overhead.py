"""Guided generation (hyper-network + injection) vs plain student generation.

    python benchmarks/inference_overhead.py [--repeats 21] [--batch-size 64]

Same queries, same batch size, same decoding (conf/base ``generation``, at ``--batch-size``), timed in
turn in one process. Two guided variants:
a zero-output hyper-network (identical tokens to plain, so the ratio is the mechanism's cost
alone) and the trained stage-2 hyper-network of the default run.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import pandas as pd
import torch

from _common import DATA, configured_generation, interleaved, report, require
from pilot.generation import generate
from pilot.guidance import Guidance, GuidanceInjector, HyperNetwork
from pilot.models import load_causal_lm
from pilot.prompts import answer_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: conf/base generation's")
    args = parser.parse_args()
    generation = configured_generation(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    student = load_causal_lm(require(DATA / "06_models/student", "The student"))
    trained = HyperNetwork.load(require(DATA / "06_models/hypernet_stage2", "The stage-2 hyper-network")).eval()
    zero = copy.deepcopy(trained)
    torch.nn.init.zeros_(zero.mlp[-1].weight)
    torch.nn.init.zeros_(zero.mlp[-1].bias)
    prompts = [answer_prompt(q) for q in pd.read_parquet(DATA / "03_primary/tasks_test.parquet")["question"]]
    injector = GuidanceInjector(student.model, trained.config.inject_layer, trained.config.guidance_scale)
    run = {
        "plain": lambda: generate(student, prompts, generation=generation),
        "guided (zero vector)": lambda: generate(student, prompts, generation=generation,
                                                 guidance=Guidance(injector, hypernet=zero)),
        "guided (trained)": lambda: generate(student, prompts, generation=generation,
                                             guidance=Guidance(injector, hypernet=trained)),
    }
    tokens = {name: sum(fn().new_tokens) for name, fn in run.items()}
    with torch.inference_mode():
        times = interleaved(run, repeats=args.repeats)
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        # Paired per repeat (A B A B ...), so drift of a shared machine cancels in the ratio.
        ratio = statistics.median(s / p for s, p in zip(samples, times["plain"]))
        rows.append({"method": name, "queries": len(prompts), "batch_size": args.batch_size,
                     "median_s": median, "ms_per_query": 1000 * median / len(prompts),
                     "generated_tokens": tokens[name], "ms_per_token": 1000 * median / tokens[name],
                     "overhead_vs_plain": ratio - 1})
    report("Inference overhead of guidance", rows, [
        f"{args.repeats} interleaved repeats after one warm-up; medians, and the overhead as the median of the "
        "per-repeat ratios to plain. The zero-vector row generates exactly the plain tokens, so its overhead is the "
        "cost of the hyper-network call and the injection hook alone; the trained row also generates other tokens."])


if __name__ == "__main__":
    main()
