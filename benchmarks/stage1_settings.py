"""PILOT's stage-1 settings compared on the validation split only (never the test split).

    python benchmarks/stage1_settings.py --variant lr3e-3 '{"stage1": {"learning_rate": 3e-3}}' ...

On the default run's student, kept plans and latent cache, stage 1 is retrained once per variant
(settings laid over conf/base like an ablation variant; a variant at another read or injection
layer gets its own cache under the tune cache folder) and the best validation accuracy over its checkpoints is
printed, with its step, the hyper-network's parameters and the seconds it took. This is how the
configured stage-1 settings were chosen (BENCHMARKS.md); the ablation report then shows them on test.
``--seeds 0 1 2`` trains each variant once per stage-1 seed (initialisation and batch order) and adds
the mean over seeds, so that a choice between close variants is not left to one seed's luck.
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd

from _common import DATA, base_parameters, report, require
from pilot.config import AblationVariant, GenerationParams, GuidanceParams, LatentsParams, Stage1Config
from pilot.latents import LatentCache
from pilot.models import count_parameters, load_causal_lm
from pilot.training.stage1 import run_stage1
from pilot.tuning import site_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), default=[],
                        help='a name and its overrides, e.g. film \'{"guidance": {"modulation": "film"}}\'')
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: configured)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train each variant once per stage-1 seed and report the mean (default: configured seed)")
    args = parser.parse_args()
    conf = base_parameters()
    site = GuidanceParams(**conf["guidance"])
    generation = GenerationParams(**conf["generation"])
    latents = LatentsParams(**conf["latents"])
    stage1 = Stage1Config(**conf["stage1"]["training"])
    student = load_causal_lm(require(DATA / "06_models/student", "The student"))
    plans = pd.read_parquet(DATA / "04_feature/teacher_plans.parquet")
    train, val = (pd.read_parquet(DATA / f"03_primary/tasks_{split}.parquet") for split in ("train", "val"))
    tasks = pd.concat([train, val])
    cache = LatentCache(str(require(DATA / "05_model_input/latent_cache", "The latent cache")))
    rows = []
    for name, overrides in args.variant or [["reference", "{}"]]:
        variant = AblationVariant(name=name, **json.loads(overrides))
        variant_site = site.model_copy(update=variant.guidance)
        trial_cache = site_cache(student, cache, plans, tasks, variant_site, site, latents,
                                 conf["tune"]["cache_dir"])
        for seed in args.seeds or [None]:
            training = stage1.model_copy(update={**variant.stage1, "checkpoint_every": 0,
                                                 **({"steps": args.steps} if args.steps else {}),
                                                 **({"seed": seed} if seed is not None else {})})
            curve = []
            began = time.perf_counter()
            result = run_stage1(student, trial_cache, plans, tasks, val, variant_site, latents, training, generation,
                                on_validation=lambda step, value: curve.append(f"{step}:{value:.3f}"))
            rows.append({"variant": name, "overrides": overrides, "seed": training.seed,
                         "best val accuracy": round(result.best_val_accuracy, 3), "best step": result.best_step,
                         "parameters": count_parameters(result.model),
                         "seconds": round(time.perf_counter() - began), "curve": " ".join(curve)})
            print(rows[-1], flush=True)
    report("Stage-1 settings on validation", rows, [f"{training.steps} steps of batch {training.batch_size}; "
                                                     f"validation: {len(val)} questions"])
    if args.seeds and len(args.seeds) > 1:
        table = pd.DataFrame(rows).groupby("variant", sort=False)["best val accuracy"]
        means = [{"variant": name, "seeds": len(values), "mean best val accuracy": round(values.mean(), 3),
                  "sd": round(values.std(), 3), "min": values.min(), "max": values.max()}
                 for name, values in table]
        report(f"Mean over seeds {args.seeds}", means)


if __name__ == "__main__":
    main()
