"""Wall time and peak memory of a whole `kedro run`, default and test environments.

    python benchmarks/whole_run.py [--env base|test|both]

Each run happens in a fresh copy of the project configuration (its own data/ and mlflow.db),
so your outputs are untouched. Peak memory is the largest resident set of the run's process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, report


def one_run(env: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="pilot-bench-") as folder:
        project = Path(folder)
        shutil.copy(ROOT / "pyproject.toml", project)
        shutil.copy(ROOT / ".telemetry", project)
        shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
        (project / "conf" / "local").mkdir()
        (project / "src").mkdir()
        command = [str(Path(sys.executable).with_name("kedro")), "run"] + ([] if env == "base" else ["--env", env])
        started = time.perf_counter()
        # A fresh interpreter per run, so ru_maxrss of the waited child is this run's peak alone.
        script = ("import resource,subprocess,sys,json;"
                  f"p=subprocess.run({command!r},cwd={str(project)!r},stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True);"
                  "r=resource.getrusage(resource.RUSAGE_CHILDREN);"
                  "print(json.dumps({'rc':p.returncode,'maxrss_kb':r.ru_maxrss,'err':p.stderr[-2000:]}))")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"})
        seconds = time.perf_counter() - started
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if result["rc"] != 0:
            raise SystemExit(f"`kedro run` ({env}) failed:\n{result['err']}")
        return {"environment": env, "wall_s": seconds, "wall_min": seconds / 60,
                "peak_rss_gib": result["maxrss_kb"] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=["base", "test", "both"], default="both")
    args = parser.parse_args()
    envs = ["test", "base"] if args.env == "both" else [args.env]
    rows = [one_run(env) for env in envs]
    report("The whole run", rows, ["Targets: default run <= 15 min and <= 4 GiB; test environment <= 60 s."])


if __name__ == "__main__":
    main()
