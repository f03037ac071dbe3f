"""Sublayers, and a forward's layers, in one C++ call (kernels.layers) against the same kernels
called op by op.

    python benchmarks/one_call.py [--rounds 10]

Batch-1 decode (127 tokens after a 29-token prompt) on the bandwidth-bound shape (hidden 512,
8 layers, 512 experts of width 128) and single-stream decode and 32 x 48 throughput on peer.py's
default toy, in fp32 and bf16: one engine per checkpoint and dtype, the three ways (op by op, each
sublayer one call, the whole forward one call) in turn round by round in one process (this shared
machine's speed moves by tens of percent between minutes), greedy tokens checked equal. Prints each
way's median tok/s and the medians of the rounds' ratios: sublayer / op by op, forward / sublayer.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

from peer import OUTPUT_LEN, SINGLE_LEN, make_prompts, timed
from scratch import scratch_dir


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
    from kernels import cpu_kernels_loaded, separate_layers, separate_sublayers

    if not cpu_kernels_loaded():
        raise SystemExit("the C++ CPU kernels did not load: there is no one-call path to measure")
    shapes = {"bandwidth shape": TinySpec(hidden=512, layers=8, moe_intermediate=128, fused_experts=True),
              "default toy": TinySpec(linear_head_dim=128, fused_experts=True)}
    bench = make_prompts(1234)
    cases = [("bandwidth shape", "batch-1 decode", [list(range(1, 30))], SINGLE_LEN),
             ("default toy", "single-stream decode", [bench[0]], SINGLE_LEN),
             ("default toy", "32 x 48 decode", bench, OUTPUT_LEN)]
    ways = {"op by op": separate_sublayers, "sublayer": separate_layers, "forward": contextlib.nullcontext}
    print(f"{'checkpoint':<16} {'dtype':<9} {'measure':<21} " + " ".join(f"{w:>9}" for w in ways)
          + "  sublayer/op  forward/sublayer")
    for shape_name, spec in shapes.items():
        model_dir = str(make_tiny(scratch_dir(), spec))
        for dtype in ("float32", "bfloat16"):
            llm = LLM(model=model_dir, dtype=dtype)
            for case_shape, measure, prompts, max_tokens in cases:
                if case_shape != shape_name:
                    continue
                rate(llm, prompts, max_tokens)  # warm-up
                rates = {w: [] for w in ways}
                for _ in range(args.rounds):
                    tokens = []
                    for way, context in ways.items():
                        with context():
                            r, t = rate(llm, prompts, max_tokens)
                        rates[way].append(r)
                        tokens.append(t)
                    if any(t != tokens[0] for t in tokens):
                        raise SystemExit(f"{shape_name} {dtype}: the ways gave different tokens")
                sublayer = [b / a for a, b in zip(rates["op by op"], rates["sublayer"])]
                forward = [b / a for a, b in zip(rates["sublayer"], rates["forward"])]
                print(f"{shape_name:<16} {dtype:<9} {measure:<21} "
                      + " ".join(f"{statistics.median(r):9.1f}" for r in rates.values())
                      + f"  {statistics.median(sublayer):10.2f}x  {statistics.median(forward):15.2f}x  "
                      + "forward/sublayer rounds: " + " ".join(f"{r:.2f}" for r in forward))


if __name__ == "__main__":
    main()
