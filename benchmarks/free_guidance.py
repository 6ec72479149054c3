"""Can one injected vector carry the answer? The plan gap, free guidance vectors and the hyper-network's.

    python benchmarks/free_guidance.py [--questions 256] [--steps 300]
    python benchmarks/free_guidance.py --env smollm2 --questions 40 --steps 150

On an environment's student (the default run's, or ``--env``'s: data under its ``data_root``), for
validation questions: the student zero-shot and with the oracle plan in context (the plan gap),
the trained stage-1 hyper-network when there is one, and one guidance vector per question optimised
directly (no hyper-network: each question's own free parameters, Adam on the gold reply's loss) at
the configured injection site. If free vectors answer (almost) every question, the site is not what
limits PILOT: the hyper-network's mapping from the student's reading of a question to its vector
is. An upper bound, not a method: the vectors are fit to the very questions they answer. The
optimisation runs from the frozen prefix (:mod:`pilot.guidance.prefix`) where the student allows:
only the blocks above the site, over the answer positions. Nothing here reads the test split.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from _common import ROOT, project_settings, report, require
from pilot.evaluation import accuracy, answer_and_score
from pilot.guidance import GuidedStudent, HyperNetwork, make_hypernet
from pilot.guidance.prefix import capture_prefix, frozen_prefix, prefix_support, stack_prefix
from pilot.models import load_causal_lm
from pilot.prompts import prompt_format
from pilot.sequences import encode_pairs, next_token_loss
from pilot.tasks import reply_targets


def data_root(env: str):
    import yaml

    for name in (env, "base"):
        path = ROOT / "conf" / name / "globals.yml"
        if path.is_file() and "data_root" in (values := yaml.safe_load(path.read_text()) or {}):
            return ROOT / values["data_root"]
    return ROOT / "data"


def answer_loss(guided: GuidedStudent, questions, answers, vectors, prefix) -> torch.Tensor:
    """The gold replies' loss with ``vectors`` injected: from the frozen prefix when there is one."""
    if prefix is not None:
        logits, _ = guided.teacher_forced_from_prefix(prefix, vectors, [])
        return torch.nn.functional.cross_entropy(logits.float(), prefix.targets())
    tokens, logits, _ = guided.teacher_forced(questions, answers, vectors, [])
    return next_token_loss(logits, tokens)


def free_vectors_scored(student, rows: pd.DataFrame, site, generation, steps: int, learning_rate: float):
    """One guidance vector per row optimised freely (Adam on its gold reply's loss) at ``site``, then
    ``rows`` answered with them: ``(scored rows, vectors, whether the frozen prefix was used)``."""
    torch.manual_seed(0)
    with GuidedStudent(student, make_hypernet(site, student.hidden_size, student.num_layers, 0)) as guided:
        questions, answers = rows["question"].tolist(), reply_targets(rows)
        prefix = None
        if prefix_support(student.model) is None:
            fmt = prompt_format(student.tokenizer)
            batch = encode_pairs(student.tokenizer, [fmt.answer_prompt(q) for q in questions],
                                 [fmt.answer_target(a) for a in answers])
            lowest = min(guided.injector.layers)
            prefix = frozen_prefix(stack_prefix(capture_prefix(student.model, batch, lowest)), batch.target_lengths)
        vectors = torch.zeros(len(rows), guided.hypernet.config.guidance_size, requires_grad=True)
        optimizer = torch.optim.Adam([vectors], lr=learning_rate)
        for step in range(steps):
            loss = answer_loss(guided, questions, answers, vectors, prefix)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0 or step == steps - 1:
                print(f"step {step}: answer loss {loss.item():.4f}", flush=True)
        free = vectors.detach()
        scored = answer_and_score(student, rows, guidance=guided.guidance(vectors=free), generation=generation)
    return scored, free, prefix is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="base", help="the configuration environment (conf/<env>)")
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    args = parser.parse_args()
    settings = project_settings(args.env)
    site, generation = settings["guidance"], settings["generation"]
    root = data_root(args.env)
    student = load_causal_lm(require(root / "06_models/student", "The student"))
    val = pd.read_parquet(require(root / "03_primary/tasks_val.parquet", "The validation split"))
    val = val.sample(min(args.questions, len(val)), random_state=0)
    answer = dict(generation=generation)
    rows = [{"guidance": "none (zero-shot)", "val accuracy": round(accuracy(student, val, **answer), 3), "mean |g|": ""},
            {"guidance": "the oracle plan in context (no guidance)",
             "val accuracy": round(accuracy(student, val, plans=val["oracle_plan"].tolist(), **answer), 3),
             "mean |g|": ""}]
    trained = root / "06_models/hypernet_stage1"
    if trained.exists():
        with GuidedStudent(student, HyperNetwork.load(trained).eval()) as guided:
            rows.append({"guidance": "the trained stage-1 hyper-network",
                         "val accuracy": round(accuracy(student, val, guidance=guided.guidance(), **answer), 3),
                         "mean |g|": ""})
    scored, free, prefix = free_vectors_scored(student, val, site, generation, args.steps, args.learning_rate)
    rows.append({"guidance": f"free vectors, one per question ({args.steps} Adam steps)",
                 "val accuracy": round(float(scored["correct"].mean()), 3),
                 "mean |g|": round(float(free.norm(dim=1).mean()), 2)})
    report(f"Plan gap and free guidance vectors against the hyper-network (validation, env {args.env})", rows,
           [f"{len(val)} validation questions; site: layer {site.inject_layer}, modulation {site.modulation}, "
            f"scale {site.guidance_scale}; |g| = sqrt(d) = {student.hidden_size ** 0.5:.1f} moves h by its own RMS; "
            f"optimised {'from the frozen prefix' if prefix else 'with the full pass'}"])

if __name__ == "__main__":
    main()
