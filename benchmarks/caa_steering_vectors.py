"""The project's CAA vector against the `steering-vectors` library's, on the default run's student.

    pip install --no-deps --target /tmp/steering steering-vectors==0.12.2   # its metadata wants transformers<5
    PYTHONPATH=/tmp/steering python benchmarks/caa_steering_vectors.py [--data data]

Both vectors come from the same pairs: each kept training plan's question answered with the plan
in context (positive) and without it (negative). The project averages ``plan - free`` over the
answer positions at the injection layer (the latent cache); the library reads one token per
string (its default: the last). Both are then injected the same way (PILOT's energy-aligned
injector, from the last prompt token on) at every CAA scale on validation; the best scale of each
is evaluated on the test split. Prints the cosine between the vectors and both sweeps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from _common import DATA, base_parameters, configured_generation, report, require
from safetensors.torch import load_file

from pilot.evaluation import answer_and_score
from pilot.methods.caa import choose_caa_scale, steered
from pilot.models import load_causal_lm
from pilot.prompts import prompt_format
from pilot.statistics import wilson_interval
from pilot.tasks import reply_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="a finished default run's data folder")
    parser.add_argument("--inject-layer", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: conf/base generation's")
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="CAA scales to sweep on validation (default: conf/base/parameters_baselines.yml's)")
    args = parser.parse_args()
    try:
        from steering_vectors import train_steering_vector
    except ImportError:
        raise SystemExit("steering-vectors is not installed: pip install --no-deps --target /tmp/steering "
                         "steering-vectors==0.12.2, then run with PYTHONPATH=/tmp/steering.") from None

    data = require(Path(args.data), "The default run's data")
    student = load_causal_lm(data / "06_models/student")
    fmt = prompt_format(student.tokenizer)
    ours = load_file(data / "06_models/steering_vector.safetensors")
    plans = pd.read_parquet(data / "04_feature/teacher_plans.parquet")
    train = pd.read_parquet(data / "03_primary/tasks_train.parquet")
    kept = train.merge(plans[plans["kept"]][["id", "plan"]], on="id")
    answers = [fmt.answer_target(a) for a in reply_targets(kept)]
    pairs = [(fmt.answer_prompt(q, p) + a, fmt.answer_prompt(q) + a)
             for q, p, a in zip(kept["question"], kept["plan"], answers)]
    library = train_steering_vector(student.model, student.tokenizer, pairs, layers=[args.inject_layer],
                                    read_token_index=-1, batch_size=64, show_progress=True)
    theirs = {"vector": library.layer_activations[args.inject_layer].float().cpu(),
              "reference_rms": ours["reference_rms"]}
    cosine = float(torch.nn.functional.cosine_similarity(theirs["vector"], ours["vector"].float(), dim=0))

    val = pd.read_parquet(data / "03_primary/tasks_val.parquet")
    test = pd.read_parquet(data / "03_primary/tasks_test.parquet")
    test = test[test["split"] == "test"]
    scales = args.scales or base_parameters()["baselines"]["caa"]["scales"]
    generation = configured_generation(max_new_tokens=args.max_new_tokens)
    rows = []
    for name, vector in (("project (answer-position mean)", ours), ("steering-vectors (last token)", theirs)):
        scale, sweep = choose_caa_scale(student, val, vector, args.inject_layer, scales, generation)
        with steered(student, vector, args.inject_layer, scale, len(test)) as guidance:
            correct = answer_and_score(student, test, guidance=guidance, generation=generation)["correct"]
        low, high = wilson_interval(int(correct.sum()), len(correct))
        rows.append({"vector": name, "norm": round(float(vector["vector"].norm()), 3),
                     "val accuracy by scale": ", ".join(f"{s:g}: {a:.3f}" for s, a in zip(sweep["scale"], sweep["val_accuracy"])),
                     "chosen scale": scale, "test accuracy": f"{correct.mean():.3f} [{low:.3f}, {high:.3f}]"})
    report("CAA: the project's vector and steering-vectors'", rows,
           [f"{len(pairs)} pairs (kept training plans); cosine(project, library) = {cosine:.3f}; "
            f"injection layer {args.inject_layer}, scales {scales}"])


if __name__ == "__main__":
    main()
