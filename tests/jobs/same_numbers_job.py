"""Train the embedded student and PILOT's stage 1 at the default run's sizes, under one thread setting;
print a sha256 of each one's trained weights (tests/test_same_numbers.py compares them across settings).

    python tests/jobs/same_numbers_job.py THREADS STUDENT_STEPS STAGE1_STEPS WORKDIR

THREADS is ``1``, ``2`` or ``null`` (the default policy: the cores other processes leave free, re-read
every second). Shapes and settings come from conf/base (student: 128 wide, 2 layers, batch 64; stage 1:
batch 64 with its latent-RL steps; the default guidance site); only the step counts are smaller.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import yaml

from pilot.config import GenerationParams, GuidanceParams, LatentsParams, LMTrainConfig, Stage1Config
from pilot.latents import LatentCache, plan_cache_build, write_cache
from pilot.models import build_causal_lm, train_tokenizer
from pilot.prompts import TOY, answer_prompt, continuation
from pilot.runtime import configure_threads
from pilot.tasks import build_task_table
from pilot.training.base_lm import student_examples, train_causal_lm
from pilot.training.stage1 import run_stage1

CONF = Path(__file__).resolve().parents[2] / "conf" / "base"


def conf(name: str) -> dict:
    return yaml.safe_load((CONF / name).read_text())


def digest(module: torch.nn.Module) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


def main() -> None:
    threads, student_steps, stage1_steps, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    configure_threads(None if threads == "null" else int(threads))
    tasks = [{key: value for key, value in task.items() if key != "ood_kwargs"} | {"size": 700}
             for task in conf("parameters_data.yml")["data"]["tasks"]]
    table = build_task_table(tasks, val_per_task=16, test_per_task=10, seed=0)
    train = table[table["split"] == "train"]
    spec = conf("parameters_base.yml")["base"]["student"]
    tokenizer = train_tokenizer([answer_prompt(q, p) + continuation(a) for q, p, a in
                                 zip(train["question"], train["oracle_plan"], train["answer"])],
                                conf("parameters_base.yml")["base"]["tokenizer"]["vocab_size"])
    student = build_causal_lm(tokenizer, family=spec["family"], hidden_size=spec["hidden_size"],
                              num_layers=spec["num_layers"], num_heads=spec["num_heads"],
                              max_positions=spec["max_positions"], seed=0)
    config = LMTrainConfig(**{**spec["training"], "steps": student_steps})
    train_causal_lm(student, student_examples(train.to_dict("records"), spec["plan_loss"], TOY), config, "student")
    result = {"student": digest(student.model)}

    student.model.eval().requires_grad_(False)
    site = GuidanceParams(**conf("parameters.yml")["guidance"])
    latents = LatentsParams(**conf("parameters_latents.yml")["latents"])
    plans = table[["id", "task", "split"]].assign(plan=table["oracle_plan"], kept=True)
    write_cache(plan_cache_build(plans, table, student, site, latents), workdir / "cache")
    training = conf("parameters_stage1.yml")["stage1"]["training"]
    stage1 = Stage1Config(**{**training, "steps": stage1_steps, "eval_every": stage1_steps, "checkpoint_every": 0})
    trained = run_stage1(student, LatentCache(workdir / "cache"), plans, table, table[table["split"] == "val"],
                         site, latents, stage1, GenerationParams(**conf("parameters.yml")["generation"]))
    # The selected weights, and every step's logged losses (validation may keep the start, the losses never do)
    result["stage1"] = digest(trained.model)
    result["stage1_history"] = hashlib.sha256(json.dumps(trained.history).encode()).hexdigest()[:16]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
