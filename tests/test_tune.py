"""The `tune` pipeline: a few Optuna trials in the test environment, shared storage, failures."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import kedro_cli, make_project, run, same_code_env


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A test-environment project with everything the tune pipeline reads."""
    monkeypatch = pytest.MonkeyPatch()
    project = make_project(tmp_path_factory.mktemp("tune"))
    try:
        for pipeline in ("data", "base", "plans", "latents"):
            run(project, monkeypatch, pipeline)
        yield project
    finally:
        monkeypatch.undo()
        mlflow.set_tracking_uri(None)


def run_params(project) -> dict:
    """The parameters the test environment resolves to (conf/base overridden by conf/test)."""
    from kedro.config import OmegaConfigLoader

    from pilot.settings import CONFIG_LOADER_ARGS

    return OmegaConfigLoader(str(project / "conf"), env="test", **CONFIG_LOADER_ARGS)["parameters"]


def _storage(project):
    return f"sqlite:///{project / 'data/07_model_output/optuna.db'}"


def test_tune_writes_best_weights_plots_and_nested_mlflow_runs(project, monkeypatch):
    run(project, monkeypatch, "tune")
    weights = json.loads((project / "data/06_models/tuned_loss_weights.json").read_text())
    assert {"contrastive_weight", "rl_weight", "best_val_accuracy"} <= set(weights)
    assert 0.01 <= weights["contrastive_weight"] <= 1.0 and 0.01 <= weights["rl_weight"] <= 1.0
    for plot in ("tune_history.png", "tune_importances.png"):
        assert (project / "data/08_reporting" / plot).stat().st_size > 1000
    study = optuna.load_study(study_name="pilot-stage1-loss-balance", storage=_storage(project))
    assert len(study.trials) == 3
    # The untuned weights are measured first, the same way, as the reference the study must beat.
    configured = run_params(project)["stage1"]["training"]
    assert study.trials[0].user_attrs["baseline"] is True
    assert all(not t.user_attrs.get("baseline") for t in study.trials[1:])
    assert study.trials[0].params == {k: configured[k] for k in ("contrastive_weight", "rl_weight")}
    assert weights["baseline_val_accuracy"] == study.trials[0].value

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pilot").experiment_id])
    tune_run = next(r for r in runs if r.info.run_name == "tune")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_run.info.run_id]
    assert len(trials) == 3
    assert all({"contrastive_weight", "rl_weight"} <= set(r.data.params) for r in trials)
    finished = [r for r in trials if r.data.tags.get("state") == "COMPLETE"]
    assert finished and all("val_accuracy" in r.data.metrics for r in finished)

    # stage 1 picks the tuned weights up when told to
    run(project, monkeypatch, "stage1", params={"stage1": {"use_tuned_weights": True, "resume": False}})
    stage1 = [r for r in client.search_runs([client.get_experiment_by_name("pilot").experiment_id])
              if r.info.run_name == "stage1"][0]
    assert stage1.data.params["stage1.use_tuned_weights"] == "True"


def test_two_processes_share_one_study_and_record_every_trial(project):
    before = len(optuna.load_study(study_name="pilot-stage1-loss-balance", storage=_storage(project)).trials) \
        if (project / "data/07_model_output/optuna.db").exists() else 0
    jobs = [kedro_cli(project, "run", "--pipelines", "tune", "--env", "test") for _ in range(2)]
    outputs = [job.communicate(timeout=900)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    study = optuna.load_study(study_name="pilot-stage1-loss-balance", storage=_storage(project))
    assert len(study.trials) == before + 6
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    assert len({t.number for t in study.trials}) == len(study.trials)


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    from pilot.config import TuneParams
    from pilot.tuning import tune

    config = TuneParams(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="failures", n_trials=4)

    def objective(trial):
        value = trial.suggest_float("contrastive_weight", 0.01, 1.0, log=True)
        if trial.number == 1:
            raise RuntimeError("this trial's training diverged")
        return value

    study = tune(objective, config)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3


WORKER = Path(__file__).parent / "jobs" / "tune_worker.py"


def test_parallel_workers_never_propose_the_same_point(tmp_path):
    """Two real processes on one new SQLite study: each samples with its own seed (both configured
    with tune.sampler_seed = 0), so no point is evaluated twice, and the untuned baseline is queued
    once although both workers start on an empty study."""
    from pilot.tuning import worker_sampler_seed

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    jobs = [subprocess.Popen([sys.executable, str(WORKER), storage, "8"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=same_code_env()) for _ in range(2)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs

    trials = optuna.load_study(study_name="parallel", storage=storage).trials
    assert len(trials) == 16
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == len(points), "two trials evaluated the same point"

    workers = {t.user_attrs["worker"] for t in trials}
    assert workers == {f"{socket.gethostname()}-{job.pid}" for job in jobs}
    for worker in workers:  # every trial records its worker's own seed, derived from seed 0 and the worker
        seeds = {t.user_attrs["sampler_seed"] for t in trials if t.user_attrs["worker"] == worker}
        assert seeds == {worker_sampler_seed(0, worker, 0)}
    assert len({worker_sampler_seed(0, w, 0) for w in workers}) == 2
    # both workers really ran in parallel on the one study (their trials interleave)
    order = [t.user_attrs["worker"] for t in sorted(trials, key=lambda t: t.datetime_start)]
    assert sum(a != b for a, b in zip(order, order[1:])) >= 2


def test_a_rerun_of_the_same_named_worker_does_not_replay_its_points(tmp_path):
    from pilot.config import TuneParams
    from pilot.tuning import tune

    config = TuneParams(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="rerun", n_trials=4, worker="a")

    def objective(trial):
        return trial.suggest_float("contrastive_weight", 0.01, 1.0, log=True)

    tune(objective, config)
    study = tune(objective, config)  # the same explicit name, seed and study: a continued run
    points = [t.params["contrastive_weight"] for t in study.trials]
    assert len(points) == 8 and len(set(points)) == 8
    assert len({t.user_attrs["sampler_seed"] for t in study.trials}) == 2
    assert {t.user_attrs["worker"] for t in study.trials} == {"a"}


def test_a_worker_that_ends_first_reports_the_whole_study(tmp_path):
    """Worker `fast` ends its trial while `slow` still runs one: `fast` waits, so its best weights
    include `slow`'s (better) trial; a worker with n_trials=0 reads the same best from the study."""
    import threading
    import time

    from pilot.config import TuneParams
    from pilot.tuning import best_weights, tune

    config = TuneParams(storage=f"sqlite:///{tmp_path}/study.db", study_name="settle", n_trials=1,
                        enqueue_baseline=False, heartbeat_interval_s=1, grace_period_s=5)
    started = threading.Event()

    def slow(trial) -> float:
        trial.suggest_float("contrastive_weight", 0.01, 1.0, log=True)
        trial.suggest_float("rl_weight", 0.01, 1.0, log=True)
        started.set()
        time.sleep(4)
        return 1.0

    def fast(trial) -> float:
        trial.suggest_float("contrastive_weight", 0.01, 1.0, log=True)
        trial.suggest_float("rl_weight", 0.01, 1.0, log=True)
        return 0.5

    slow_worker = threading.Thread(target=tune, args=(slow, config.model_copy(update={"worker": "slow"})))
    slow_worker.start()
    assert started.wait(60)
    study = tune(fast, config.model_copy(update={"worker": "fast"}))
    # `fast` returned only after `slow`'s trial ended: read from the storage at once (the `slow` thread itself
    # may still be on its way out of optuna's optimize loop, for a while on a busy machine)
    ended = {t.user_attrs["worker"]: t.state for t in optuna.load_study(study_name="settle", storage=config.storage).trials}
    assert ended == {"slow": optuna.trial.TrialState.COMPLETE, "fast": optuna.trial.TrialState.COMPLETE}
    slow_worker.join(timeout=60)
    assert not slow_worker.is_alive()
    fast_best = best_weights(study)
    assert fast_best["best_val_accuracy"] == 1.0
    assert study.trials[fast_best["trial"]].user_attrs["worker"] == "slow"
    reader = tune(fast, config.model_copy(update={"worker": "reader", "n_trials": 0}))
    assert len(reader.trials) == 2 and best_weights(reader) == fast_best
    with pytest.raises(RuntimeError, match="Study 'typo' does not exist .* only reads a study"):
        tune(fast, config.model_copy(update={"study_name": "typo", "n_trials": 0}))


def test_the_injection_layer_is_searched_with_a_latent_cache_per_layer(tiny_lm, task_table, tmp_path):
    from pilot.config import GenerationParams, ParameterError, Stage1Config, Stage2Config, TuneParams
    from pilot.latents import LatentCache
    from pilot.training.stage1 import apply_tuned
    from pilot.tuning import make_objective, site_cache
    from tests.conftest import stage1_inputs

    plans, site, latents = stage1_inputs(tiny_lm, task_table, tmp_path)
    config = TuneParams(storage=f"sqlite:///{tmp_path / 'study.db'}", trial_steps=2, eval_every=2,
                        inject_layers=[0, 1], cache_dir=str(tmp_path / "tune_latents"))
    train, val = task_table[task_table["split"] == "train"], task_table[task_table["split"] == "val"].head(8)
    stage1 = Stage1Config(batch_size=8, rl_batch=2, rl_samples=2)
    objective = make_objective(tiny_lm, LatentCache(tmp_path / "cache"), plans, train, val, site, latents,
                               stage1, Stage2Config(), GenerationParams(max_new_tokens=8), config)
    point = {"contrastive_weight": 0.1, "rl_weight": 0.1}
    assert 0.0 <= objective(optuna.trial.FixedTrial({**point, "inject_layer": 0})) <= 1.0
    assert not (tmp_path / "tune_latents").exists()            # the configured layer uses the pipeline's cache
    assert 0.0 <= objective(optuna.trial.FixedTrial({**point, "inject_layer": 1})) <= 1.0
    built = LatentCache(tmp_path / "tune_latents" / f"read_layer_{site.read_layer % tiny_lm.num_layers}_inject_layer_1")
    assert json.loads((built.directory / "manifest.json").read_text())["settings"]["inject_layer"] == 1
    other_read = site.model_copy(update={"read_layer": (site.read_layer + 1) % tiny_lm.num_layers})
    read_cache = site_cache(tiny_lm, LatentCache(tmp_path / "cache"), plans, task_table, other_read, site, latents,
                            str(tmp_path / "tune_latents"))           # another read layer: another cache too
    settings = json.loads((read_cache.directory / "manifest.json").read_text())["settings"]
    assert (settings["read_layer"], settings["inject_layer"]) == (other_read.read_layer, site.inject_layer)

    with pytest.raises(ParameterError, match=r"'tune.inject_layers' = \[0, 5\]: layer 5 does not fit"):
        make_objective(tiny_lm, LatentCache(tmp_path / "cache"), plans, train, val, site, latents, stage1,
                       Stage2Config(), GenerationParams(), config.model_copy(update={"inject_layers": [0, 5]}))
    with pytest.raises(ParameterError, match="--params guidance.inject_layer=1"):
        apply_tuned({**point, "inject_layer": 1}, stage1, site)


def test_lora_gets_pilots_tuning_budget_through_the_same_machinery(project, monkeypatch):
    run(project, monkeypatch, "tune_lora")
    tuned = json.loads((project / "data/06_models/tuned_lora.json").read_text())
    assert {"learning_rate", "lora_alpha_ratio", "best_val_accuracy", "baseline_val_accuracy"} <= set(tuned)
    configured = run_params(project)
    study = optuna.load_study(study_name="pilot-lora-baseline", storage=_storage(project))
    assert len(study.trials) == configured["tune"]["n_trials"]  # PILOT's trial count, steps and pruner
    assert study.trials[0].user_attrs["baseline"] is True
    assert study.trials[0].params == {"learning_rate": configured["baselines"]["lora"]["training"]["learning_rate"],
                                      "lora_alpha_ratio": configured["baselines"]["lora"]["lora_alpha_ratio"]}
    # the baselines pipeline trains LoRA with them when told to
    run(project, monkeypatch, "baselines", params={"baselines": {"lora": {"use_tuned": True}}})
    adapter = json.loads((project / "data/06_models/lora_adapter/adapter_config.json").read_text())
    assert adapter["lora_alpha"] == pytest.approx(tuned["lora_alpha_ratio"] * adapter["r"])


def test_lora_settings_refuse_use_tuned_without_a_study():
    from pilot.config import Stage1Config
    from pilot.methods.lora import LoraParams, lora_settings

    with pytest.raises(ValueError, match="run `kedro run --pipelines tune_lora` first"):
        lora_settings(LoraParams(), Stage1Config(), seed=0, tuned={})
    config, alpha = lora_settings(LoraParams(), Stage1Config(steps=7, batch_size=5), seed=3,
                                  tuned={"learning_rate": 0.02, "lora_alpha_ratio": 4.0})
    assert (config.steps, config.batch_size, config.learning_rate, alpha, config.seed) == (7, 5, 0.02, 4.0, 3)
