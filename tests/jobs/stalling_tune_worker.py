"""A tuning worker whose trials take ``SECONDS`` each, for the killed-worker test.

    python tests/jobs/stalling_tune_worker.py STORAGE_URL STUDY N_TRIALS SECONDS

Heartbeats every second with a 2-second grace period, so a killed worker's trial is found stale
quickly by the next worker.
"""

import sys
import time

from pilot.config import TuneParams
from pilot.tuning import tune


def main() -> None:
    storage, study, n_trials, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

    def objective(trial) -> float:
        contrastive = trial.suggest_float("contrastive_weight", 0.01, 1.0, log=True)
        time.sleep(seconds)
        return contrastive

    config = TuneParams(storage=storage, study_name=study, n_trials=n_trials, heartbeat_interval_s=1,
                        grace_period_s=2)
    tune(objective, config)


if __name__ == "__main__":
    main()
