"""Each pipeline on its own, spaceflights-style: a small catalog in memory, Kedro's SequentialRunner.

The pipelines run in the method's order at the test environment's scale (conf/test), each reading
only what the previous ones put in the catalog. Datasets stay in memory except the latent cache,
whose chunk-by-chunk saving is what its pipeline is about. The one end-to-end ``kedro run``
through a KedroSession (hooks, MLflow, files) is tests/test_run.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import pytest
import torch
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from pilot.config import GuidanceParams
from pilot.framework.datasets import LatentCacheDataset, LatentShardsDataset
from pilot.framework.hooks import validate_parameters
from pilot.guidance import HyperNetwork
from pilot.latents import LatentCache
from pilot.methods import Attached, Method, TrainingData
from pilot.methods.caa import Caa, CaaSteering, steered
from pilot.methods.registry import method_names, registered
from pilot.models import CausalLM
from pilot.pipelines import base, baselines, data, evaluation, latents, plans, stage1, stage2
from pilot.settings import CONFIG_LOADER_ARGS
from tests.conftest import ROOT

PIPELINES = (data, base, plans, latents, stage1, stage2, baselines, evaluation)


class KeptDataset(MemoryDataset):
    """A MemoryDataset the runner cannot empty: the test reads every output after the run."""

    def _release(self) -> None:
        pass


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> DataCatalog:
    """Typed test-environment parameters in memory; the latent cache in a scratch folder."""
    params = validate_parameters(OmegaConfigLoader(str(ROOT / "conf"), env="test", **CONFIG_LOADER_ARGS)["parameters"])
    cache = tmp_path_factory.mktemp("latents") / "latent_cache"
    datasets = {f"params:{key}": MemoryDataset(value, copy_mode="assign") for key, value in params.items()}
    datasets["params:seed"] = MemoryDataset(0)
    datasets["latent_cache"] = LatentCacheDataset(str(cache))
    datasets["latent_cache_shards"] = LatentShardsDataset(str(cache))
    datasets["tuned_loss_weights"] = MemoryDataset({})
    datasets["tuned_lora"] = MemoryDataset({})
    for module in PIPELINES:
        datasets.update({name: KeptDataset() for name in module.create_pipeline().all_outputs() if name not in datasets})
    return DataCatalog(datasets=datasets)


def _run(module, catalog: DataCatalog) -> dict:
    pipeline = module.create_pipeline()
    missing = {name for name in pipeline.inputs() if not catalog.exists(name) and not name.startswith("params:")}
    assert not missing, f"{module.__name__} needs {missing} from an earlier pipeline"
    SequentialRunner().run(pipeline, catalog)
    return {name: catalog.load(name) for name in pipeline.all_outputs()}


@pytest.fixture(scope="module")
def outputs(catalog) -> dict[str, dict]:
    torch.manual_seed(0)
    return {module.__name__.rsplit(".", 1)[-1]: _run(module, catalog)
            for module in PIPELINES}


def test_data_splits_are_disjoint_and_sized_as_configured(outputs, catalog):
    out, config = outputs["data"], catalog.load("params:data")
    train, val, test = out["tasks_train"], out["tasks_val"], out["tasks_test"]
    assert set(train["question"]).isdisjoint(test["question"]) and set(val["question"]).isdisjoint(test["question"])
    in_distribution, ood = test[test["split"] == "test"], test[test["split"] == "test_ood"]
    assert (in_distribution.groupby("task").size() == config.test_per_task).all()
    with_ood = {t.name for t in config.tasks if t.ood_kwargs}
    assert set(ood["task"]) == with_ood and (ood.groupby("task").size() == config.ood_per_task).all()
    assert (val.groupby("task").size() == config.val_per_task).all()
    assert sum(v["value"] for v in out["task_counts"].values()) == len(train) + len(val) + len(test)


def test_base_trains_both_models_and_measures_the_plan_gap(outputs, catalog):
    out, config = outputs["base"], catalog.load("params:base")
    assert out["student_model"].num_layers == config.student.num_layers
    assert out["teacher_model"].num_layers == config.teacher.num_layers
    history = out["student_training_history"]
    assert len(history) == config.student.training.steps and history["step"].tolist()[0] == 1
    assert history["lm"].iloc[-20:].mean() < history["lm"].iloc[:20].mean()  # it learned
    assert set(out["plan_gap_table"]["method"]) == {"student_no_plan", "student_oracle_plan"}


def test_plans_cover_every_row_and_keep_what_the_environment_asks(outputs):
    out, data_out = outputs["plans"], outputs["data"]
    rows = sum(len(data_out[f"tasks_{s}"]) for s in ("train", "val", "test"))
    assert len(out["teacher_plans"]) == rows and out["teacher_plans"]["kept"].all()  # conf/test: keep all
    assert out["teacher_plans"]["plan"].str.len().gt(0).any()


def test_latents_write_the_cache_shard_by_shard_and_resume(outputs, catalog):
    manifest = catalog.load("latent_cache").manifest
    kept_train = outputs["plans"]["teacher_plans"].query("split == 'train' and kept")
    assert manifest["num_examples"] == len(kept_train) and manifest["computed_shards"] == len(manifest["shards"])
    assert outputs["latents"]["latent_cache_metrics"]["cache_examples"]["value"] == len(kept_train)
    # A second run finds every shard on disk and computes nothing.
    _run(latents, catalog)
    assert LatentCache(manifest and catalog.load("latent_cache").directory).manifest["computed_shards"] == 0


def test_stage1_and_stage2_train_hypernetworks_selected_on_validation(outputs, catalog):
    for stage in ("stage1", "stage2"):
        out, config = outputs[stage], catalog.load(f"params:{stage}").training
        assert isinstance(out[f"hypernet_{stage}"], HyperNetwork)
        assert len(out[f"{stage}_history"]) == config.steps
        validation = out[f"{stage}_validation"]
        assert out[f"{stage}_metrics"]["best_val_accuracy"]["value"] == validation["val_accuracy"].max()
    assert {"alignment", "contrastive", "lm", "latent_rl", "total"} <= set(outputs["stage1"]["stage1_history"])
    assert {"policy", "self_supervision", "anchor", "rewards/mean", "frac_reward_zero_std", "kl", "clip_ratio"} \
        <= set(outputs["stage2"]["stage2_history"])


def test_baselines_match_the_budget_and_choose_a_configured_caa_scale(outputs, catalog):
    out = outputs["baselines"]
    budget = out["lora_metrics"]["hypernet_parameters"]["value"]
    assert abs(out["lora_metrics"]["lora_parameters"]["value"] - budget) <= 0.1 * budget
    caa = out["caa_artefact"]
    assert caa.scale in Caa.own_params(catalog.load("params:baselines")).scales
    assert caa.scale == out["caa_history"].loc[out["caa_history"]["val_accuracy"].idxmax(), "scale"]
    assert caa.vector.shape == (catalog.load("params:base").student.hidden_size,)


def test_evaluation_scores_every_method_on_the_same_questions(outputs):
    out = outputs["evaluation"]
    predictions, table = out["predictions"], out["results_table"]
    assert set(predictions["method"]) == set(method_names())
    ids = predictions.groupby("method")["id"].apply(lambda s: tuple(sorted(s)))
    assert ids.nunique() == 1  # the same test questions for every method
    assert set(predictions["split"]) == {"test", "test_ood"}  # every method on both test splits
    overall = table[table["task"] == "overall"].set_index(["split", "method"])["accuracy"]
    pd.testing.assert_series_equal(overall.sort_index(),
                                   predictions.groupby(["split", "method"])["correct"].mean().sort_index(),
                                   check_names=False)
    lines = out["results_markdown"].splitlines()
    assert lines[2] == "## Test split (in distribution)"
    assert any(line.startswith("## Out-of-distribution test split") for line in lines)
    header = lines[4]
    assert [cell.strip() for cell in header.strip("|").split("|")][:4] == ["method", "task", "n", "accuracy"]
    assert "paired_difference" in header and "gap_recovered" in header
    assert any("pilot_stage2" in line and "vs pilot_stage1, McNemar p=" in line for line in lines)
    metrics = out["results_metrics"]
    assert {"pilot_stage1_accuracy", "pilot_stage1_ood_accuracy", "lora_ood_accuracy",
            "pilot_stage2_paired_p_value", "pilot_stage2_paired_difference"} <= set(metrics)


@dataclass
class ReversedSteering(Method):
    """A method made up for this test, in one class: CAA's steering vector subtracted instead of added."""

    name: ClassVar[str] = "reversed_steering"
    inputs: ClassVar[tuple[str, ...]] = ("caa_artefact", "params:guidance")
    caa_artefact: CaaSteering
    guidance: GuidanceParams

    @contextmanager
    def attach(self, student: CausalLM) -> Iterator[Attached]:
        reversed_vector = {**self.caa_artefact.steering, "vector": -self.caa_artefact.vector}
        with steered(student, reversed_vector, self.guidance.inject_layer, 1.0, 1) as steering:
            yield Attached(student, guidance=steering)

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        return {"guidance_inject_layer": self.guidance.inject_layer, "guidance_scale": 1.0,
                "training_data_rows": data.cached_rows}


def test_a_registered_method_flows_through_evaluation(outputs, catalog):
    """A new method is its class and one registration: the evaluation pipeline answers the test
    splits with it, times it beside the others, describes it and reports it, and no node reads more
    than eight inputs. The other methods answer exactly as before."""
    with registered(ReversedSteering):
        pipeline = evaluation.create_pipeline()
        assert {"method_reversed_steering_node", "evaluate_reversed_steering_node"} <= {n.name for n in pipeline.nodes}
        assert max(len(n.inputs) for n in pipeline.nodes) <= 8
        for name in pipeline.all_outputs() - set(catalog.filter()):
            catalog[name] = KeptDataset()
        SequentialRunner().run(pipeline, catalog)
    assert "reversed_steering" not in method_names()   # registered only inside the block
    predictions = catalog.load("predictions")
    new = predictions[predictions["method"] == "reversed_steering"]
    before = outputs["evaluation"]["predictions"]
    assert sorted(new["id"]) == sorted(before.loc[before["method"] == "zero_shot", "id"])   # every test question
    columns = ["method", "id", "split", "prediction", "correct", "new_tokens"]
    pd.testing.assert_frame_equal(predictions.loc[predictions["method"] != "reversed_steering", columns]
                                  .reset_index(drop=True), before[columns].reset_index(drop=True))
    table = catalog.load("results_table").set_index(["split", "method", "task"])
    for split in ("test", "test_ood"):
        assert table.loc[(split, "reversed_steering", "overall"), "accuracy"] == \
            new.loc[new["split"] == split, "correct"].mean()
    assert table.loc[("test", "reversed_steering", "overall"), "median_ms_per_query"] > 0   # timed beside the others
    settings = catalog.load("method_settings")["reversed_steering"]
    assert settings["trainable_parameters"] == "0" and settings["guidance_scale"] == "1.0"
    assert settings["guidance_inject_layer"] == str(catalog.load("params:guidance").inject_layer)
    assert any("| reversed_steering |" in line for line in catalog.load("results_markdown").splitlines())


def test_no_node_of_any_pipeline_reads_more_than_eight_inputs():
    import importlib
    import pkgutil

    import pilot.pipelines

    crowded = {}
    for module in pkgutil.iter_modules(pilot.pipelines.__path__):
        package = importlib.import_module(f"pilot.pipelines.{module.name}")
        if hasattr(package, "create_pipeline"):
            crowded.update({node.name: len(node.inputs) for node in package.create_pipeline().nodes
                            if len(node.inputs) > 8})
    assert crowded == {}
