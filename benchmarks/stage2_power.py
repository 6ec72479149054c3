"""How many test questions stage 2's gain over stage 1 needs: McNemar's power, exactly.

    python benchmarks/stage2_power.py
    python benchmarks/stage2_power.py --questions 600 1200 --effect 0.09 0.65

Stage 1 and stage 2 answer the same questions, so what decides the test is the discordant
questions (right for one of them only) and how they split. The default effects are measured ones:
the four 100-step stage-2 runs at the configured rate on validation (BENCHMARKS.md, "A moving
average, a longer run, higher rates": 79 of 1,200 answers discordant, 53 of them to stage 2) and the
six stage-2 runs on the 600 test questions of two earlier default runs (docs/results.md, "Across
stage-2 seeds": 341 of 3,600 discordant, 223 to stage 2). Prints, for each test size, the chance
that McNemar's exact test gives p < 0.05 in stage 2's favour (:func:`pilot.statistics.mcnemar_power`).
"""

from __future__ import annotations

import argparse

from pilot.statistics import mcnemar_power

MEASURED = {
    "validation, 4 runs (79 / 1,200 discordant, 53 to stage 2)": (79 / 1200, 53 / 79),
    "test, 6 earlier runs (341 / 3,600 discordant, 223 to stage 2)": (341 / 3600, 223 / 341),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, nargs="+", default=[300, 600, 900, 1200],
                        help="test sizes (questions in distribution, every task together)")
    parser.add_argument("--effect", type=float, nargs=2, action="append", metavar=("DISCORDANT", "SHARE"),
                        help="a share of discordant questions and the share of them stage 2 wins (repeatable); "
                             "default: the measured ones")
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    effects = ({f"{d:.3f} discordant, {s:.2f} to stage 2": (d, s) for d, s in args.effect} if args.effect
               else MEASURED)
    print("| effect | difference | " + " | ".join(f"power on {n}" for n in args.questions) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in args.questions) + " |")
    for name, (discordant, share) in effects.items():
        powers = [mcnemar_power(n, discordant, share, args.alpha) for n in args.questions]
        print(f"| {name} | {discordant * (2 * share - 1):+.3f} | " + " | ".join(f"{p:.2f}" for p in powers) + " |")


if __name__ == "__main__":
    main()
