"""Figures for the report: accuracy by method and task, latency, training curves, guidance map."""

from __future__ import annotations

import sys

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # headless in pipelines; a notebook keeps its inline backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402


def accuracy_by_method(results: pd.DataFrame) -> plt.Figure:
    """Grouped bars: accuracy per task (and overall) for each method, with 95 % intervals; the
    out-of-distribution split's groups follow, marked "(ood)"."""
    if "split" in results:
        ood = results["split"] == "test_ood"
        results = results.assign(task=results["task"].where(~ood, results["task"] + " (ood)"))
        tasks = [t for split in ("test", "test_ood") for t in
                 sorted(t for t in results.loc[results["split"] == split, "task"].unique() if not t.startswith("overall"))
                 + [t for t in ("overall", "overall (ood)") if t in set(results.loc[results["split"] == split, "task"])]]
    else:
        tasks = sorted(t for t in results["task"].unique() if t != "overall") + ["overall"]
    # The methods in the order of the story (baselines, then PILOT), any others after them.
    from pilot.methods.registry import method_names   # every baseline's dependencies: only when plotting

    order, present = method_names(), list(dict.fromkeys(results["method"]))
    methods = [m for m in order if m in present] + [m for m in present if m not in order]
    width = 0.8 / len(methods)
    figure, axis = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 4.2))
    for i, method in enumerate(methods):
        part = results[results["method"] == method].set_index("task").reindex(tasks)
        x = np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width
        errors = np.vstack([part["accuracy"] - part["ci_low"], part["ci_high"] - part["accuracy"]])
        axis.bar(x, part["accuracy"], width, yerr=errors, capsize=2, label=method)
    axis.set_xticks(np.arange(len(tasks)), tasks)
    axis.set_ylim(0, 1)
    axis.set_ylabel("test accuracy (95 % CI)")
    axis.set_title("Accuracy by method and task")
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    return figure


def latency_by_method(results: pd.DataFrame) -> plt.Figure:
    """Median latency per query of each method (overall rows), log scale."""
    overall = results[(results["task"] == "overall") & (results.get("split", "test") == "test")]
    overall = overall.sort_values("median_ms_per_query")
    figure, axis = plt.subplots(figsize=(6.5, 0.6 + 0.45 * len(overall)))
    axis.barh(overall["method"], overall["median_ms_per_query"], color="tab:gray")
    axis.set_xscale("log")
    axis.set_xlabel("median ms per query (fixed batch size)")
    axis.set_title("Latency by method")
    for y, value in enumerate(overall["median_ms_per_query"]):
        axis.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    figure.tight_layout()
    return figure


def training_curves(stage1_history: pd.DataFrame, stage1_validation: pd.DataFrame,
                    stage2_history: pd.DataFrame, stage2_validation: pd.DataFrame) -> plt.Figure:
    """Stage-1 loss terms; stage-2 rollouts (reward mean and std, the zero-variance fraction, clip
    fraction); stage-2 policy (KL to stage 1, entropy, reply length); each term's gradient norm on
    the hyper-network (stage 2 continues stage 1's steps); validation accuracy of both stages."""
    figure, axes = plt.subplots(1, 5, figsize=(22, 3.8))
    for name in ("alignment", "contrastive", "lm", "latent_rl"):
        if name in stage1_history:
            series = stage1_history[["step", name]].dropna()
            axes[0].plot(series["step"], series[name].rolling(10, min_periods=1).mean(), label=name)
    axes[0].set_title("Stage 1 losses (rolling mean)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    # Older histories (before TRL's names) logged `reward` and `zero_variance_groups`.
    rollouts = (("rewards/mean", "reward", "tab:green", "reward mean"), ("rewards/std", None, "tab:olive", "reward std"),
                ("frac_reward_zero_std", "zero_variance_groups", "tab:red", "groups with one reward"),
                ("clip_ratio", None, "tab:purple", "clip ratio"),
                ("greedy_accuracy", None, "tab:brown", "greedy accuracy (policy_groups: greedy_wrong)"))
    for name, old, color, label in rollouts:
        column = name if name in stage2_history else old if old in stage2_history else None
        if column is not None:
            series = stage2_history[["step", column]].dropna()
            axes[1].plot(series["step"], series[column].rolling(10, min_periods=1).mean(), color=color, label=label)
    axes[1].set_title("Stage 2 rollouts (rolling mean)")
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=8)
    length_axis = axes[2].twinx()
    for name, axis, color in (("kl", axes[2], "tab:blue"), ("entropy", axes[2], "tab:orange"),
                              ("completion_length", length_axis, "tab:gray")):
        if name in stage2_history:
            series = stage2_history[["step", name]].dropna()
            axis.plot(series["step"], series[name].rolling(10, min_periods=1).mean(), color=color, label=name)
    axes[2].set_title("Stage 2 policy: KL to stage 1, entropy, reply length")
    axes[2].set_xlabel("step")
    length_axis.set_ylabel("completion_length (tokens)", fontsize=8)
    handles = axes[2].get_legend_handles_labels()[0] + length_axis.get_legend_handles_labels()[0]
    if handles:
        axes[2].legend(handles=handles, fontsize=8)
    offset = int(stage1_validation["step"].max()) if len(stage1_validation) else 0
    for history, shift, style in ((stage1_history, 0, "-"), (stage2_history, offset, "--")):
        for column in (c for c in history.columns if c.startswith("grad_norm/")):
            series = history[["step", column]].dropna()
            series = series[series[column] > 0]  # a term that reached no parameter that step
            if len(series):
                axes[3].plot(series["step"] + shift, series[column], style, label=column.removeprefix("grad_norm/"))
    axes[3].set_yscale("log")
    axes[3].set_title("Gradient norm of each weighted term")
    axes[3].set_xlabel("step (stage 2 dashed, after stage 1)")
    if axes[3].lines:
        axes[3].legend(fontsize=7, ncol=2)
    axes[4].plot(stage1_validation["step"], stage1_validation["val_accuracy"], marker="o", label="stage 1")
    axes[4].plot(stage2_validation["step"] + offset, stage2_validation["val_accuracy"], marker="o", label="stage 2")
    axes[4].set_title("Validation accuracy")
    axes[4].set_xlabel("step (stage 2 continues stage 1)")
    axes[4].set_ylim(0, 1)
    axes[4].legend(fontsize=8)
    figure.tight_layout()
    return figure


def guidance_map(vectors: torch.Tensor, labels: list[str]) -> plt.Figure:
    """A 2-D PCA projection of guidance vectors, coloured by task."""
    data = vectors.float() - vectors.float().mean(0, keepdim=True)
    _, _, components = torch.pca_lowrank(data, q=2, center=False)
    points = (data @ components[:, :2]).numpy()
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    for label in sorted(set(labels)):
        mask = np.array([value == label for value in labels])
        axis.scatter(points[mask, 0], points[mask, 1], s=8, alpha=0.6, label=label)
    axis.set_title("Guidance vectors (PCA)")
    axis.set_xlabel("PC 1")
    axis.set_ylabel("PC 2")
    axis.legend(fontsize=8, markerscale=2)
    figure.tight_layout()
    return figure
