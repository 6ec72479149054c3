"""Which ops give the same bits at 1 and 2 torch threads: torch's own, and pilot.invariant's stand-ins.

    python thread_invariance.py

Each op runs on the same 8 seeded draws of inputs in two fresh processes (1 thread, 2 threads); a row
prints whether the outputs (and gradients) of every draw are bitwise equal. What the stand-ins cost is in
the whole runs' times (BENCHMARKS.md). Shapes are the default
run's (the toy student: batch 64, 4 heads of 32, ~20-50 tokens; stage 1's 8-head reader) and SmolLM2's.
BENCHMARKS.md, "Same numbers at any thread count", holds a run of it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from pilot.invariant import LayerNorm, attend, repeat_rows, softmax


def _digest(*tensors: torch.Tensor) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().contiguous().numpy().tobytes())
    return sha.hexdigest()[:12]


def _attention_case(batch, heads, queries, keys, dim, kernel):
    def run(g):
        q, k, v = (torch.randn(batch, heads, n, dim, generator=g, requires_grad=True) for n in (queries, keys, keys))
        mask = torch.ones(batch, 1, queries, keys, dtype=torch.bool).tril(keys - queries)
        out = attend(q, k, v, mask, dim ** -0.5) if kernel == "pilot" else F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask)
        out.backward(torch.ones_like(out))
        return out, q.grad, k.grad, v.grad
    return run


def _grad_case(shape, forward):
    def run(g):
        x = torch.randn(*shape, generator=g, requires_grad=True)
        out = forward(x)
        out.backward(torch.randn(out.shape, generator=g))
        return out, x.grad
    return run


def _layer_norm_case(cls, shape):
    def run(g):
        torch.manual_seed(0)
        norm = cls(shape[-1])
        x = torch.randn(*shape, generator=g, requires_grad=True)
        out = norm(x)
        out.backward(torch.randn(out.shape, generator=g))
        return out, x.grad, norm.weight.grad, norm.bias.grad
    return run


CASES = {
    "matmul 3072x128 @ 128x512": _grad_case((3072, 128), lambda x: x @ torch.ones(128, 512) / 7),
    "sum of a whole tensor, 40,000 elements": lambda g: (torch.randn(40000, generator=g).pow(2).sum(),),
    "sum of a whole tensor, 1,000,000 elements": lambda g: (torch.randn(1_000_000, generator=g).sum(),),
    "sum along a dimension, 512x128": lambda g: (torch.randn(512, 128, generator=g).sum(0),),
    "vector norm, 1,000,000 elements": lambda g: (torch.linalg.vector_norm(torch.randn(1_000_000, generator=g)),),
    "cross entropy 3072x512 (forward, backward)": _grad_case(
        (3072, 512), lambda x: F.cross_entropy(x, torch.arange(3072) % 512)[None]),
    "torch.softmax 64x8x21 (forward, backward)": _grad_case((64, 8, 21), lambda x: torch.softmax(x, -1)),
    "pilot softmax 64x8x21 (forward, backward)": _grad_case((64, 8, 21), softmax),
    "nn.LayerNorm 64x21x128 (forward, backward)": _layer_norm_case(torch.nn.LayerNorm, (64, 21, 128)),
    "pilot LayerNorm 64x21x128 (forward, backward)": _layer_norm_case(LayerNorm, (64, 21, 128)),
    "rows repeated by indexing, 125 -> 1000 (backward)": _grad_case(
        (125, 256), lambda x: x[torch.arange(125).repeat_interleave(8)]),
    "pilot repeat_rows, 125 -> 1000 (backward)": _grad_case((125, 256), lambda x: repeat_rows(x, 8)),
    "QR 128x128 (MKL geqrf)": lambda g: torch.linalg.qr(torch.randn(128, 128, generator=g)),
    "SDPA, whole sequence 64x4x48x32": _attention_case(64, 4, 48, 48, 32, "sdpa"),
    "SDPA, whole sequence 16x9x200x64 (SmolLM2)": _attention_case(16, 9, 200, 200, 64, "sdpa"),
    "SDPA, 1 query over 17 keys (decoding)": _attention_case(128, 4, 1, 17, 32, "sdpa"),
    "pilot attend, 1 query over 17 keys": _attention_case(128, 4, 1, 17, 32, "pilot"),
    "SDPA, 3 queries over 19 keys (stage 1)": _attention_case(64, 4, 3, 19, 32, "sdpa"),
    "pilot attend, 3 queries over 19 keys": _attention_case(64, 4, 3, 19, 32, "pilot"),
    "SDPA, 8 queries over 200 keys (SmolLM2)": _attention_case(16, 9, 8, 200, 64, "sdpa"),
    "pilot attend, 8 queries over 200 keys": _attention_case(16, 9, 8, 200, 64, "pilot"),
}


DRAWS = 8


def worker(threads: int) -> None:
    torch.set_num_threads(threads)
    results = {}
    for name, case in CASES.items():
        # several draws: two orders of summation can round alike on one draw and apart on the next
        results[name] = _digest(*(tensor for seed in range(DRAWS) for tensor in case(torch.Generator().manual_seed(seed))))
    print(json.dumps(results))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(int(sys.argv[2]))
    runs = {threads: json.loads(subprocess.run([sys.executable, __file__, "--worker", str(threads)], check=True,
                                               capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for threads in (1, 2)}
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| op | same bits at 1 and 2 threads |")
    print("| --- | --- |")
    for name in CASES:
        print(f"| {name} | {'yes' if runs[1][name] == runs[2][name] else '**no**'} |")


if __name__ == "__main__":
    main()
