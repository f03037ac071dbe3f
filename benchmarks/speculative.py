"""MTP speculative decoding on a trained tiny model: decode speed with k = 0..3 draft tokens at
batch 1, and throughput at batch 32 (where speculation switches itself off), in one process.

    epserve make-tiny /tmp/tiny-trained --train          # ~5 minutes on 2 cores
    python benchmarks/speculative.py /tmp/tiny-trained

Prompts are snippets of the Python standard library's source (what the model was trained on).
Greedy (every k gives the same tokens: checked here) and sampled at temperature 0.7 (rejection
sampling: the same distribution, other draws). A small model trained for minutes falls into
repetitive runs (whitespace) under greedy decoding, which MTP predicts easily: the sampled rows
are the more honest acceptance figure.
"""

from __future__ import annotations

import argparse
import random
import sysconfig
import time
from pathlib import Path

import torch

from cluster import LLM, SamplingParams, SchedulerConfig, SpeculativeConfig


def snippets(count: int, chars: int, seed: int = 1) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        text = rng.choice(files).read_text(errors="ignore")
        if len(text) > 4 * chars:
            start = rng.randrange(len(text) - chars)
            out.append(text[start : start + chars])
    return out


def engine(model: str, k: int, batch: int, max_batch: int = 8) -> LLM:
    config = SpeculativeConfig(num_speculative_tokens=k, max_batch=max_batch) if k else None
    return LLM(model, speculative_config=config, scheduler=SchedulerConfig(max_num_seqs=max(batch, 8)))


def measure(llm: LLM, prompts: list[str], max_tokens: int, batch: int, temperature: float) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=0, ignore_eos=True)
    llm.engine.output_processor.reset_spec_totals()
    start = time.perf_counter()
    tokens = []
    for i in range(0, len(prompts), batch):
        tokens += [c.token_ids for c in llm.generate(prompts[i : i + batch], params)]
    seconds = time.perf_counter() - start
    stats = llm.spec_stats() or {}
    return {"tok_s": sum(map(len, tokens)) / seconds, "tokens": tokens, "mean_len": stats.get("mean_accepted_length"),
            "acceptance": stats.get("acceptance_rate"), "verify_steps": stats.get("verify_steps", 0)}


def interleaved(engines: dict, prompts, max_tokens: int, batch: int, temperature: float, rounds: int) -> dict:
    """Each engine measured `rounds` times in turn (this machine's speed drifts by tens of percent
    over seconds); per engine the run with the median speed."""
    runs = {key: [] for key in engines}
    for _ in range(rounds):
        for key, llm in engines.items():
            runs[key].append(measure(llm, prompts, max_tokens, batch, temperature))
    return {key: sorted(r, key=lambda x: x["tok_s"])[len(r) // 2] for key, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--single-prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the engine's workers run
    prompts = snippets(args.single_prompts, 120)
    engines = {k: engine(args.model, k, 1) for k in (0, 1, 2, 3)}
    for llm in engines.values():
        llm.generate(prompts[:1], SamplingParams(max_tokens=4))  # first shapes
    print(f"{args.model}: batch 1, {args.single_prompts} prompts x {args.max_tokens} tokens, one at a time; "
          f"median of {args.rounds} interleaved rounds")
    print("| sampling | k | decode tok/s | speedup | mean accepted length | acceptance |")
    print("|---|---|---|---|---|---|")
    for temperature in (0.0, 0.7):
        results = interleaved(engines, prompts, args.max_tokens, 1, temperature, args.rounds)
        base = results[0]
        for k, r in results.items():
            if temperature == 0:
                assert r["tokens"] == base["tokens"], f"k={k} changed the greedy tokens"
            mean = f"{r['mean_len']:.2f}" if k else "-"
            rate = f"{r['acceptance']:.0%}" if k else "-"
            label = "greedy" if temperature == 0 else f"temperature {temperature}"
            print(f"| {label} | {k} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x | {mean} | {rate} |",
                  flush=True)
    for llm in engines.values():
        llm.shutdown()
    many = snippets(args.batch, 120, seed=2)
    print(f"\nbatch {args.batch}: {args.batch} prompts x 32 greedy tokens at once")
    print("| k | output tok/s | vs k=0 | verify steps |")
    print("|---|---|---|---|")
    engines = {"0": engine(args.model, 0, args.batch),
               "2 (switches itself off above 8 sequences: the default)": engine(args.model, 2, args.batch),
               "2 (forced on)": engine(args.model, 2, args.batch, max_batch=10**6)}
    results = interleaved(engines, many, 32, args.batch, 0.0, args.rounds)
    plain = results["0"]
    for label, r in results.items():
        assert r["tokens"] == plain["tokens"]
        steps = r["verify_steps"] if label != "0" else "-"
        print(f"| {label} | {r['tok_s']:.1f} | {r['tok_s'] / plain['tok_s']:.2f}x | {steps} |")


if __name__ == "__main__":
    main()
