"""The verifier's sandboxed worker: ``python -m pilot.verifier_worker MEMORY_LIMIT_MB``.

Reads one JSON object per line on stdin (``task``, ``answer``, ``entry``), writes
``{"score": float}`` per line on stdout. Any exception in a scorer is a score of 0. The
address-space limit is set after imports, so a scorer that tries to allocate gigabytes fails
inside this process instead of taking memory from the caller. Only the verifier starts it.
"""

from __future__ import annotations

import json
import resource
import sys


def main() -> None:  # pragma: no cover - exercised through pilot.verifier in a subprocess
    import reasoning_gym

    limit_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 1024 * 1024, hard))
    except (ValueError, OSError):
        pass
    scorers = {}
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            task = request["task"]
            if task not in scorers:
                scorers[task] = reasoning_gym.get_score_answer_fn(task)
            score = float(scorers[task](request["answer"], request["entry"]))
        except BaseException:  # noqa: BLE001 - any failure to score is a wrong answer
            score = 0.0
        print(json.dumps({"score": score}), flush=True)


if __name__ == "__main__":
    main()
