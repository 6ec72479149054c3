"""PILOT per-query latency vs plan-in-context with the teacher writing the plan at run time.

    python benchmarks/teacher_avoided.py [--repeats 5] [--batch-size 64]

Decoding is the configured run's (conf/base ``generation``; the teacher's reply length is
``plans.max_plan_tokens``), at ``--batch-size`` and any ``--max-new-tokens``/``--max-plan-tokens`` given.
"""

from __future__ import annotations

import argparse
import statistics

import pandas as pd

from _common import DATA, configured_generation, interleaved, project_settings, report, require
from pilot.generation import generate
from pilot.guidance import Guidance, GuidanceInjector, HyperNetwork
from pilot.models import load_causal_lm
from pilot.prompts import answer_prompt, first_line, plan_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: conf/base generation's")
    parser.add_argument("--max-plan-tokens", type=int, default=None, help="default: conf/base plans.max_plan_tokens")
    args = parser.parse_args()
    answering = configured_generation(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    planning = answering.model_copy(update={
        "max_new_tokens": args.max_plan_tokens or project_settings()["plans"].max_plan_tokens})

    student = load_causal_lm(require(DATA / "06_models/student", "The student"))
    teacher = load_causal_lm(require(DATA / "06_models/teacher", "The teacher"))
    hypernet = HyperNetwork.load(require(DATA / "06_models/hypernet_stage2", "The stage-2 hyper-network")).eval()
    questions = pd.read_parquet(DATA / "03_primary/tasks_test.parquet")["question"].tolist()
    injector = GuidanceInjector(student.model, hypernet.config.inject_layer, hypernet.config.guidance_scale)

    def pilot():
        generate(student, [answer_prompt(q) for q in questions], generation=answering,
                 guidance=Guidance(injector, hypernet=hypernet))

    def plan_in_context():
        plans = generate(teacher, [plan_prompt(q) for q in questions], generation=planning).texts
        generate(student, [answer_prompt(q, first_line(p)) for q, p in zip(questions, plans)], generation=answering)

    times = interleaved({"pilot": pilot, "plan_in_context": plan_in_context}, repeats=args.repeats)
    pilot_s, plan_s = statistics.median(times["pilot"]), statistics.median(times["plan_in_context"])
    rows = [{"method": name, "queries": len(questions), "batch_size": args.batch_size,
             "median_s": statistics.median(t), "ms_per_query": 1000 * statistics.median(t) / len(questions)}
            for name, t in times.items()]
    report("Teacher avoided: PILOT vs plan-in-context", rows,
           [f"PILOT is {plan_s / pilot_s:.1f}x faster per query (median of {args.repeats} interleaved repeats)."])


if __name__ == "__main__":
    main()
