"""Candidate environments for a pretrained student: the plan gap and the free-guidance ceiling on validation.

    python benchmarks/candidate_envs.py --env smollm2 --student data/smollm2/06_models/student
    python benchmarks/candidate_envs.py --env smollm2 --reply leg_counting=worked --without-plan false

An environment is ``--env``'s data and adaptation settings with the changes given here: a task's
reply format (``--reply task=worked``: ``data.tasks[i].reply``), its generator settings (``--kwargs
task=JSON``, laid over ``data.tasks[i].kwargs``), which tasks it keeps (``--tasks``), the
adaptation's ``without_plan`` (``base.student.adapt.without_plan``). Its tasks are generated as the data pipeline would (same
seeds: the same rows), the test rows are dropped unread, the student is imported and adapted on the
training rows (or ``--student``: one already adapted on exactly these rows, checked by its stamp),
and for ``--questions`` validation questions per task this prints and writes (``--out``, JSON):

- the plan gap: the student without and with the oracle plan in context, with 95 % Wilson intervals;
- the free-guidance ceiling at the configured site: one vector per question optimised on its gold
  reply (:func:`free_guidance.free_vectors_scored`), an upper bound, not a method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import env_config, machine, project_settings
from free_guidance import free_vectors_scored

from pilot.config import with_run_seed
from pilot.evaluation import answer_and_score
from pilot.models import import_causal_lm, load_causal_lm, read_stamp
from pilot.pipelines.base.nodes import import_stamp
from pilot.runtime import configure_threads
from pilot.statistics import wilson_interval
from pilot.tasks import build_task_table, reply_targets
from pilot.training.base_lm import adapt


def run_seed(env: str) -> int:
    """``env``'s run seed (``seed`` in its parameters), which every component's seed is an offset from."""
    return int(env_config(env, "parameters").get("seed", 0))


def cell(hits: int, n: int) -> str:
    low, high = wilson_interval(hits, n)
    return f"{hits / n:.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="smollm2")
    parser.add_argument("--reply", action="append", default=[], metavar="TASK=FORMAT",
                        help="a task's reply format (last_step, worked); repeatable")
    parser.add_argument("--kwargs", action="append", default=[], metavar="TASK=JSON",
                        help="generator settings laid over a task's kwargs, e.g. "
                             "'leg_counting={\"min_animals\": 1, \"max_animals\": 1}'; repeatable")
    parser.add_argument("--tasks", nargs="+", default=None, help="keep only these of the env's tasks")
    parser.add_argument("--without-plan", choices=["true", "false"], default=None,
                        help="the adaptation's without_plan (default: the env's)")
    parser.add_argument("--adapt-batch-size", type=int, default=None,
                        help="the adaptation's batch size (default: the env's; with --without-plan false, half "
                             "of it trains on as many plan-conditioned examples per step as the env does)")
    parser.add_argument("--student", type=Path, default=None,
                        help="an already adapted student for these settings and rows (checked by its stamp)")
    parser.add_argument("--save-student", type=Path, default=None,
                        help="save the adapted student here, stamped as the base pipeline stamps it")
    parser.add_argument("--questions", type=int, default=40, help="validation questions per task")
    parser.add_argument("--steps", type=int, default=150,
                        help="Adam steps of the free vectors (0: the plan gap only, no ceiling)")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    began = time.perf_counter()
    settings = project_settings(args.env)
    data, spec, seed = settings["data"], settings["base"].student, run_seed(args.env)
    replies = dict(item.split("=", 1) for item in args.reply)
    generator_kwargs = {name: json.loads(value) for name, value in (item.split("=", 1) for item in args.kwargs)}
    named = set(replies) | set(generator_kwargs) | set(args.tasks or [])
    unknown = named - {t.name for t in data.tasks}
    if unknown:
        parser.error(f"--reply, --kwargs or --tasks name tasks the env does not have: {sorted(unknown)}")
    tasks = [t.model_copy(update={"reply": replies.get(t.name, t.reply),
                                  "kwargs": {**t.kwargs, **generator_kwargs.get(t.name, {})}})
             for t in data.tasks if args.tasks is None or t.name in args.tasks]
    # The data pipeline's table (the same seeds and sizes); the test rows are dropped here, unread.
    data = with_run_seed(data, seed)
    table = build_task_table([t.model_dump() for t in tasks], data.val_per_task, data.test_per_task, data.seed)
    train, val = table[table["split"] == "train"], table[table["split"] == "val"]
    changes = {}
    if args.without_plan is not None:
        changes["without_plan"] = args.without_plan == "true"
    if args.adapt_batch_size is not None:
        changes["batch_size"] = args.adapt_batch_size
    spec = spec.model_copy(update={"adapt": spec.adapt.model_copy(update=changes)})
    adapt_params = with_run_seed(spec.adapt, seed, 0)
    # The base pipeline's stamp for these settings and rows: a student saved with it is the one
    # `kedro run --env <this env> --pipelines base` would build, and it keeps it.
    stamp = import_stamp("student", spec, train, seed)
    if args.student is not None:
        if (read_stamp(str(args.student)) or {}) != stamp:
            parser.error(f"{args.student} was not adapted with these settings on these training rows; leave out --student")
        student, adapt_seconds = load_causal_lm(args.student), None
    else:
        student = import_causal_lm(spec.source)
        adapt_began = time.perf_counter()
        adapt(student, train, adapt_params, "student")
        adapt_seconds = time.perf_counter() - adapt_began
        if args.save_student is not None:
            student.stamp = stamp
            student.save(args.save_student)
    val = val.groupby("task", sort=False).head(args.questions).reset_index(drop=True)
    # Room for the longest gold reply (a worked reply is longer than the env's usual).
    longest = max(len(student.tokenizer(t)["input_ids"]) for t in reply_targets(val))
    generation = settings["generation"].model_copy(
        update={"max_new_tokens": max(settings["generation"].max_new_tokens, longest + 8)})
    scored = {"no plan": answer_and_score(student, val, generation=generation, progress="no plan"),
              "oracle plan": answer_and_score(student, val, plans=val["oracle_plan"].tolist(), generation=generation,
                                              progress="oracle plan")}
    free_began, norm = time.perf_counter(), None
    if args.steps > 0:
        scored["free vectors"], vectors, _ = free_vectors_scored(student, val, settings["guidance"], generation,
                                                                 args.steps, args.learning_rate)
        norm = float(vectors.norm(dim=1).mean())
    free_seconds = time.perf_counter() - free_began
    results = []
    for task in val["task"].unique():
        hits = {name: int(frame.loc[frame["task"] == task, "correct"].sum()) for name, frame in scored.items()}
        n = int((val["task"] == task).sum())
        rows = val[val["task"] == task]
        results.append({"task": task, "reply": replies.get(task, "last_step"), "kwargs": generator_kwargs.get(task),
                        "without_plan": adapt_params.without_plan, "n": n, **{f"hits {k}": v for k, v in hits.items()},
                        "plan gap (pts)": round(100 * (hits["oracle plan"] - hits["no plan"]) / n, 1),
                        "example plan": rows["oracle_plan"].iloc[0], "example reply": reply_targets(rows)[0]})
    site = settings["guidance"]
    print(f"\nenv {args.env}, replies {replies or 'as configured'}, without_plan {adapt_params.without_plan}; "
          f"site layer {site.inject_layer} ({site.modulation}); {machine()}")
    print("| task | reply | adapted | no plan | oracle plan | plan gap (pts) | free vectors |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['reply']} | {'with and without plan' if r['without_plan'] else 'plan only'} | "
              f"{cell(r['hits no plan'], r['n'])} | {cell(r['hits oracle plan'], r['n'])} | {r['plan gap (pts)']:+.1f} | "
              f"{cell(r['hits free vectors'], r['n']) if 'hits free vectors' in r else 'not measured'} |")
    for r in results:
        print(f"{r['task']}: plan '{r['example plan']}' -> reply '{r['example reply']}'")
    timing = {"adapt_seconds": adapt_seconds, "free_vector_seconds": free_seconds,
              "total_seconds": time.perf_counter() - began, "mean_free_vector_norm": norm}
    print(json.dumps(timing))
    if args.out:
        samples = {name: frame.groupby("task").head(3)[["task", "prediction", "reply", "correct"]].to_dict("records")
                   for name, frame in scored.items()}
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                        "timing": timing, "samples": samples}, indent=1, default=str))


if __name__ == "__main__":
    main()
