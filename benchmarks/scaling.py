"""Stage-1 step time and memory vs student size and vs sequence length (CPU), table and plot.

    python benchmarks/scaling.py [--steps 8] [--plot docs/scaling.png]

Each configuration runs in its own process (clean peak-memory figures): a randomly initialised
Llama student of the given size, a latent cache of chain_sum examples with the given number of
terms (longer expressions, longer plans, longer sequences), then timed steps of the real stage-1
training with conf/base's guidance, stage-1 and generation settings (latent RL included); only the
steps, the injection layer (the middle one) and, when given, the batch size are the benchmark's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from _common import ROOT, project_settings, report, stage1_seconds_per_step, synthetic_stage1

SIZES = [(128, 2), (256, 4), (384, 6), (512, 8), (640, 10)]   # (hidden, layers): ~0.6M .. ~66M parameters
TERMS = [3, 6, 10, 16]


def one(hidden: int, layers: int, terms: int, steps: int, batch_size: int | None = None) -> dict:
    from pilot.models import count_parameters
    from pilot.prompts import answer_prompt, continuation

    settings = project_settings()
    student, cached, examples, site = synthetic_stage1(hidden, layers, terms)
    lengths = [len(student.tokenizer(answer_prompt(q) + continuation(a))["input_ids"])
               for q, a in zip(examples["question"], examples["answer"])]
    configured = settings["stage1"].training
    config = configured.model_copy(update={"steps": steps, "batch_size": batch_size or configured.batch_size})
    seconds = stage1_seconds_per_step(student, cached, examples, site, config, settings["generation"])
    return {"hidden": hidden, "layers": layers, "batch": config.batch_size,
            "params_m": count_parameters(student.model) / 1e6, "terms": terms,
            "seq_tokens": sum(lengths) / len(lengths), "ms_per_step": 1000 * seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None, help="default: stage1.training.batch_size")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "scaling.png"))
    parser.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, steps=args.steps, batch_size=args.batch_size)))
        return
    configs = [(h, l, 6) for h, l in SIZES] + [(256, 4, t) for t in TERMS if t != 6]
    rows = []
    for hidden, layers, terms in configs:
        batch = ["--batch-size", str(args.batch_size)] if args.batch_size else []
        out = subprocess.run([sys.executable, __file__, "--one", str(hidden), str(layers), str(terms),
                              "--steps", str(args.steps), *batch], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plot(rows, Path(args.plot))
    report(f"Stage-1 scaling (CPU, batch {rows[0]['batch']})", rows, [f"Plot: {args.plot}"])


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
