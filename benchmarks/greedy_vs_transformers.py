"""Time of N greedy tokens: epserve's single-process engine against transformers on one checkpoint.

    python benchmarks/greedy_vs_transformers.py [--model DIR] [--tokens 32] [--prompt-len 16]

Needs the test extra (transformers). Both run in this process, fp32, with the same torch threads;
each is warmed up once and the best of --repeats runs is reported.
"""

from __future__ import annotations

import argparse
import time

import torch

from cluster import LLM, SamplingParams
from cluster.model.tiny import TinySpec, make_tiny
from scratch import scratch_dir


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="checkpoint dir (default: a fresh default tiny one)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = args.model or make_tiny(scratch_dir(), TinySpec())
    from transformers import AutoModelForCausalLM

    llm = LLM(model=model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = list(range(3, 3 + args.prompt_len))
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    def ours():
        return llm.generate([prompt], params)[0].token_ids

    def theirs():
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    same = ours() == theirs()
    t_ours, t_theirs = best_time(ours, args.repeats), best_time(theirs, args.repeats)
    print(f"model: {model_dir} ({llm.config.num_experts} experts, top-{llm.config.num_experts_per_tok}, "
          f"{llm.config.num_hidden_layers} layers, hidden {llm.config.hidden_size}); torch threads "
          f"{torch.get_num_threads()}")
    print(f"{args.tokens} greedy tokens after a {args.prompt_len}-token prompt (best of {args.repeats}):")
    print(f"  epserve      {t_ours * 1e3:8.1f} ms  ({args.tokens / t_ours:6.1f} tok/s)")
    print(f"  transformers {t_theirs * 1e3:8.1f} ms  ({args.tokens / t_theirs:6.1f} tok/s)")
    print(f"  ratio transformers/epserve = {t_theirs / t_ours:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
