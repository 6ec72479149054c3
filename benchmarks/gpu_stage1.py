"""Stage-1 step throughput on a GPU: a >= 100M-parameter student built from config, in bf16.

    python benchmarks/gpu_stage1.py                 # CUDA, ~124M-parameter Llama student
    python benchmarks/gpu_stage1.py --tiny --device cpu   # a seconds-long check that the script runs

Reports tokens/s and model FLOPs utilisation (MFU) against the GPU's peak dense bf16 rate.
FLOPs per step count what stage 1 actually computes through the frozen student: the forward
pass (2 N per token) and the backward pass to the activations only (2 N per token; the frozen
weights get no gradients), plus attention (4 L T d per token for forward and backward of
scores and values each), plus the hyper-network (negligible).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _common import report

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, name
    return None, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small model, to check the script runs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--answer-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from pilot.guidance import GuidanceInjector, HyperNetConfig, HyperNetwork, capture_layers
    from pilot.models import freeze

    device = torch.device(args.device)
    hidden, layers, heads, vocab = (128, 2, 4, 512) if args.tiny else (768, 12, 12, 32000)
    seq, batch_size = (64, 8) if args.tiny else (args.seq_len, args.batch_size)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(seq, 128), tie_word_embeddings=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    freeze(model)
    n_params = sum(p.numel() for p in model.parameters())
    hypernet = HyperNetwork(HyperNetConfig(hidden_size=hidden, num_layers=layers, read_layer=-1,
                                           inject_layer=layers // 2, reader="attention", mlp_hidden=4 * hidden,
                                           attention_heads=heads)).to(device)
    torch.nn.init.normal_(hypernet.mlp[-1].weight, std=0.01)
    injector = GuidanceInjector(model, layers // 2, 1.0)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch_size, seq), device=device)
    query_states = torch.randn(batch_size, seq - args.answer_len, hidden, device=device)
    query_mask = torch.ones(batch_size, seq - args.answer_len, dtype=torch.bool, device=device)
    answer_mask = torch.zeros(batch_size, seq, dtype=torch.bool, device=device)
    answer_mask[:, -args.answer_len:] = True
    targets = torch.randn(batch_size, args.answer_len, hidden, device=device)

    def step() -> None:
        vectors = hypernet(query_states, query_mask)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), \
                injector.guide(vectors, answer_mask), capture_layers(model, [layers - 1]) as states:
            logits = model(input_ids=ids).logits
        guided = states[layers - 1][:, -args.answer_len:].float()
        loss = (1 - F.cosine_similarity(guided, targets, dim=-1)).mean() + F.cross_entropy(
            logits[:, -args.answer_len - 1:-1].float().reshape(-1, vocab), ids[:, -args.answer_len:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    tokens = batch_size * seq
    flops = 4 * n_params * tokens + 4 * layers * seq * hidden * tokens
    peak, name = peak_tflops(device)
    achieved = flops / seconds / 1e12
    row = {"device": name, "params_m": n_params / 1e6, "batch": batch_size, "seq": seq,
           "ms_per_step": 1000 * seconds, "tokens_per_s": tokens / seconds, "achieved_tflops": achieved,
           "mfu": achieved / peak if peak else float("nan"),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}
    report("Stage-1 step on a GPU (bf16)", [row], [f"Peak bf16 dense TFLOP/s used for MFU: {peak} ({name})."])


if __name__ == "__main__":
    main()
