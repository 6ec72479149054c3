"""Stage-1 step time and memory vs student size and vs sequence length (CPU), table and plot.

    python benchmarks/scaling.py [--steps 8] [--plot docs/scaling.png]

Each configuration runs in its own process (clean peak-memory figures): a randomly initialised
Llama student of the given size, a latent cache of 128 chain_sum examples with the given number
of terms (longer expressions, longer plans, longer sequences), then timed stage-1 steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, report

SIZES = [(128, 2), (256, 4), (384, 6), (512, 8), (640, 10)]   # (hidden, layers): ~0.6M .. ~66M parameters
TERMS = [3, 6, 10, 16]


def one(hidden: int, layers: int, terms: int, steps: int) -> dict:
    import torch

    from pilot.config import GuidanceParams, LatentsParams
    from pilot.latents import CachedLatents, LatentCache, plan_cache_build, select_examples, write_cache
    from pilot.models import build_causal_lm, count_parameters, train_tokenizer
    from pilot.prompts import answer_prompt, continuation
    from pilot.tasks import build_task_table
    from pilot.training.common import sample_batch
    from pilot.training.stage1 import GuidedStudent, make_hypernet, stage1_losses

    table = build_task_table([{"name": "chain_sum", "size": 160, "kwargs": {
        "min_terms": terms, "max_terms": terms, "min_digits": 1, "max_digits": 1}}], 8, 8, seed=0)
    tokenizer = train_tokenizer([answer_prompt(q, p) + continuation(a) for q, p, a in
                                 zip(table["question"], table["oracle_plan"], table["answer"])], 400)
    student = build_causal_lm(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=max(2, hidden // 64),
                              max_positions=512)
    plans = table[["id", "task", "split"]].assign(plan=table["oracle_plan"], kept=True)
    site = GuidanceParams(inject_layer=layers // 2, align_layers=[-1])
    latents = LatentsParams(shard_size=512)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_cache(plan_cache_build(plans, table, student, site, latents), folder)
        source = CachedLatents(LatentCache(folder).load())
    examples = select_examples(plans, table, ["train"])
    hypernet = make_hypernet(site, student, 0).train()
    guided = GuidedStudent(student, hypernet)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=1e-3)
    lengths = [len(tokenizer(answer_prompt(q) + continuation(a))["input_ids"])
               for q, a in zip(examples["question"], examples["answer"])]

    def step(i: int) -> None:
        index = torch.tensor(sample_batch(len(examples), 32, 0, i))
        batch = source.batch(index, "cpu")
        vectors = hypernet(batch.query_states, batch.query_mask)
        rows = index.tolist()
        terms_ = stage1_losses(guided, batch, vectors, [examples["question"][r] for r in rows],
                               [examples["answer"][r] for r in rows], [layers - 1], 0.1)
        sum(terms_.values()).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(0)
    started = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    seconds = (time.perf_counter() - started) / steps
    return {"hidden": hidden, "layers": layers, "params_m": count_parameters(student.model) / 1e6,
            "terms": terms, "seq_tokens": sum(lengths) / len(lengths), "ms_per_step": 1000 * seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "scaling.png"))
    parser.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, steps=args.steps)))
        return
    configs = [(h, l, 6) for h, l in SIZES] + [(256, 4, t) for t in TERMS if t != 6]
    rows = []
    for hidden, layers, terms in configs:
        out = subprocess.run([sys.executable, __file__, "--one", str(hidden), str(layers), str(terms),
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plot(rows, Path(args.plot))
    report("Stage-1 scaling (CPU, batch 32)", rows, [f"Plot: {args.plot}"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_size = [r for r in rows if r["terms"] == 6]
    by_length = sorted([r for r in rows if (r["hidden"], r["layers"]) == (256, 4)], key=lambda r: r["seq_tokens"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].loglog([r["params_m"] for r in by_size], [r["ms_per_step"] for r in by_size], marker="o")
    axes[0].set_xlabel("student parameters (M)")
    axes[0].set_ylabel("ms per stage-1 step")
    axes[0].set_title("vs student size (6-term chain_sum)")
    axes[1].plot([r["seq_tokens"] for r in by_length], [r["ms_per_step"] for r in by_length], marker="o")
    axes[1].set_xlabel("mean tokens per sequence")
    axes[1].set_title("vs sequence length (256 x 4 student)")
    for axis, key in ((axes[0], by_size), (axes[1], by_length)):
        for r in key:
            axis.annotate(f"{r['peak_rss_mib']:.0f} MiB", (r["params_m"] if axis is axes[0] else r["seq_tokens"],
                                                          r["ms_per_step"]), fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
