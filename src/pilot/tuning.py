"""Optuna search over the stage-1 loss balance (contrastive and latent-RL weights).

Each trial is a short run of the real stage-1 training (:func:`pilot.training.stage1.run_stage1`,
optionally followed by a short stage 2) scored by validation accuracy; validation results are
reported as intermediate values so the pruner stops bad trials early. The study lives in an
RDB storage (SQLite under ``data/`` by default), so several processes can share it and a rerun
continues it. A trial that raises is recorded as failed and the study goes on. On a database
server (``conf/shared``: PostgreSQL) workers on several machines share one study; a worker killed
mid-trial leaves no trial stuck RUNNING: the heartbeat marks it FAIL and it is retried. A worker
that ends its own trials waits for those the others are running, so its best weights include them;
with ``tune.n_trials=0`` a process runs no trial and only reads the study's best.

Each worker (process) samples with its own seed, derived from ``tune.sampler_seed``, the
worker's name (``tune.worker``; host and process id by default) and how many trials that worker
already ran, so parallel workers and reruns never replay each other's points. Every trial
records its ``worker`` and ``sampler_seed`` as user attributes.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
import pandas as pd
import sqlalchemy
import sqlalchemy.exc

from pilot import tracking
from pilot.config import (
    GenerationParams,
    GuidanceParams,
    LatentsParams,
    ParameterError,
    Stage1Config,
    Stage2Config,
    TuneParams,
)
from pilot.latents import LatentCache, plan_cache_build, write_cache
from pilot.methods.lora import LoraParams, lora_settings, train_lora
from pilot.models import CausalLM
from pilot.training.stage1 import apply_tuned, run_stage1
from pilot.training.stage2 import run_stage2

logger = logging.getLogger(__name__)

TUNED_KEYS = ("contrastive_weight", "rl_weight", "guidance_scale", "inject_layer")
_studies_opened = itertools.count()  # a process that tunes twice is two workers


def worker_name(config: TuneParams) -> str:
    """``tune.worker`` if set, else this host and process (unique among the study's live workers)."""
    if config.worker is not None:
        return str(config.worker)
    opened = next(_studies_opened)
    return f"{socket.gethostname()}-{os.getpid()}" + (f"-{opened}" if opened else "")


def worker_sampler_seed(sampler_seed: int, worker: str, previous_trials: int = 0) -> int:
    """The sampler seed of one worker: a hash of the configured seed, the worker's name and the
    number of trials that worker already ran in the study (so a rerun does not replay its points)."""
    digest = hashlib.sha256(f"{sampler_seed}/{worker}/{previous_trials}".encode()).digest()
    return int.from_bytes(digest[:4], "little")  # numpy seeds are 32-bit


class StorageUnavailableError(RuntimeError):
    """The study's database server cannot be reached or refuses this client."""


def _masked(url: str) -> str:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def check_storage(url: str, timeout_s: int = 5) -> None:
    """Raise :class:`StorageUnavailableError` (one sentence) if a server-backed study storage
    (PostgreSQL, MySQL) does not accept a connection now; SQLite files need no server."""
    if url.startswith("sqlite"):
        return
    connect_args = {"connect_timeout": timeout_s} if url.startswith("postgresql") else {}
    engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise StorageUnavailableError(
            f"Optuna storage '{_masked(url)}' is unreachable ({reason}); start the local services with "
            "`make services` (and set PGPASSFILE or PGPASSWORD, see docs/shared_services.md), or fix tune.storage.") from error
    finally:
        engine.dispose()


def _rdb_storage(url: str, engine_kwargs: dict, config: TuneParams) -> optuna.storages.RDBStorage:
    """The storage, created once even when several workers start together on a new database: the
    losers of Optuna's race to create the tables and write the schema version retry and find the
    schema in place.

    Running trials send heartbeats; the next worker to ask for a trial marks one whose worker died
    (no heartbeat for the grace period) FAIL and queues its parameters again as a new trial, whose
    ``retry_history`` system attribute names the trials it retries.
    """
    def storage() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.x: not news
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=config.max_retry)

            def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                retries = len(trial.system_attrs.get("retry_history", [])) + 1  # (retry() appends to it)
                retry(study, trial)  # before tracking: a slow tracking server must not delay the requeue
                requeued = config.max_retry is None or retries <= config.max_retry
                logger.warning("Trial %d of worker %s stopped beating (its worker died): failed%s", trial.number,
                               trial.user_attrs.get("worker", "?"),
                               ", its point queued again" if requeued else f", not retried (tune.max_retry={config.max_retry})")
                tracking.mark_killed(trial.user_attrs.get("mlflow_run_id"))

            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=config.heartbeat_interval_s,
                                              grace_period=config.grace_period_s,
                                              heartbeat_stale_trial_callback=on_stale)

    for attempt in range(4):
        try:
            return storage()
        # SQLite: "database is locked"; PostgreSQL: DuplicateTable / UniqueViolation from concurrent CREATE TABLE
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
            time.sleep(0.2 * (attempt + 1))
    return storage()


def _create_or_load(config: TuneParams, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it (study creation is atomic in the storage)."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=config.pruner_warmup_steps)
    try:
        study = optuna.create_study(study_name=config.study_name, storage=storage, direction="maximize",
                                    pruner=pruner, load_if_exists=False)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=config.study_name, storage=storage, pruner=pruner), False


@dataclass(frozen=True)
class Worker:
    """One process taking part in a study: its name and the seed of its sampler."""

    name: str
    sampler_seed: int


def open_study(config: TuneParams, baseline: dict[str, float] | None = None) -> tuple[optuna.Study, Worker]:
    """Create or continue the study in its RDB storage, with this worker's own sampler.

    ``baseline`` (the configured, untuned weights) is queued as the first trial by the one
    process that creates the study, never twice when several workers start together.
    """
    url = config.storage
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several processes share one SQLite file: wait for the write lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        check_storage(url)
        # A database server may drop idle connections while a long trial trains: test before use.
        engine_kwargs = {"pool_pre_ping": True}
    storage = _rdb_storage(url, engine_kwargs, config)
    if not config.n_trials:  # a reader: the study must exist, and nothing is queued or run
        try:
            study = optuna.load_study(study_name=config.study_name, storage=storage)
        except KeyError as error:
            raise RuntimeError(f"Study '{config.study_name}' does not exist in {_masked(url)}; tune.n_trials=0 only "
                               "reads a study: run `kedro run --pipelines tune` first, or fix tune.study_name "
                               "/ tune.storage.") from error
        return study, Worker(worker_name(config), config.sampler_seed)
    study, created = _create_or_load(config, storage)
    if created and baseline:
        study.enqueue_trial(dict(baseline), user_attrs={"baseline": True})
    worker = worker_name(config)
    previous = sum(t.user_attrs.get("worker") == worker for t in study.get_trials(deepcopy=False))
    seed = worker_sampler_seed(config.sampler_seed, worker, previous)
    study.sampler = optuna.samplers.TPESampler(seed=seed)  # constant_liar (default): avoids running trials' points
    logger.info("Tuning worker %s samples with seed %d (%d earlier trials of this worker)", worker, seed, previous)
    return study, Worker(worker, seed)


def _recorded(objective: Callable[[optuna.Trial], float], worker: Worker) -> Callable[[optuna.Trial], float]:
    """``objective`` that first records which worker (and sampler seed) ran the trial."""
    run_id = tracking.active_run_id()

    @functools.wraps(objective)
    def recorded(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker.name)
        trial.set_user_attr("sampler_seed", worker.sampler_seed)
        if run_id:  # the worker's MLflow run: marked KILLED if this trial's worker dies
            trial.set_user_attr("mlflow_run_id", run_id)
        return objective(trial)

    return recorded


def suggest(trial: optuna.Trial, config: TuneParams) -> dict[str, float]:
    """The trial's point in the search space (log-uniform weights, optional guidance scale and
    injection layer)."""
    params = {
        "contrastive_weight": trial.suggest_float("contrastive_weight", config.contrastive_weight.low,
                                                  config.contrastive_weight.high, log=config.contrastive_weight.log),
        "rl_weight": trial.suggest_float("rl_weight", config.rl_weight.low, config.rl_weight.high,
                                         log=config.rl_weight.log),
    }
    if config.guidance_scale is not None:
        params["guidance_scale"] = trial.suggest_float("guidance_scale", config.guidance_scale.low,
                                                       config.guidance_scale.high, log=config.guidance_scale.log)
    if config.inject_layers:
        params["inject_layer"] = trial.suggest_categorical("inject_layer", list(config.inject_layers))
    return params


def site_cache(student: CausalLM, cache: LatentCache, teacher_plans: pd.DataFrame, train_rows: pd.DataFrame,
               guidance: GuidanceParams, configured: GuidanceParams, latents: LatentsParams,
               cache_dir: str) -> LatentCache:
    """The latent cache for a trial's (or an ablation variant's) site: the pipeline's own for the
    configured read and injection layers, otherwise one per pair of layers under ``cache_dir``,
    built once (shards already current are kept)."""
    layers = student.num_layers
    read, inject = guidance.read_layer % layers, guidance.inject_layer
    if (read, inject) == (configured.read_layer % layers, configured.inject_layer):
        return cache
    path = Path(cache_dir) / f"read_layer_{read}_inject_layer_{inject}"
    logger.info("Latent cache for read layer %d, injection layer %d: %s", read, inject, path)
    write_cache(plan_cache_build(teacher_plans, train_rows, student, guidance, latents), path)
    return LatentCache(path)


def pruning_reporter(trial: optuna.Trial) -> Callable[[int, float], None]:
    """The ``on_validation`` of a trial's training: report each validation accuracy, stop when pruned."""
    def report(step: int, value: float) -> None:
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {value:.3f} at step {step}")

    return report


def make_objective(student: CausalLM, cache: LatentCache, teacher_plans: pd.DataFrame, train_rows: pd.DataFrame,
                   val_rows: pd.DataFrame, guidance: GuidanceParams, latents: LatentsParams,
                   stage1: Stage1Config, stage2: Stage2Config, generation: GenerationParams,
                   config: TuneParams) -> Callable[[optuna.Trial], float]:
    for layer in config.inject_layers or []:
        try:
            guidance.model_copy(update={"inject_layer": layer}).check_against(student.num_layers)
        except ParameterError as error:
            raise ParameterError(f"Parameter 'tune.inject_layers' = {config.inject_layers}: layer {layer} does not "
                                 f"fit this student and guidance settings ({error})") from error

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, config)
        training, trial_guidance = apply_tuned({k: v for k, v in params.items() if k != "inject_layer"}, stage1,
                                               guidance)
        if "inject_layer" in params:
            trial_guidance = trial_guidance.model_copy(update={"inject_layer": params["inject_layer"]})
        trial_cache = site_cache(student, cache, teacher_plans, train_rows, trial_guidance, guidance, latents,
                                 config.cache_dir)
        training = training.model_copy(update={"steps": config.trial_steps, "eval_every": config.eval_every,
                                               "checkpoint_every": 0})


        result = run_stage1(student, trial_cache, teacher_plans, train_rows, val_rows, trial_guidance, latents, training,
                            generation, on_validation=pruning_reporter(trial))
        value = result.best_val_accuracy
        if config.stage2_steps:
            refine = stage2.model_copy(update={"steps": config.stage2_steps, "checkpoint_every": 0,
                                               "eval_every": config.stage2_steps})
            value = run_stage2(student, result.model, train_rows, val_rows, refine, generation).best_val_accuracy
        return value

    return objective


def make_lora_objective(student: CausalLM, train_rows: pd.DataFrame, val_rows: pd.DataFrame, budget: int,
                        lora: LoraParams, stage1: Stage1Config, generation: GenerationParams,
                        config: TuneParams, seed: int = 0) -> Callable[[optuna.Trial], float]:
    """LoRA's trials, on PILOT's terms: the same trial steps, validation cadence and pruner as
    stage 1's study; the rank stays pinned by the matched budget; learning rate and alpha ratio
    are searched (log-uniform)."""
    def objective(trial: optuna.Trial) -> float:
        point = {"learning_rate": trial.suggest_float("learning_rate", config.lora_learning_rate.low,
                                                      config.lora_learning_rate.high, log=config.lora_learning_rate.log),
                 "lora_alpha_ratio": trial.suggest_float("lora_alpha_ratio", config.lora_alpha_ratio.low,
                                                         config.lora_alpha_ratio.high, log=config.lora_alpha_ratio.log)}
        training, alpha_ratio = lora_settings(lora, stage1, seed, point)
        training = training.model_copy(update={"steps": config.trial_steps, "eval_every": config.eval_every})


        _, result = train_lora(student, train_rows, budget, lora.target_modules, lora.match_tolerance, alpha_ratio,
                               training, val_rows=val_rows, generation=generation,
                               on_validation=pruning_reporter(trial))
        return result.best_val_accuracy

    return objective


def tune(objective: Callable[[optuna.Trial], float], config: TuneParams,
         callbacks: list[Callable] | None = None, baseline: dict[str, float] | None = None) -> optuna.Study:
    """Run ``n_trials`` (or until ``timeout_s``) in this process; failed trials do not stop the study.

    ``baseline`` (the configured, untuned weights) is queued as the first trial of a new study, so
    the study itself measures the untuned default the same way as every tuned point.
    """
    study, worker = open_study(config, baseline)
    if config.n_trials:
        study.optimize(_recorded(objective, worker), n_trials=config.n_trials, timeout=config.timeout_s,
                       catch=(Exception,), callbacks=callbacks or [], show_progress_bar=True, gc_after_trial=True)
    settle(study, config.wait_for_workers_s)
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    logger.info("Study %s: %d trials in storage (%s)", config.study_name, len(study.trials), states)
    return study


def settle(study: optuna.Study, timeout_s: float | None) -> None:
    """Wait for the trials other workers are running now, so what this worker reports includes them.

    A trial of a worker that died meanwhile stops beating: :func:`optuna.storages.fail_stale_trials`
    marks it FAIL on a later poll (and queues its point again, for the next worker that runs trials).
    Gives up after ``timeout_s`` (``None``: never), warning that those trials are not included.
    """
    running = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    if running:
        logger.info("Waiting for %d trial(s) running in other workers (%s), so the best weights include them",
                    len(running), sorted(running))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while running:
        time.sleep(2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        still = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
        running &= still
        if running and deadline is not None and time.monotonic() > deadline:
            logger.warning("Trial(s) %s of other workers still run after %.0f s; the best weights leave them out "
                           "(raise tune.wait_for_workers_s to wait longer)", sorted(running), timeout_s)
            return
    queued = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    if queued:
        logger.warning("%d queued trial(s) (retries of dead workers' trials) are not evaluated yet: the next "
                       "`kedro run --pipelines tune` with tune.n_trials > 0 runs them first", queued)


def best_weights(study: optuna.Study, keys: tuple[str, ...] = TUNED_KEYS) -> dict:
    """The best trial's values of ``keys``, for stage 1 (``stage1.use_tuned_weights``) or LoRA."""
    try:
        best = study.best_trial
    except ValueError as error:
        raise RuntimeError(f"Study '{study.study_name}' has no completed trial yet; every trial failed or was "
                           "pruned. Look at the trials table and the log.") from error
    weights = {k: v for k, v in best.params.items() if k in keys}
    summary = {**weights, "best_val_accuracy": best.value, "trial": best.number, "study": study.study_name}
    baseline = [t for t in study.trials if t.user_attrs.get("baseline") and t.value is not None]
    if baseline:
        summary["baseline_val_accuracy"] = baseline[0].value
        logger.info("Best validation accuracy %.3f (trial %d) vs %.3f for the untuned weights %s", best.value,
                    best.number, baseline[0].value, baseline[0].params)
    return summary


def trials_table(study: optuna.Study) -> pd.DataFrame:
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds()
    return frame


def study_plots(study: optuna.Study) -> tuple[plt.Figure, plt.Figure]:
    """Optimization history and parameter importances (a note instead when too few trials finished)."""
    from optuna.visualization import matplotlib as optuna_plots

    figures = []
    for draw, title in ((optuna_plots.plot_optimization_history, "optimization history"),
                        (optuna_plots.plot_param_importances, "parameter importances")):
        try:
            axis = draw(study)
            figure = axis.figure if hasattr(axis, "figure") else axis[0].figure
        except (ValueError, RuntimeError) as error:
            figure, axis = plt.subplots(figsize=(6, 3))
            axis.axis("off")
            axis.text(0.5, 0.5, f"No {title} yet:\n{error}", ha="center", va="center", wrap=True)
        figure.set_size_inches(7, 4)
        figure.tight_layout()
        figures.append(figure)
    return figures[0], figures[1]
