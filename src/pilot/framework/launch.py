"""One Kedro run trained by N data-parallel processes: what ``torchrun`` starts in each process.

    torchrun --nproc-per-node 2 -m pilot.framework.launch --env distributed --pipelines stage1

Kedro has no launcher of its own for this, and DDP started inside a node re-runs that node once per
process (kedro-org/kedro#2049); its maintainers' advice is a launch script that opens a
``KedroSession`` in each process. This is that script: each process joins the process group
(:mod:`pilot.distributed`), then runs the same pipelines through its own session. Rank 0's session is
the run: it logs to MLflow and writes every output. The other ranks' sessions track nothing and keep
their outputs in memory (:class:`pilot.framework.hooks.PreflightHooks`), so one launch is still one
Kedro run and one MLflow run. The training loops split every batch across the ranks; the teacher's
plans, the latent cache and evaluation's answers are dealt out by batch or shard and gathered (one
process's outputs); everything else runs the same in each process. A user error prints its one
sentence, as ``kedro run`` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click
from kedro.framework.cli.utils import _split_params
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from pilot import distributed
from pilot.framework.errors import show_traceback, user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torchrun ... -m pilot.framework.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--env", "-e", default=None, help="Kedro environment (e.g. distributed)")
    parser.add_argument("--pipelines", "-p", default=None, help="comma-separated pipeline names (default: all)")
    parser.add_argument("--params", default="", help="runtime parameters, as kedro run's: key=value,key2=value2")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                        help="auto: nccl when CUDA is available, else gloo")
    parser.add_argument("--timeout-s", type=float, default=distributed.DEFAULT_TIMEOUT_S,
                        help="a collective waiting longer than this fails the run (a rank died or hangs)")
    parser.add_argument("--verbose", "-v", action="store_true", help="show the traceback of a user error")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    project = Path.cwd()
    ranks = distributed.init_from_env(args.backend, args.timeout_s)
    try:
        bootstrap_project(project)
        params = _split_params(None, None, args.params) if args.params else None
        pipelines = [name for name in (args.pipelines or "").split(",") if name] or None
        with KedroSession.create(project_path=project, env=args.env, runtime_params=params) as session:
            session.run(pipeline_names=pipelines)
    except Exception as error:
        cause = user_error(error)
        if show_traceback(args.verbose) or cause is None:
            raise
        click.secho(f"Error (rank {ranks.rank}): {cause}", fg="red", err=True)
        sys.exit(1)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
