"""epserve against the engines its users would pick instead, on one checkpoint, in one sitting.

    python benchmarks/peer.py [--vllm-venv /tmp/vllm-venv] [--model DIR]      # throughput (default)
    python benchmarks/peer.py --mode bandwidth                                 # batch-1 vs memory bound
    python benchmarks/peer.py --mode long-context [--kv-cache-dtype fp8_e5m2] [--vllm-venv V]  # after 60K

throughput: 32 prompts of 8-63 random token ids (numpy default_rng(1234), ids < 300) x 48 greedy
  tokens, a warm-up pass on other prompts, then --passes timed passes; then single-stream decode
  (one request: 128 tokens minus 1 token, median of runs). epserve in process in fp32 and bf16,
  transformers' batched generate (fp32, left-padded), and vLLM's CPU engine when --vllm-venv is
  given (run by this same file under that venv's python; install it as ../shared/peer-vllm/README.md
  says, never as a project dependency). Default checkpoint: `make-tiny --linear-head-dim 128
  --fused-experts` (vLLM's CPU build accepts only 64- or 128-wide DeltaNet heads).
bandwidth: the bandwidth-bound shape (hidden 512, 8 layers, 512 experts of width 128): bytes of
  weights one decode token reads / measured read bandwidth gives the bound; batch-1 decode tok/s
  against it, epserve fp32 and bf16 and transformers fp32. This shared machine's read bandwidth
  moves 2x from one minute to the next (32-64 GB/s), so each of --rounds rounds pairs a decode
  (127 tokens) with a sum over 1 GiB just before and just after it; the fraction is taken per round
  (median and range printed). For epserve also a sum over its own expert weights (`own`).
long-context: the default toy with a 64K context: batch-1 decode rate (1 / the median gap between
  384 tokens) after a 60,000-token prompt against the rate after a 256-token prompt (the better of
  one run before and one after the long prompt; K/V stored as --kv-cache-dtype). With --vllm-venv,
  on `make-tiny --linear-head-dim 128 --fused-experts` with a 64K context, vLLM's CPU engine first
  (its rate: 384 / (the time to 385 tokens - the time to 1)), and epserve's mean rates against it.

Figures are medians over passes on this machine; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from scratch import scratch_dir

OUTPUT_LEN = 48
SINGLE_LEN = 128


def make_prompts(seed: int, n: int = 32, vocab: int = 300) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(8, 64, size=n)
    return [rng.integers(0, vocab, size=int(L)).tolist() for L in lens]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(generate, passes: int) -> dict:
    """generate(prompts, max_tokens) -> number of output tokens. Throughput and single-stream decode."""
    bench, warm = make_prompts(1234), make_prompts(999)
    generate(warm, OUTPUT_LEN)
    rates = []
    for _ in range(passes):
        tokens = []
        rates.append(1 / timed(lambda: tokens.append(generate(bench, OUTPUT_LEN))) * tokens[0])
    single = [bench[0]]
    generate(single, SINGLE_LEN)
    first = statistics.median(timed(lambda: generate(single, 1)) for _ in range(5))
    whole = statistics.median(timed(lambda: generate(single, SINGLE_LEN)) for _ in range(3))
    return {"batch_out_tok_s": statistics.median(rates), "passes": [round(r, 1) for r in rates],
            "single_decode_tok_s": (SINGLE_LEN - 1) / (whole - first), "single_first_token_s": first}


# -- the engines ----------------------------------------------------------------------------------
def epserve_generate(model_dir: str, dtype: str):
    from cluster import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=dtype)

    def generate(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return sum(len(c.token_ids) for c in llm.generate(prompts, params))

    generate.llm = llm
    return generate


def transformers_generate(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(prompts, max_tokens):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        return (out.shape[1] - width) * len(prompts)

    return generate


def vllm_generate(model_dir: str):
    """Runs inside the vLLM venv (`--run-vllm`)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, tokenizer=model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=512,
              max_num_seqs=32, seed=0, enable_prefix_caching=False)

    def generate(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    return generate


def long_prompt_of(length: int) -> list[int]:
    return np.random.default_rng(length).integers(0, 300, size=length).tolist()


def vllm_long_context(model_dir: str, long_prompt: int) -> dict:
    """Runs inside the vLLM venv (`--run-vllm --mode long-context`): {prompt length: decode tok/s},
    the rate being 384 / (the time to 385 tokens - the time to 1), 256 measured before and after
    the long prompt (the better kept), as for epserve."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, tokenizer=model_dir, dtype="bfloat16", enforce_eager=True,
              max_model_len=long_prompt + 4 * SINGLE_LEN, max_num_seqs=4, seed=0, enable_prefix_caching=False)

    def seconds(prompt, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return timed(lambda: llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False))

    rates, prefill = {}, {}
    for length in (256, long_prompt, 256):
        prompt = long_prompt_of(length)
        first = seconds(prompt, 1)
        rate = 3 * SINGLE_LEN / (seconds(prompt, 3 * SINGLE_LEN + 1) - first)
        rates[length], prefill[length] = max(rate, rates.get(length, 0.0)), first
    return {"rates": rates, "prefill_s": prefill}


def run_vllm(venv: str, model_dir: str, passes: int, extra: tuple[str, ...] = ()) -> dict | None:
    python = Path(venv) / "bin" / "python"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    preload = [str(p) for p in (Path("/tmp/tcm/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                                Path(venv) / "lib" / "libiomp5.so") if p.exists()]
    if preload:  # vLLM's CPU engine runs fastest with tcmalloc and Intel's OpenMP (its README)
        env["LD_PRELOAD"] = ":".join(preload)
    command = [str(python), __file__, "--run-vllm", "--model", model_dir, "--passes", str(passes), *extra]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"vLLM run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


# -- modes ----------------------------------------------------------------------------------------
def throughput(args) -> None:
    import torch

    from cluster.model.tiny import TinySpec, make_tiny

    model_dir = args.model or str(make_tiny(scratch_dir(), TinySpec(linear_head_dim=128, fused_experts=True)))
    print(f"checkpoint {model_dir}; 32 prompts of 8-63 tokens x {OUTPUT_LEN} greedy tokens, then one request x "
          f"{SINGLE_LEN}; torch threads {torch.get_num_threads()}")
    rows = {}
    if args.vllm_venv:  # first, on a quiet machine: the peer is not measured in our wake
        result = run_vllm(args.vllm_venv, model_dir, args.passes)
        if result is not None:
            rows["vLLM CPU bfloat16"] = result
    for dtype in ("float32", "bfloat16"):
        rows[f"epserve {dtype}"] = measure(epserve_generate(model_dir, dtype), args.passes)
    if not args.skip_transformers:
        rows["transformers float32"] = measure(transformers_generate(model_dir), args.passes)
    peer = rows.get("vLLM CPU bfloat16")
    print(f"{'engine':<22} {'32x48 tok/s':>12} {'single tok/s':>13} {'vs vLLM':>16}   passes")
    for name, r in rows.items():
        ratio = (f"{r['batch_out_tok_s'] / peer['batch_out_tok_s']:.2f}x / "
                 f"{r['single_decode_tok_s'] / peer['single_decode_tok_s']:.2f}x") if peer else "-"
        print(f"{name:<22} {r['batch_out_tok_s']:12.1f} {r['single_decode_tok_s']:13.1f} {ratio:>16}   {r['passes']}")


def sum_bandwidth(tensors: list, runs: int) -> float:
    """Bytes per second of summing the tensors (the best of `runs`): their read bandwidth."""
    return sum(t.nbytes for t in tensors) / min(timed(lambda: [t.sum() for t in tensors]) for _ in range(runs))


def weights_read_bandwidth(llm, threads: int) -> float:
    """Bytes per second of a sum over the engine's own expert weights, the pages a decode token
    streams (best of 3): a fresh 1 GiB allocation here reads at 26-58 GB/s from one to the next."""
    import torch

    torch.set_num_threads(threads)
    shard = next(m.experts for m in llm.engine.executor.runner.model.modules() if hasattr(m, "experts")
                 and hasattr(m.experts, "banks"))
    # bf16 pairs read as fp32: the bytes are what count, and a float sum runs at memory speed
    tensors = [t.view(torch.float32) for bank in shard.banks.values() for t in (bank.gate_up, bank.down)]
    return sum_bandwidth(tensors, 3)



def decode_bytes(model_dir: str, dtype_bytes: int) -> int:
    """Weight bytes one decode token reads: every dense weight except the embedding table (one row),
    and top-k experts in every MoE layer."""
    from cluster.config import ModelConfig

    cfg = ModelConfig.from_pretrained(model_dir)
    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    dense = V * D + D  # LM head, one embedding row
    for kind in cfg.layer_types:
        if kind == "linear_attention":
            kd, vd = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
            channels = 2 * kd + vd
            dense += D * (channels + vd + 2 * cfg.linear_num_value_heads) + channels * cfg.linear_conv_kernel_dim + vd * D
        else:
            hd, H, KV = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
            dense += D * (2 * H * hd + 2 * KV * hd) + H * hd * D
        dense += (cfg.num_experts + 1) * D + 3 * D * cfg.shared_expert_intermediate_size
    experts = L * cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size
    return (dense + experts) * dtype_bytes


def bandwidth(args) -> None:
    import torch

    from cluster.model.tiny import TinySpec, make_tiny

    spec = TinySpec(hidden=512, layers=8, moe_intermediate=128, fused_experts=True)
    model_dir = args.model or str(make_tiny(scratch_dir(), spec))
    threads = torch.get_num_threads()
    print(f"checkpoint {model_dir} (hidden 512, 8 layers, 512 experts of width 128); {args.rounds} rounds per "
          f"engine, each a batch-1 decode between two reads of 1 GiB on {threads} threads: medians, and "
          f"the range of the rounds' own fractions")
    print("own: the read bandwidth of the engine's own expert weights (a sum over them), the bound again")
    print(f"{'engine':<22} {'bytes/token':>12} {'GB/s':>6} {'bound tok/s':>12} {'tok/s':>8} {'of bound':>9} "
          f"{'range':>9} {'own GB/s':>9} {'of own':>7}")
    engines = [("epserve float32", lambda: epserve_generate(model_dir, "float32"), 4),
               ("epserve bfloat16", lambda: epserve_generate(model_dir, "bfloat16"), 2)]
    if not args.skip_transformers:
        engines.append(("transformers float32", lambda: transformers_generate(model_dir), 4))
    probe = torch.ones(2**28)  # 1 GiB, allocated once: every round sums the same pages
    for name, make, dtype_bytes in engines:
        generate = make()
        single = [make_prompts(1234)[0]]
        generate(single, SINGLE_LEN)
        nbytes = decode_bytes(model_dir, dtype_bytes)
        rounds = [bandwidth_round(generate, single, probe, threads) for _ in range(args.rounds)]
        rate, bw = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
        fractions = sorted(rate_r * nbytes / bw_r for rate_r, bw_r in rounds)
        own = weights_read_bandwidth(generate.llm, threads) if hasattr(generate, "llm") else None
        print(f"{name:<22} {nbytes / 1e6:10.1f}MB {bw / 1e9:6.1f} {bw / nbytes:12.1f} {rate:8.1f} "
              f"{statistics.median(fractions):8.0%} {fractions[0]:4.0%}-{fractions[-1]:<4.0%}"
              + (f"{own / 1e9:9.1f} {rate * nbytes / own:7.0%}" if own else ""))


def bandwidth_round(generate, single: list[list[int]], probe, threads: int) -> tuple[float, float]:
    """One paired measurement: batch-1 decode tok/s, and the read bandwidth of the same minute (this
    shared machine's moves 2x from one minute to the next): the mean of a sum over `probe` just
    before and just after the decode (each the best of 3)."""
    import torch

    torch.set_num_threads(threads)
    before = sum_bandwidth([probe], 3)
    first = timed(lambda: generate(single, 1))
    whole = timed(lambda: generate(single, SINGLE_LEN))
    after = sum_bandwidth([probe], 3)
    return (SINGLE_LEN - 1) / (whole - first), (before + after) / 2


def stream_times(llm, prompt: list[int], max_tokens: int) -> list[float]:
    """Times at which each output token of one request arrives, stepping the engine directly."""
    from cluster import SamplingParams

    engine, times = llm.engine, []
    engine.add_request(f"long-{len(prompt)}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                      ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            times += [time.perf_counter()] * len(out.new_token_ids)
    engine.flush()
    return times


def long_context(args) -> None:
    from cluster import LLM, CacheConfig, SchedulerConfig
    from cluster.model.tiny import TinySpec, make_tiny

    L = args.long_prompt
    # vLLM's CPU build takes only 64- or 128-wide DeltaNet heads: with the peer, that toy
    spec = TinySpec(max_position_embeddings=65536, **({"linear_head_dim": 128, "fused_experts": True}
                                                      if args.vllm_venv else {}))
    model_dir = args.model or str(make_tiny(scratch_dir(), spec))
    toy = "make-tiny --linear-head-dim 128 --fused-experts" if args.vllm_venv else "default toy"
    print(f"checkpoint {model_dir} ({toy}, 64K context); batch-1 decode of {3 * SINGLE_LEN} tokens "
          f"(rate: 1 / the median gap between tokens; "
          f"mean: {3 * SINGLE_LEN} / the time from the first token to the last, vLLM's measure); "
          f"K/V stored as {args.kv_cache_dtype}")
    peer = None
    if args.vllm_venv:  # first, on a quiet machine
        result = run_vllm(args.vllm_venv, model_dir, args.passes,
                          ("--mode", "long-context", "--long-prompt", str(L)))
        if result is not None:
            peer = {int(k): v for k, v in result["rates"].items()}
            print(f"  vLLM CPU bfloat16 (K/V bf16): after 256 {peer[256]:6.1f} tok/s, after {L} {peer[L]:6.1f} "
                  f"tok/s (prefill {result['prefill_s'][str(L)]:.1f}s): {peer[L] / peer[256]:.2f}x")
    for dtype in ("float32", "bfloat16"):
        llm = LLM(model=model_dir, dtype=dtype, scheduler=SchedulerConfig(max_num_batched_tokens=2048),
                  cache=CacheConfig(memory_budget_mb=1024, kv_cache_dtype=args.kv_cache_dtype))
        rates, means = {}, {}
        # the short prompt before and after the long one, the better rate kept: this shared machine
        # slows a process down for minutes at a time, and a slow short run would flatter the ratio
        for length in (256, L, 256):
            prompt = long_prompt_of(length)
            start = time.perf_counter()
            times = stream_times(llm, prompt, 3 * SINGLE_LEN)
            # the median gap between tokens: this shared machine stalls a process now and then
            rate = 1 / statistics.median(np.diff(times[1:]))
            mean = (len(times) - 1) / (times[-1] - times[0])
            rates[length], means[length] = max(rate, rates.get(length, 0.0)), max(mean, means.get(length, 0.0))
            print(f"  epserve {dtype:<9} prompt {length:>6}: first token after {times[0] - start:6.2f}s, "
                  f"then {rate:6.1f} tok/s (mean {mean:6.1f})")
        kv_mb, kv_ms = kv_read(llm, L)
        print(f"  epserve {dtype:<9} decode after {L} / after 256 tokens: "
              f"{rates[L] / rates[256]:.2f}x; the attention kernel alone over "
              f"{L} keys: {attention_kernel_ms(llm, L):.2f} ms; reading the "
              f"{kv_mb:.1f} MB of K/V alone takes {kv_ms:.2f} ms at the cache's read bandwidth, so the ratio "
              f"cannot pass {1 / (1 + kv_ms * 1e-3 * rates[256]):.2f}x")
        if peer:
            print(f"  epserve {dtype:<9} against vLLM, mean rates: after 256 {means[256] / peer[256]:.2f}x, "
                  f"after {L} {means[L] / peer[L]:.2f}x; epserve's own ratio of means {means[L] / means[256]:.2f}x")
        llm.shutdown()


def kv_read(llm, keys: int) -> tuple[float, float]:
    """MB of K/V one decode token reads after `keys` tokens (every attention layer), and the ms
    they take at the read bandwidth of the engine's own cache pools (a sum over them, best of 3)."""
    import torch

    kv, cfg = llm.engine.executor.runner.kv, llm.engine.config
    pools = [t.view(torch.float32) for layer in kv.key for t in (kv.key[layer], kv.value[layer])]
    bandwidth = sum_bandwidth(pools, 3)
    itemsize = next(iter(kv.key.values())).element_size()
    nbytes = 2 * len(kv.key) * keys * cfg.num_key_value_heads * cfg.head_dim * itemsize
    return nbytes / 1e6, nbytes / bandwidth * 1e3


def attention_kernel_ms(llm, keys: int) -> float:
    """One decode row's paged attention over `keys` cached tokens in the engine's own cache (its
    layout and dtypes, blocks in shuffled order), median of 20 calls: the long context's own cost."""
    import torch

    from kernels import paged_attention

    runner = llm.engine.executor.runner
    kv = runner.kv
    layer = next(iter(kv.key))
    key_cache, value_cache = kv.key[layer], kv.value[layer]
    S, cfg = kv.block_size, llm.engine.config
    blocks = torch.randperm(key_cache.shape[0])[: -(-keys // S)][None]
    query = torch.randn(1, cfg.num_attention_heads, cfg.head_dim, dtype=runner.model.embed_tokens.weight.dtype)
    lens = (torch.tensor([0, 1]), torch.tensor([keys]))
    times = [timed(lambda: paged_attention(query, key_cache, value_cache, blocks, *lens, cfg.head_dim**-0.5, [1]))
             for _ in range(21)]
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["throughput", "bandwidth", "long-context"], default="throughput")
    parser.add_argument("--model", help="checkpoint (default: made for the mode in a temp dir)")
    parser.add_argument("--vllm-venv", help="a venv with vllm-cpu installed (../shared/peer-vllm/README.md)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes of the 32 x 48 batch")
    parser.add_argument("--rounds", type=int, default=7, help="bandwidth: paired decode / read-bandwidth rounds")
    parser.add_argument("--long-prompt", type=int, default=60000, help="tokens of the long prompt")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "fp8_e5m2", "fp8_e4m3"], default="auto",
                        help="long-context: how K/V are stored (CacheConfig.kv_cache_dtype)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--run-vllm", action="store_true", help=argparse.SUPPRESS)  # inside the vLLM venv
    args = parser.parse_args()
    if args.run_vllm:
        result = (vllm_long_context(args.model, args.long_prompt) if args.mode == "long-context"
                  else measure(vllm_generate(args.model), args.passes))
        print("RESULT " + json.dumps(result), flush=True)
        return
    {"throughput": throughput, "bandwidth": bandwidth, "long-context": long_context}[args.mode](args)


if __name__ == "__main__":
    main()
