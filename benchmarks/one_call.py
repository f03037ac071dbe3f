"""Sublayers in one C++ call (kernels.layers) against the same kernels called op by op.

    python benchmarks/one_call.py [--rounds 10]

Batch-1 decode (127 tokens after a 29-token prompt) on the bandwidth-bound shape (hidden 512,
8 layers, 512 experts of width 128) and single-stream decode and 32 x 48 throughput on peer.py's
default toy, in fp32 and bf16: one engine per checkpoint and dtype, the two ways alternating round
by round in one process (this shared machine's speed moves by tens of percent between minutes),
greedy tokens checked equal. Prints each way's median tok/s and the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from peer import OUTPUT_LEN, SINGLE_LEN, make_prompts, timed


def rate(llm, prompts, max_tokens: int) -> tuple[float, list]:
    """Output tok/s after each prompt's first token (decode only for one prompt), and the tokens."""
    from cluster import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prefill = timed(lambda: llm.generate(prompts, first))
    outputs = []
    whole = timed(lambda: outputs.extend(llm.generate(prompts, params)))
    return len(prompts) * (max_tokens - 1) / (whole - prefill), [o.token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    from cluster import LLM
    from cluster.model.tiny import TinySpec, make_tiny
    from kernels import cpu_kernels_loaded, separate_sublayers

    if not cpu_kernels_loaded():
        raise SystemExit("the C++ CPU kernels did not load: there is no one-call path to measure")
    shapes = {"bandwidth shape": TinySpec(hidden=512, layers=8, moe_intermediate=128, fused_experts=True),
              "default toy": TinySpec(linear_head_dim=128, fused_experts=True)}
    bench = make_prompts(1234)
    cases = [("bandwidth shape", "batch-1 decode", [list(range(1, 30))], SINGLE_LEN),
             ("default toy", "single-stream decode", [bench[0]], SINGLE_LEN),
             ("default toy", "32 x 48 decode", bench, OUTPUT_LEN)]
    print(f"{'checkpoint':<16} {'dtype':<9} {'measure':<21} {'op by op':>9} {'one call':>9} {'ratio':>6}  rounds' ratios")
    for shape_name, spec in shapes.items():
        model_dir = str(make_tiny(tempfile.mkdtemp(), spec))
        for dtype in ("float32", "bfloat16"):
            llm = LLM(model=model_dir, dtype=dtype)
            for case_shape, measure, prompts, max_tokens in cases:
                if case_shape != shape_name:
                    continue
                rate(llm, prompts, max_tokens)  # warm-up
                separate, together, ratios = [], [], []
                for _ in range(args.rounds):
                    with separate_sublayers():
                        a, tokens_a = rate(llm, prompts, max_tokens)
                    b, tokens_b = rate(llm, prompts, max_tokens)
                    if tokens_a != tokens_b:
                        raise SystemExit(f"{shape_name} {dtype}: the two ways gave different tokens")
                    separate.append(a)
                    together.append(b)
                    ratios.append(b / a)
                print(f"{shape_name:<16} {dtype:<9} {measure:<21} {statistics.median(separate):9.1f} "
                      f"{statistics.median(together):9.1f} {statistics.median(ratios):5.2f}x  "
                      + " ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
