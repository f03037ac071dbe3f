"""The `epserve` command line: make-tiny, demo, serve, generate, bench, experts, plan, batch."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path

from .config import DTYPES, KV_CACHE_DTYPES

CACHE_DIR = Path(os.environ.get("EPSERVE_CACHE", Path.home() / ".cache" / "epserve"))
DEFAULT_DEMO_DIR = CACHE_DIR / "tiny-qwen35"
DEFAULT_TRAINED_DIR = CACHE_DIR / "tiny-trained"  # `epserve make-tiny <this> --train`: the demo then uses it


def _add_make_tiny(sub) -> None:
    from cluster.model.tiny import TinySpec

    p = sub.add_parser("make-tiny", help="write a random Qwen3.5-MoE checkpoint (HF format)")
    p.add_argument("dir", type=Path)
    defaults = TinySpec()
    for f in fields(TinySpec):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--train", action="store_true",
                   help=f"train it (and its MTP module) on --corpus; `epserve demo` uses {DEFAULT_TRAINED_DIR} when it exists")
    p.add_argument("--train-minutes", type=float, default=5.0)
    p.add_argument("--corpus", default=None, help="text file or directory of *.py (default: the Python standard library)")


def _spec_from_args(args):
    from cluster.model.tiny import TinySpec

    return TinySpec(**{f.name: getattr(args, f.name) for f in fields(TinySpec)})


def cmd_make_tiny(args) -> int:
    from cluster.model.tiny import make_tiny

    start = time.perf_counter()
    if args.train:
        from cluster.model.train import TrainSpec, make_trained

        out = make_trained(args.dir, _spec_from_args(args), TrainSpec(minutes=args.train_minutes, corpus=args.corpus))
    else:
        out = make_tiny(args.dir, _spec_from_args(args))
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def ensure_demo_model(model_dir: Path = DEFAULT_DEMO_DIR) -> Path:
    """The demo checkpoint: a trained one when `epserve make-tiny DEFAULT_TRAINED_DIR --train` made
    it, else the flagship structure at toy width with the real Qwen3.5 vocabulary and random weights."""
    from cluster.model.tiny import TinySpec, make_tiny

    if model_dir == DEFAULT_DEMO_DIR and (DEFAULT_TRAINED_DIR / "config.json").is_file():
        return DEFAULT_TRAINED_DIR
    if not (model_dir / "config.json").is_file():
        print(f"creating the demo checkpoint in {model_dir} (once) ...", flush=True)
        make_tiny(model_dir, TinySpec(tokenizer="qwen3.5"))
    return model_dir


def _server_config(args):
    from .config import AppConfig

    model = args.model or ensure_demo_model()
    return AppConfig(
        model=str(model), served_model_name=args.name, in_process=args.in_process,
        expert_workers=(1 if args.in_process else 2) if args.expert_workers is None else args.expert_workers,
        attention_workers=args.attention_workers, cpus_per_worker=args.cpus_per_worker,
        min_replicas=args.min_replicas,
        max_replicas=max(args.max_replicas, args.min_replicas),
        target_ongoing_requests=args.target_ongoing_requests, device=args.device, dtype=args.dtype,
        api_keys=_keys(args.api_key, "EPSERVE_API_KEY"), admin_api_keys=_keys(args.admin_api_key, "EPSERVE_ADMIN_API_KEY"),
        speculative_tokens=args.speculative_tokens,
        allow_image_urls=args.allow_image_urls, image_url_hosts=args.image_url_host or [],
        max_images_per_request=args.max_images_per_request, stream_interval=args.stream_interval,
        ingress=args.ingress, kv_cache_dtype=args.kv_cache_dtype, fp8_activations=args.fp8_activations,
    )


def _instance(cfg) -> str:
    """What one model instance is, in words."""
    if cfg.in_process:
        return "the model in each replica's process"
    return f"{cfg.attention_workers} attention + {cfg.expert_workers} expert workers per instance"


def cmd_serve(args) -> int:
    """Serves gRPC and HTTP until interrupted."""
    from .launch import ClusterViews, direct_ingress_refusal, start_server, stop_server

    cfg = _server_config(args)
    start = time.perf_counter()
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise SystemExit("--ssl-certfile and --ssl-keyfile go together")
    refusal = direct_ingress_refusal(args.address) if args.direct_ingress else None
    if refusal:
        raise SystemExit(f"--direct-ingress: {refusal}")
    views = ClusterViews(dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host,
                         dashboard_port=args.dashboard_port, metrics_port=args.metrics_port)
    shown = start_server(cfg, args.grpc_port, args.http_port, args.host, args.address, ssl_certfile=args.ssl_certfile,
                         ssl_keyfile=args.ssl_keyfile, views=views, direct_ingress=args.direct_ingress)
    scheme = "https" if args.ssl_certfile else "http"
    auth = " -H 'Authorization: Bearer $EPSERVE_API_KEY'" if cfg.api_keys else ""
    print(f"serving {cfg.name!r} ({_instance(cfg)}, {cfg.min_replicas}-{cfg.max_replicas} instances) "
          f"in {time.perf_counter() - start:.0f}s"
          f"{'; API keys required' if cfg.api_keys else ''}")
    print(f"  gRPC  0.0.0.0:{args.grpc_port} (every interface, plaintext)  epserve.v1.Generation    "
          f"try: epserve generate \"hello\" --address 127.0.0.1:{args.grpc_port}")
    print(f"  HTTP  {scheme}://{args.host}:{args.http_port}/v1  OpenAI API       "
          f"try: curl {scheme}://{args.host}:{args.http_port}/v1/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"model\": \"{cfg.name}\", \"prompt\": \"hello\", \"max_tokens\": 8}}'")
    if args.direct_ingress:
        http_ports = ", ".join(str(p) for p in shown["direct_http"]) or "none found"
        grpc_ports = ", ".join(str(p) for p in shown["direct_grpc"]) or "none found"
        print(f"  direct to a model replica, no proxy relay: HTTP {scheme}://{args.host}:PORT/v1, PORT {http_ports}; "
              f"gRPC port {grpc_ports}")
    print(f"  Ray dashboard  {shown['dashboard'] or 'off (--no-dashboard)'}"
          + ("  (Serve: /#/serve; the cluster's own when joining one)" if shown["dashboard"] else ""))
    print(f"  Prometheus     {shown['metrics'] or 'none'}  (ray_epserve_* metrics; Grafana: deploy/grafana/)")
    print("Ctrl-C (or SIGTERM) stops the server.", flush=True)

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_server()
    return 0


def cmd_generate(args) -> int:
    from .client import Client

    client = Client(args.address, api_key=args.api_key)
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature,
                    images=[Path(path).read_bytes() for path in args.image])
    if args.seed is not None:
        sampling["seed"] = args.seed
    if args.stream:
        last = None
        for msg in client.stream(args.prompt, **sampling):
            print(msg.text, end="", flush=True)
            last = msg
        print()
        usage = last.usage
    else:
        reply = client.generate(args.prompt, **sampling)
        print(reply.text)
        usage = reply.usage
    print(f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    """Loads a server. gRPC: epserve's own API. HTTP: any OpenAI-compatible server (the model name
    comes from its /v1/models; prompts are token ids below --vocab-size)."""
    from .bench import format_result, run_bench

    host = args.address.rsplit(":", 1)[0]
    http_url = (args.http_url or f"http://{host}:8000").rstrip("/")
    if args.endpoint == "grpc":
        from .client import Client

        info = Client(args.address, api_key=args.api_key).model_info()
        model, vocab_size = info.model, args.vocab_size or info.vocab_size
    else:
        model = _http_json(f"{http_url}/v1/models", api_key=args.api_key)["data"][0]["id"]
        vocab_size = args.vocab_size or 256
    result = run_bench(args.endpoint, args.address, http_url, args.concurrency, args.num_prompts, args.prompt_len,
                       args.output_len, vocab_size, model, progress=not args.json, api_key=args.api_key)
    print(format_result(result, args.json))
    return 0


def _http_json(url: str, body: dict | None = None, api_key: str | None = None) -> dict:
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def cmd_experts(args) -> int:
    """Expert placement and load of a running server; optionally rebalance / scale, and draw the
    load (one PNG: before and after side by side on shared colour scales)."""
    from .heatmap import write_heatmap

    def show(status: dict, label: str) -> None:
        if status["placement"] is None:
            print(f"{label}: the model runs in process (every expert local), load of {len(status['load'])} layers")
            return
        per_layer = [sum(len(ids) for ids in layer) for layer in status["placement"]]
        print(f"{label}: {status['expert_workers']} expert workers, {per_layer[0]} expert slots in layer 0 "
              f"({per_layer[0] - len(status['load'][0])} replicas), worker load max {status['max_load']:.0f} / "
              f"mean {status['mean_load']:.0f} = imbalance {status['imbalance']:.2f}")
        busiest = [max(row) for row in status["worker_load_vs_mean"]]
        print(f"  busiest worker / mean, per layer: {' '.join(f'{b:.2f}' for b in busiest)}")

    changing = args.rebalance or args.scale
    snapshots = [("before" if changing else "now", _http_json(f"{args.url}/v1/experts", api_key=args.api_key))]
    show(snapshots[0][1], snapshots[0][0])
    if args.scale:
        _http_json(f"{args.url}/v1/experts/scale", {"expert_workers": args.scale}, api_key=args.admin_api_key)
    if args.rebalance:
        _http_json(f"{args.url}/v1/experts/rebalance", {}, api_key=args.admin_api_key)
    if changing:
        snapshots.append(("after", _http_json(f"{args.url}/v1/experts", api_key=args.api_key)))
        show(snapshots[1][1], "after")
    if args.heatmap and snapshots[0][1]["placement"] is None:
        print("  no picture: the load per worker needs expert workers")
    elif args.heatmap:
        path = write_heatmap(args.heatmap, [(label, s["load"], s["placement"]) for label, s in snapshots])
        print(f"  picture: {path}")
    return 0


def cmd_demo(args) -> int:
    """The whole system once: embedded Ray, the Serve app, a gRPC call and an OpenAI HTTP call."""
    import json
    import urllib.request

    from .client import Client
    from .launch import start_server, stop_server

    cfg = _server_config(args)
    start = time.perf_counter()
    start_server(cfg, args.grpc_port, args.http_port)
    print(f"started an embedded Ray cluster and the epserve app in {time.perf_counter() - start:.0f}s: "
          f"model {cfg.name!r}, {_instance(cfg)}")
    try:
        key = cfg.api_keys[0] if cfg.api_keys else None
        client = Client(f"127.0.0.1:{args.grpc_port}", api_key=key)
        info = client.model_info()
        print(f"gRPC GetModelInfo: {info.num_experts} experts, top-{info.num_experts_per_tok}, "
              f"{info.num_layers} layers, context {info.max_model_len}")
        trained = (Path(cfg.model) / "epserve_training.json").is_file()  # cluster.model.train.TRAINING_RECORD
        prompt = "import os\n\n\ndef " if trained else "Hello, my name is"
        # a model trained for minutes loops under greedy decoding (runs of spaces): sample it
        sampling = {"temperature": 0.7, "seed": 0} if trained else {"temperature": 0.0}
        reply = client.generate(prompt, max_tokens=args.max_tokens, **sampling)
        print(f"gRPC Generate: {reply.text!r} ({reply.usage.completion_tokens} tokens)")
        # a chat for the random model; the trained one never saw a chat template: a completion
        route, request = (("completions", {"prompt": "class Parser:\n    def "}) if trained
                          else ("chat/completions", {"messages": [{"role": "user", "content": "What is MoE?"}]}))
        body = json.dumps({"model": cfg.name, **request, "max_tokens": args.max_tokens, **sampling}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(f"http://127.0.0.1:{args.http_port}/v1/{route}", data=body, headers=headers)
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        choice = reply["choices"][0]
        text = choice["text"] if trained else choice["message"]["content"]
        print(f"HTTP /v1/{route}: {text!r} ({reply['usage']['completion_tokens']} tokens)")
        print("the weights were trained for minutes on Python source, so the text looks like it" if trained
              else "the weights are random, so the text is too (`epserve make-tiny "
                   f"{DEFAULT_TRAINED_DIR} --train` trains one the demo then uses)")
    finally:
        stop_server()
    return 0


def cmd_batch(args) -> int:
    """Offline batch inference on Ray Data (cluster.batch): INPUT rows in, OUTPUT Parquet out."""
    from cluster.batch import BatchConfig, run_batch

    config = BatchConfig(
        model=str(args.model), prompt_column=args.prompt_column, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed, instances=args.instances, expert_workers=args.expert_workers,
        attention_workers=args.attention_workers, batch_size=args.batch_size, cpus_per_instance=args.cpus_per_instance,
        dtype=args.dtype, address=args.address)
    try:
        summary = run_batch(args.input, args.output, config)
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"epserve batch: error: {e}", file=sys.stderr)
        return 2
    if not summary["processed"]:
        print(f"{args.output}: all {summary['rows']} rows were done already")
        return 0
    print(f"wrote {args.output}: {summary['rows']} rows ({summary['already_done']} done before, "
          f"{summary['processed']} now, {summary['errors']} with an error) in {summary['seconds']:.1f}s, "
          f"{summary['processed'] / summary['seconds']:.1f} rows/s, "
          f"{summary['output_tokens'] / summary['seconds']:.0f} output tok/s")
    return 0


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="offline batch inference on Ray Data: Parquet/JSONL in, Parquet out (resumable)")
    p.add_argument("input", help="Parquet, or JSON lines (.jsonl)")
    p.add_argument("output", help="Parquet; an existing one is resumed (its rows are kept)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="row i samples with seed + i")
    p.add_argument("--instances", type=int, default=1, help="model instances in the actor pool")
    p.add_argument("--expert-workers", type=int, default=1, help="per instance (> 1: Ray actors of its own)")
    p.add_argument("--attention-workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128, help="rows per call and per part file")
    p.add_argument("--cpus-per-instance", type=float, default=1.0)
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the dtype the checkpoint was saved in")
    p.add_argument("--address", default=None, help="join this Ray cluster ('auto': the running one)")


def _add_server_args(p, grpc_port: int, http_port: int) -> None:
    p.add_argument("--model", type=Path, default=None, help=f"checkpoint dir (default: {DEFAULT_DEMO_DIR})")
    p.add_argument("--name", default=None, help="served model name (default: the directory name)")
    p.add_argument("--expert-workers", type=int, default=None, help="per instance (default 2; 1 with --in-process)")
    p.add_argument("--attention-workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=0.25,
                   help="CPUs each worker reserves (with --in-process: the replica's model); rounded (at least 1), "
                        "its torch threads")
    p.add_argument("--in-process", action="store_true",
                   help="each model replica runs the model itself (dense layers and every expert in its own "
                        "process; CUDA graphs on a GPU) instead of in worker actors: for models one device holds")
    p.add_argument("--grpc-port", type=int, default=grpc_port)
    p.add_argument("--http-port", type=int, default=http_port)
    p.add_argument("--min-replicas", type=int, default=1, help="autoscaling: fewest model instances")
    p.add_argument("--max-replicas", type=int, default=1, help="autoscaling: most model instances")
    p.add_argument("--target-ongoing-requests", type=float, default=16)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where the workers run (auto: cuda when the Ray cluster has GPUs)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and activations; auto: the dtype the checkpoint was saved in")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="how K/V are stored (auto: --dtype); narrower holds more tokens, rounded")
    p.add_argument("--fp8-activations", action="store_true",
                   help="an FP8 checkpoint on GPUs with e4m3 (sm_89+): prefill-sized GEMMs quantize their "
                        "activations to e4m3 and multiply FP8 x FP8 (W8A8; default: weights dequantised, W8A16)")
    p.add_argument("--speculative-tokens", type=int, default=0, choices=range(4), metavar="K",
                   help="MTP speculative decoding: draft K (1..3) tokens per step with the checkpoint's MTP "
                        "module (0: off)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed message after the first (fewer messages through Serve under load)")
    p.add_argument("--ingress", choices=["colocated", "separate"], default="colocated",
                   help="colocated: each model replica serves HTTP and gRPC itself; separate: a stateless "
                        "ingress deployment in front of the model replicas (one more relay per message)")
    p.add_argument("--max-images-per-request", type=int, default=4, help="images one request may carry")
    p.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image_url parts of chat requests (default: data URLs only)")
    p.add_argument("--image-url-host", action="append", default=None, metavar="HOST",
                   help="fetch image URLs from this host only (repeatable; implies --allow-image-urls; "
                        "redirects elsewhere are refused)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on every request but health (repeatable; "
                        "default: $EPSERVE_API_KEY)")
    p.add_argument("--admin-api-key", action="append", default=None,
                   help="allow rebalance / scale with this key (repeatable; default: $EPSERVE_ADMIN_API_KEY; "
                        "without one they are refused)")


def cmd_plan(args) -> int:
    """The memory plan of one model instance, and whether it fits a device of --device-gib."""
    from cluster import ConfigError
    from cluster.config import ClusterConfig, ModelConfig, resolve_dtype
    from cluster.engine.cache_plan import CacheConfig, plan_cache
    from cluster.engine.memory_plan import FLAGSHIP, GIB, plan_instance
    from cluster.model.checkpoint import CheckpointReader
    from cluster.model.loading import fp8_dense_names
    from cluster.model.quantization import read_quantization

    cfg = ModelConfig.from_dict(FLAGSHIP) if args.model is None else ModelConfig.from_pretrained(args.model)
    if args.dtype == "auto":  # the flagship is released in bfloat16 (and FP8 of it)
        args.dtype = "bfloat16" if args.model is None else resolve_dtype("auto", args.model)
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    cache = CacheConfig(memory_budget_mb=args.kv_cache_memory_mb, kv_cache_dtype=args.kv_cache_dtype)
    layout = plan_cache(cfg, cache, args.max_num_seqs, dtype_bytes)
    cluster = ClusterConfig(expert_workers=args.expert_workers, attention_workers=args.attention_workers,
                            use_ray=True)
    # planned for GPUs: an FP8 checkpoint's experts stay FP8 there with a 16-bit dtype
    quantization = read_quantization(args.model) if args.model is not None else None
    fp8_block = quantization.block if quantization else (128, 128) if args.fp8 else None
    fp8_block = fp8_block if dtype_bytes == 2 else None
    fp8_dense = []
    if fp8_block is not None:  # the checkpoint's FP8 tensors, or (None) those of Qwen's FP8 release
        fp8_dense = fp8_dense_names(cfg, CheckpointReader(args.model) if args.model is not None else None)
    plan = plan_instance(cfg, layout, dtype_bytes, cluster, args.max_num_batched_tokens, fp8_block, fp8_dense)
    experts = (f", experts and {len(fp8_dense)} dense linear layers FP8 ({fp8_block[0]}x{fp8_block[1]} blocks)"
               if fp8_block else "")
    print(f"{args.model or 'Qwen3.5-397B-A17B (flagship shape)'}, {args.dtype}{experts}: "
          f"{args.attention_workers} attention + {args.expert_workers} expert workers; {args.max_num_seqs} "
          f"sequences, {layout.num_blocks} KV blocks of {layout.block_size} tokens per attention worker")
    print(plan.describe())
    try:
        plan.check(f"a {args.device_gib:g} GiB device", int(args.device_gib * GIB))
    except ConfigError as e:
        print(f"does not fit: {str(e).splitlines()[0]}")
        return 1
    print(f"fits a {args.device_gib:g} GiB device per worker")
    return 0


def _add_key_args(p, admin: bool = False) -> None:
    p.add_argument("--api-key", default=os.environ.get("EPSERVE_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $EPSERVE_API_KEY)")
    if admin:
        p.add_argument("--admin-api-key", default=os.environ.get("EPSERVE_ADMIN_API_KEY"),
                       help="for --rebalance / --scale (default: $EPSERVE_ADMIN_API_KEY)")


def _keys(given: list[str] | None, variable: str) -> list[str]:
    """--api-key values, else the environment variable's (one key)."""
    return list(given) if given else ([os.environ[variable]] if os.environ.get(variable) else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_tiny(sub)
    plan_p = sub.add_parser("plan", help="memory per worker of one model instance (default: the flagship)")
    plan_p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the 397B flagship shape)")
    plan_p.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="auto: the checkpoint's own; bfloat16 for the flagship shape")
    plan_p.add_argument("--fp8", action="store_true",
                        help="the flagship's FP8 release (128x128 blocks): experts stay FP8 on GPUs (a checkpoint "
                             "given with --model says so itself)")
    plan_p.add_argument("--expert-workers", type=int, default=8)
    plan_p.add_argument("--attention-workers", type=int, default=2)
    plan_p.add_argument("--max-num-seqs", type=int, default=32)
    plan_p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    plan_p.add_argument("--kv-cache-memory-mb", type=float, default=16384)
    plan_p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="how K/V are stored (auto: --dtype)")
    plan_p.add_argument("--device-gib", type=float, default=80, help="memory of each worker's device")
    serve_p = sub.add_parser("serve", help="serve gRPC and OpenAI HTTP on an embedded (or existing) Ray cluster")
    _add_server_args(serve_p, 9000, 8000)
    serve_p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (gRPC listens on all)")
    serve_p.add_argument("--address", default=None, help="join this Ray cluster ('auto': the running one)")
    serve_p.add_argument("--direct-ingress", action="store_true",
                         help="each model replica also serves HTTP/gRPC on its own port (from --http-port + 1 / "
                              "--grpc-port + 1 up; Ray Serve's direct ingress, embedded cluster only): clients "
                              "there skip the proxy's relay, the fastest path for one instance")
    serve_p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    serve_p.add_argument("--ssl-keyfile", default=None, help="... and this private key (PEM)")
    serve_p.add_argument("--dashboard-host", default="127.0.0.1",
                         help="the Ray dashboard's bind address (0.0.0.0 shows it, and its job and actor "
                              "controls, to the network)")
    serve_p.add_argument("--dashboard-port", type=int, default=8265)
    serve_p.add_argument("--no-dashboard", action="store_true", help="start the embedded cluster without it")
    serve_p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics of the embedded cluster")
    demo = sub.add_parser("demo", help="start the server, call it over gRPC and HTTP, stop")
    _add_server_args(demo, 9000, 8000)
    demo.add_argument("--max-tokens", type=int, default=12)
    gen = sub.add_parser("generate", help="generate through a running server (gRPC)")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:9000")
    gen.add_argument("--stream", action="store_true")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image file to send with the prompt (repeatable; models with a vision tower)")
    _add_key_args(gen)
    bench = sub.add_parser("bench", help="load-test a running server")
    bench.add_argument("--endpoint", choices=["grpc", "http"], default="grpc")
    bench.add_argument("--address", default="127.0.0.1:9000", help="gRPC address")
    bench.add_argument("--http-url", default=None,
                       help="an OpenAI-compatible server's URL (default: http://<host of --address>:8000)")
    bench.add_argument("--vocab-size", type=int, default=None,
                       help="prompt token ids are drawn below this (default: the model's over gRPC, 256 over HTTP)")
    bench.add_argument("--concurrency", type=int, default=8)
    bench.add_argument("--num-prompts", type=int, default=64)
    bench.add_argument("--prompt-len", type=int, default=32)
    bench.add_argument("--output-len", type=int, default=32)
    bench.add_argument("--json", action="store_true")
    _add_key_args(bench)
    experts = sub.add_parser("experts", help="expert placement and load of a running server")
    experts.add_argument("--url", default="http://127.0.0.1:8000")
    experts.add_argument("--heatmap", default=None, help="write a PNG of the load per worker and layer "
                         "(before and after, side by side, with --rebalance / --scale)")
    experts.add_argument("--rebalance", action="store_true", help="plan and apply a placement now")
    experts.add_argument("--scale", type=int, default=None, help="change the number of expert workers")
    _add_key_args(experts, admin=True)
    _add_batch(sub)
    args = parser.parse_args(argv)
    handlers = {"make-tiny": cmd_make_tiny, "demo": cmd_demo, "serve": cmd_serve, "plan": cmd_plan, "generate": cmd_generate,
                "bench": cmd_bench, "experts": cmd_experts, "batch": cmd_batch}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
