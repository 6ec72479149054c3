"""Can one injected vector carry the answer? Free guidance vectors against the hyper-network's.

    python benchmarks/free_guidance.py [--questions 256] [--steps 300]

On the default run's student, one guidance vector per validation question is optimised directly
(no hyper-network: each question's own free parameters, Adam on the gold answer's loss) at the
configured injection site, then the student answers with them. If free vectors answer (almost)
every question, the injection site is not what limits PILOT: the hyper-network's mapping from the
student's reading of a question to its vector is. An upper bound, not a method: the vectors are fit
to the very questions they answer. Nothing here reads the test split.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from _common import DATA, base_parameters, report, require
from pilot.config import GenerationParams, GuidanceParams
from pilot.evaluation import accuracy
from pilot.guidance import GuidedStudent, HyperNetwork, make_hypernet
from pilot.models import load_causal_lm
from pilot.sequences import next_token_loss
from pilot.tasks import reply_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    args = parser.parse_args()
    conf = base_parameters()
    site, generation = GuidanceParams(**conf["guidance"]), GenerationParams(**conf["generation"])
    student = load_causal_lm(require(DATA / "06_models/student", "The student"))
    val = pd.read_parquet(DATA / "03_primary/tasks_val.parquet").sample(args.questions, random_state=0)
    answer = dict(max_new_tokens=generation.max_new_tokens, batch_size=128, stop_strings=generation.stop)
    zero_shot = round(accuracy(student, val, **answer), 3)
    rows = [{"guidance": "none (zero-shot)", "val accuracy": zero_shot, "mean |g|": ""}]
    trained = DATA / "06_models/hypernet_stage1"
    if trained.exists():
        with GuidedStudent(student, HyperNetwork.load(trained).eval()) as guided:
            rows.append({"guidance": "the trained stage-1 hyper-network",
                         "val accuracy": round(accuracy(student, val, guidance=guided.guidance(), **answer), 3),
                         "mean |g|": ""})
    torch.manual_seed(0)
    with GuidedStudent(student, make_hypernet(site, student.hidden_size, student.num_layers, 0)) as guided:
        vectors = torch.zeros(len(val), guided.hypernet.config.guidance_size, requires_grad=True)
        optimizer = torch.optim.Adam([vectors], lr=args.learning_rate)
        questions, answers = val["question"].tolist(), reply_targets(val)
        for step in range(args.steps):
            tokens, logits, _ = guided.teacher_forced(questions, answers, vectors, [])
            loss = next_token_loss(logits, tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step}: answer loss {loss.item():.4f}", flush=True)
        free = vectors.detach()
        rows.append({"guidance": f"free vectors, one per question ({args.steps} Adam steps)",
                     "val accuracy": round(accuracy(student, val, guidance=guided.guidance(vectors=free), **answer), 3),
                     "mean |g|": round(float(free.norm(dim=1).mean()), 2)})
    report("Free guidance vectors against the hyper-network (validation)", rows,
           [f"{len(val)} validation questions; site: layer {site.inject_layer}, modulation {site.modulation}, "
            f"scale {site.guidance_scale}; |g| = sqrt(d) = {student.hidden_size ** 0.5:.1f} moves h by its own RMS"])


if __name__ == "__main__":
    main()
