"""The served PILOT under concurrent clients: micro-batching against one request at a time.

    python benchmarks/serving.py [--lock-commit f083d14] [--clients 1 2 8 32] [--rounds 3]
    python benchmarks/serving.py --env smollm2 --student data/06_models/student_smollm2 ...
    python benchmarks/serving.py --rows      # the smallest batch from which a row's bits never change

Logs the same student and stage-2 hyper-network (the default run's, in ``data/06_models``) three times
into a scratch MLflow store: with the serving code of ``--lock-commit`` (one lock per request: what
served PILOT before micro-batching), with this checkout's (micro-batching), and this checkout's
without a hyper-network (the plain student, served the same way). Serves all three with
``mlflow models serve`` (one worker each, ``OMP_NUM_THREADS=--threads``) and, for each number of
clients in turn and each server in turn (so drift on a shared machine hits all alike), has every
client send requests of 1, 2, 3 and 5 test questions one after another. Prints per server and number
of clients: requests and questions per second, p50 and p99 request latency, and how many answers
differ from the server's own sequential answers; medians over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pandas as pd

from _common import DATA, ROOT, configured_generation, machine, require

sys.path.insert(0, str(ROOT))
from tests.serve_check import free_port, post, stop  # noqa: E402

SIZES = (1, 2, 3, 5)

LOG_MODEL = """
import json, sys
import mlflow
from pilot.guidance import HyperNetwork
from pilot.models import load_causal_lm
from pilot.config import GenerationParams
from pilot.serving import log_pilot_model
uri, name, student_path, hypernet_path, generation = sys.argv[1:6]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("serving-benchmark")
student = load_causal_lm(student_path)
hypernet = HyperNetwork.load(hypernet_path, student.hidden_size, student.num_layers) if hypernet_path else None
with mlflow.start_run(run_name=name):
    info = log_pilot_model(student, hypernet, generation=GenerationParams.model_validate_json(generation), name="pilot")
print("MODEL" + json.dumps(info))
"""


def log_model(uri: str, name: str, student: Path, hypernet: Path | None, generation, source: Path) -> str:
    """Log the model with the ``pilot`` package at ``source`` (its serving code); returns its runs:/ URI.
    Its artifacts go beside the store (``./mlruns`` of the store's folder)."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run([sys.executable, "-c", LOG_MODEL, uri, name, str(student.absolute()),
                           str(hypernet.absolute()) if hypernet else "", generation.model_dump_json()],
                          env=env, cwd=uri.removeprefix("sqlite:///").rsplit("/", 1)[0], capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"Logging the {name} model failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.split("MODEL", 1)[1])["model_uri"]


def serve(stack: ExitStack, uri: str, model_uri: str, log: Path, threads: int, env: dict[str, str]) -> int:
    """`mlflow models serve` of ``model_uri`` (one worker), stopped when ``stack`` closes; returns its port."""
    port = free_port()
    handle = open(log, "wb")
    bin_dir = str(Path(sys.executable).absolute().parent)   # its mlflow and uvicorn
    server = subprocess.Popen([os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              env={**os.environ, **env, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": str(threads),
                                   "PYTHONPATH": "", "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])},
                              stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(stop, server, handle)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if post(port, {"inputs": ["1 + 1 ="]}, timeout=30)[0] == 200:
                return port
        except OSError:
            pass
        if server.poll() is not None:
            break
        time.sleep(1)
    raise SystemExit(f"`mlflow models serve` of {model_uri} did not start; see {log}")


def measure(port: int, requests: list[list[str]], reference: list[list[str]], clients: int) -> dict:
    """Every client sends requests one after another (sizes cycling, offset per client); throughput,
    latency percentiles and answers that differ from ``reference``."""
    per_client = max(10, 160 // clients)
    latencies, differing, questions = [], 0, 0
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(offset: int) -> None:
        nonlocal differing, questions
        start.wait()
        for i in range(per_client):
            k = (offset + i) % len(requests)
            began = time.perf_counter()
            status, text = post(port, {"inputs": requests[k]})
            seconds = time.perf_counter() - began
            with lock:
                latencies.append(seconds)
                questions += len(requests[k])
                differing += status != 200 or json.loads(text)["predictions"] != reference[k]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies.sort()
    return {"requests_per_s": len(latencies) / wall, "questions_per_s": questions / wall,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "differing": differing, "requests": len(latencies)}


def stable_rows(student: Path, hypernet: Path | None) -> None:
    """For every linear layer shape of the student (and hyper-network): the batch sizes (rows) at which a
    row's output bits differ from the same row's in a batch of 64."""
    import torch

    from pilot.guidance import HyperNetwork
    from pilot.models import load_causal_lm

    lm = load_causal_lm(student)
    modules = list(lm.model.modules())
    if hypernet:
        modules += list(HyperNetwork.load(hypernet, lm.hidden_size, lm.num_layers).modules())
    shapes = sorted({(m.in_features, m.out_features) for m in modules if isinstance(m, torch.nn.Linear)})
    print(f"machine: {machine()}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for k, n in shapes:
            layer = torch.nn.Linear(k, n, bias=False)
            rows = torch.randn(64, k)
            with torch.no_grad():
                full = layer(rows)
                unstable = [m for m in range(1, 17) if not all(torch.equal(layer(rows[i:i + m])[0], full[i])
                                                                for i in range(0, 48, 6))]
            print(f"threads {threads}, linear {k} -> {n}: rows differ from a batch of 64 at batch sizes {unstable}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="base", help="the configuration whose decoding settings the models use")
    parser.add_argument("--student", type=Path, default=DATA / "06_models/student")
    parser.add_argument("--hypernet", type=Path, default=DATA / "06_models/hypernet_stage2")
    parser.add_argument("--questions", type=Path, default=DATA / "03_primary/tasks_test.parquet")
    parser.add_argument("--lock-commit", default="f083d14", help="a commit whose served model holds one lock per request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--wait-ms", default=None, help="PILOT_SERVE_BATCH_WAIT_MS of the batching servers")
    parser.add_argument("--rows", action="store_true", help="only print the batch sizes at which rows change bits")
    args = parser.parse_args()
    student, hypernet = require(args.student, "The student"), require(args.hypernet, "The hyper-network")
    if args.rows:
        stable_rows(student, hypernet)
        return
    generation = configured_generation(args.env)
    questions = pd.read_parquet(require(args.questions, "The test questions"))["question"].tolist()
    requests = [questions[7 * i:7 * i + size] for i, size in enumerate(SIZES * 4)]

    scratch = Path(tempfile.mkdtemp(prefix="pilot-serving-"))   # kept: the servers' logs are there
    print(f"scratch store and server logs: {scratch}")
    with ExitStack() as stack:
        old = scratch / "lock_code"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.lock_commit, "src/pilot"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        uri = f"sqlite:///{scratch / 'mlflow.db'}"
        models = {"lock": log_model(uri, "lock", student, hypernet, generation, old / "src"),
                  "batched": log_model(uri, "batched", student, hypernet, generation, ROOT / "src"),
                  "plain": log_model(uri, "plain", student, None, generation, ROOT / "src")}
        batching = {"PILOT_SERVE_BATCH_WAIT_MS": args.wait_ms} if args.wait_ms is not None else {}
        ports = {name: serve(stack, uri, model_uri, scratch / f"{name}.log", args.threads,
                             {} if name == "lock" else batching) for name, model_uri in models.items()}
        reference = {name: [json.loads(post(port, {"inputs": r})[1])["predictions"] for r in requests]
                     for name, port in ports.items()}
        results = {(name, c): [] for name in ports for c in args.clients}
        for _ in range(args.rounds):
            for clients in args.clients:
                for name, port in ports.items():
                    results[(name, clients)].append(measure(port, requests, reference[name], clients))
        batch_lines = {name: sum("PILOT batch" in line for line in (scratch / f"{name}.log").read_text().splitlines())
                       for name in ports}

    print(f"\n## Serving: {args.rounds} rounds, median (machine: {machine()}; servers: 1 worker, "
          f"OMP_NUM_THREADS={args.threads}; lock = serving code of {args.lock_commit})\n")
    print("| server | clients | requests/s | questions/s | p50 ms | p99 ms | answers differing | x lock (requests/s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for (name, clients), runs in results.items():
        row = {key: statistics.median(run[key] for run in runs) for key in ("requests_per_s", "questions_per_s",
                                                                            "p50_ms", "p99_ms")}
        row.update(server=name, clients=clients, differing=sum(run["differing"] for run in runs),
                   requests=sum(run["requests"] for run in runs))
        lock = statistics.median(run["requests_per_s"] for run in results[("lock", clients)])
        row["vs_lock"] = row["requests_per_s"] / lock
        rows.append(row)
        print(f"| {name} | {clients} | {row['requests_per_s']:.0f} | {row['questions_per_s']:.0f} | "
              f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['differing']} / {row['requests']} | "
              f"{row['vs_lock']:.2f} |")
    overhead = [f"{c} clients {100 * (statistics.median(r['requests_per_s'] for r in results[('plain', c)]) / statistics.median(r['requests_per_s'] for r in results[('batched', c)]) - 1):+.0f} %"
                for c in args.clients]
    print(f"\nPILOT's cost over the plain student served the same way (plain requests/s over PILOT's): "
          f"{', '.join(overhead)}. Batch log lines: {batch_lines} (the lock server logs none).")
    print("\n" + json.dumps({"title": "serving", "rows": rows}, default=str))


if __name__ == "__main__":
    main()
