"""`epserve bench`: a load generator against a running server's gRPC or HTTP endpoint.

Closed loop: `concurrency` workers each send requests one after another until `num_prompts` are
done. Prompts are random token ids of `prompt_len`; every request asks for exactly `output_len`
tokens (end-of-sequence ignored). Reports throughput, TTFT and TPOT (p50/p99), as text or JSON.
Tokens are counted, not messages: a stream may carry several tokens in one message.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass


@dataclass
class BenchResult:
    endpoint: str
    concurrency: int
    num_prompts: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    statuses: dict[str, int]  # "ok", or the HTTP status / gRPC code of each failed request


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _grpc_one(client, prompt, output_len) -> tuple[float, list[float], int]:
    """(start, arrival time of each message with tokens, tokens)."""
    times, tokens = [], 0
    start = time.perf_counter()
    for msg in client.stream(prompt, max_tokens=output_len, ignore_eos=True, temperature=0.0):
        if msg.token_ids:
            times.append(time.perf_counter())
            tokens += len(msg.token_ids)
    return start, times, tokens


def _http_one(url, model, prompt, output_len, api_key=None) -> tuple[float, list[float], int]:
    """(start, arrival time of each event with text, tokens): the usage the server reports at the
    end counts the tokens, since a server may send several in one event."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": output_len, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True,
                       "temperature": 0.0}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers=headers)
    times, tokens = [], 0
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: "):])
            if any(choice.get("text") for choice in event.get("choices") or []):
                times.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return start, times, tokens or len(times)


def run_bench(endpoint: str, address: str, http_url: str, concurrency: int, num_prompts: int,
              prompt_len: int, output_len: int, vocab_size: int, model: str = "",
              progress: bool = True, api_key: str | None = None) -> BenchResult:
    from .client import Client

    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(prompt_len)] for _ in range(num_prompts)]
    ttfts, tpots, tokens, failed, done = [], [], 0, 0, 0
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    client = Client(address, api_key=api_key) if endpoint == "grpc" else None

    def one(prompt):
        nonlocal tokens, failed, done
        try:
            if client is not None:
                start, times, count = _grpc_one(client, prompt, output_len)
            else:
                start, times, count = _http_one(http_url, model, prompt, output_len, api_key)
            ok, status = bool(times), "ok" if times else "no tokens"
        except Exception as e:
            ok, times, start, count = False, [], 0.0, 0
            code = getattr(e, "code", None)  # urllib's HTTPError.code; grpc.RpcError.code()
            status = str(code().name if callable(code) else code) if code is not None else type(e).__name__
        with lock:
            done += 1
            statuses[status] = statuses.get(status, 0) + 1
            if ok:
                ttfts.append(times[0] - start)
                if count > 1:  # the time per output token after the first, however they were grouped
                    tpots.append((times[-1] - times[0]) / (count - 1))
                tokens += count
            else:
                failed += 1
            if progress:
                bar = "#" * (30 * done // num_prompts)
                print(f"\r[{bar:<30}] {done}/{num_prompts}", end="", file=sys.stderr, flush=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, prompts))
    duration = time.perf_counter() - start
    if progress:
        print(file=sys.stderr)
    if client is not None:
        client.close()
    return BenchResult(
        endpoint, concurrency, num_prompts, failed, duration, (num_prompts - failed) / duration,
        tokens / duration, percentile(ttfts, 50) * 1e3, percentile(ttfts, 99) * 1e3,
        percentile(tpots, 50) * 1e3, percentile(tpots, 99) * 1e3, dict(sorted(statuses.items())))


def format_result(r: BenchResult, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(r), indent=2)
    return (f"{r.endpoint} bench: concurrency {r.concurrency}, {r.num_prompts} requests ({r.failed} failed) "
            f"in {r.duration_s:.1f}s\n"
            f"  throughput   {r.requests_per_s:.2f} req/s, {r.output_tokens_per_s:.1f} output tok/s\n"
            f"  TTFT         p50 {r.ttft_p50_ms:.1f} ms, p99 {r.ttft_p99_ms:.1f} ms\n"
            f"  TPOT         p50 {r.tpot_p50_ms:.1f} ms, p99 {r.tpot_p99_ms:.1f} ms\n"
            f"  statuses     {', '.join(f'{k} {v}' for k, v in r.statuses.items())}")
