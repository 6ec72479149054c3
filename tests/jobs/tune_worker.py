"""One tuning worker on a shared study, run as a real subprocess by the parallel-tuning test.

    python tests/jobs/tune_worker.py STORAGE_URL N_TRIALS

The objective is cheap but real (a smooth function of the sampled weights) and sleeps a little,
so two workers started together interleave their trials in the one SQLite study.
"""

import math
import sys
import time

from pilot.config import TuneParams
from pilot.tuning import tune


def objective(trial) -> float:
    contrastive = trial.suggest_float("contrastive_weight", 0.01, 1.0, log=True)
    rl = trial.suggest_float("rl_weight", 0.01, 1.0, log=True)
    time.sleep(0.05)
    return -(math.log(contrastive / 0.1) ** 2) - (math.log(rl / 0.3) ** 2)


def main() -> None:
    storage, n_trials = sys.argv[1], int(sys.argv[2])
    config = TuneParams(storage=storage, study_name="parallel", n_trials=n_trials)
    tune(objective, config, baseline={"contrastive_weight": 0.05, "rl_weight": 0.1})


if __name__ == "__main__":
    main()
