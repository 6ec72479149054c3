"""A tuning worker whose trials take ``SECONDS`` each, for the killed-worker test.

    python tests/jobs/stalling_tune_worker.py STORAGE_URL STUDY N_TRIALS SECONDS [TRACKING_URI]

Heartbeats every second with a 2-second grace period, so a killed worker's trial is found stale
quickly by the next worker. With a tracking URI the worker tunes inside an MLflow run (as
`kedro run --pipelines tune` does), named after the study.
"""

import contextlib
import sys
import time

import mlflow

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
    tracked = contextlib.nullcontext()
    if len(sys.argv) > 5:
        mlflow.set_tracking_uri(sys.argv[5])
        mlflow.set_experiment("stalling-workers")
        tracked = mlflow.start_run(run_name=f"{study}-{n_trials}")
    with tracked:
        tune(objective, config)


if __name__ == "__main__":
    main()
