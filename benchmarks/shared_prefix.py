"""Seconds per training step of every next-token trainer, with and without the shared prefix.

    python benchmarks/shared_prefix.py --env smollm2                  # after `kedro run --env smollm2`
    python benchmarks/shared_prefix.py --env smollm2 --steps 6 --methods lora reft

Every row of a step's batch starts with the same tokens when prompts share a chat template and a
task's fixed instruction (SmolLM2's leg_counting: 58 of about 80). With ``share_prefix`` they run
once per pass and every row reads their keys and values (:func:`pilot.sequences.labelled_logits`).
This times each trained baseline through its own train hook (the run's student, rows and
configured settings, no validation) and the student's adaptation (``pilot.training.base_lm.adapt``,
on a copy of the run's teacher, the un-adapted import), with ``share_prefix`` off and on, in
``--length-buckets`` micro-batches a step (default: each trainer's configured number). A step's
time is the loop's own seconds for 1 + ``--steps`` steps less those for 1 step, so one-off costs
of a first step drop out. Before timing, one batch of 16 through the whole student both ways shows
the loss and gradient agree.
"""

from __future__ import annotations

import argparse
import copy
import logging

import pandas as pd
import torch

from _common import ROOT, env_config, project_settings, report, require
from pilot.methods.registry import trained_baselines
from pilot.models import load_causal_lm
from pilot.sequences import encode_pairs, labelled_logits, next_token_loss
from pilot.training.base_lm import adapt, answer_examples
from pilot.training.protocol import TrainingProtocol


class TrainingSeconds(logging.Handler):
    """The seconds the training engine logs for each finished loop (set-up and saving excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("train ") and " finished in " in record.getMessage():
            self.seconds.append(float(record.args[1]))


def agreement(student, rows: pd.DataFrame) -> dict[str, float]:
    """One batch of 16 with every decoder weight trainable: the loss and the largest gradient difference."""
    model = copy.deepcopy(student.model)
    prompts, targets = zip(*answer_examples(student.tokenizer, rows.head(16)))
    batch = encode_pairs(student.tokenizer, prompts, targets)
    results = []
    for share in (False, True):
        model.zero_grad()
        loss = next_token_loss(labelled_logits(model, batch, share_prefix=share), batch, reduction="sum")
        loss.backward()
        results.append((float(loss), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (full, g_full), (shared, g_shared) = results
    return {"shared tokens": batch.shared_prefix_length(), "of": batch.input_ids.shape[1], "loss full": full,
            "loss shared": shared, "max |grad diff| / max |grad|": float((g_full - g_shared).abs().max() / g_full.abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="smollm2")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting (after a first, untimed one)")
    parser.add_argument("--methods", nargs="+", default=["adapt", "lora", "reft", "pause_tokens", "soft_thoughts"])
    parser.add_argument("--length-buckets", type=int, default=None, help="in place of each trainer's configured one")
    args = parser.parse_args()
    data = ROOT / env_config(args.env, "globals").get("data_root", "data")
    settings, seed = project_settings(args.env), env_config(args.env, "parameters")["seed"]
    student = load_causal_lm(require(data / "06_models/student", "The student"))
    teacher = load_causal_lm(require(data / "06_models/teacher", "The teacher"))
    train = pd.read_parquet(data / "03_primary/tasks_train.parquet")
    val = pd.read_parquet(data / "03_primary/tasks_val.parquet")
    check = agreement(student, train)
    print(check, flush=True)
    baselines = {method.name: method for method in trained_baselines()}
    timer = TrainingSeconds()
    engine = logging.getLogger("pilot.training.engine")
    engine.addHandler(timer)
    engine.setLevel(logging.INFO)

    def configured_buckets(name: str) -> int:
        if name == "adapt":
            return settings["base"].student.adapt.length_buckets
        return baselines[name].own_params(settings["baselines"]).training.length_buckets

    def train_seconds(name: str, steps: int, share: bool, buckets: int | None) -> float:
        """The training loop's own seconds for ``steps`` steps (the first step's one-off costs included)."""
        loop = {"share_prefix": share, "length_buckets": buckets or configured_buckets(name)}
        if name == "adapt":
            adapt(copy.deepcopy(teacher), train, settings["base"].student.adapt.model_copy(update={**loop, "steps": steps}),
                  "student")
        else:
            method = baselines[name]
            params = method.own_params(settings["baselines"])
            params = params.model_copy(update={"training": params.training.model_copy(update=loop)})
            stage1 = settings["stage1"].model_copy(update={"training": settings["stage1"].training.model_copy(
                update={"steps": steps, "eval_every": 0})})
            protocol = TrainingProtocol(train, val, stage1, settings["generation"], seed)
            inputs = {"soft_thoughts": [teacher], "lora": [{}]}.get(name, [])   # the teacher reads; LoRA untuned
            method.train(student, settings["guidance"], params, protocol, *inputs)
        return timer.seconds[-1]

    rows = []
    for name in args.methods:
        for share in (False, True):
            seconds = {steps: train_seconds(name, steps, share, args.length_buckets) for steps in (1, 1 + args.steps)}
            rows.append({"trainer": name, "length_buckets": args.length_buckets or configured_buckets(name),
                         "share_prefix": share, "s / step": round((seconds[1 + args.steps] - seconds[1]) / args.steps, 2)})
            print(rows[-1], flush=True)
    report("Shared prefix: seconds per training step", rows,
           [f"env {args.env}: a step's seconds are (loop of 1 + {args.steps} steps - loop of 1 step) / {args.steps}, "
            f"batch {settings['stage1'].training.batch_size} (adapt: {settings['base'].student.adapt.batch_size}); "
            f"torch threads {torch.get_num_threads()}; "
            f"one batch of 16 both ways: {check}"])


if __name__ == "__main__":
    main()
