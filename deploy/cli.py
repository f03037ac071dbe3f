"""The `epserve` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

DEFAULT_DEMO_DIR = Path(os.environ.get("EPSERVE_CACHE", Path.home() / ".cache" / "epserve")) / "tiny-qwen35"


def _add_make_tiny(sub) -> None:
    from cluster.tiny import TinySpec

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


def _spec_from_args(args):
    from cluster.tiny import TinySpec

    return TinySpec(**{f.name: getattr(args, f.name) for f in fields(TinySpec)})


def cmd_make_tiny(args) -> int:
    from cluster.tiny import make_tiny

    start = time.perf_counter()
    out = make_tiny(args.dir, _spec_from_args(args))
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def ensure_demo_model(model_dir: Path = DEFAULT_DEMO_DIR) -> Path:
    """The demo checkpoint: flagship structure at toy width with the real Qwen3.5 vocabulary."""
    from cluster.tiny import TinySpec, make_tiny

    if not (model_dir / "config.json").is_file():
        print(f"creating the demo checkpoint in {model_dir} (once) ...", flush=True)
        make_tiny(model_dir, TinySpec(tokenizer="qwen3.5"))
    return model_dir


def cmd_demo(args) -> int:
    """Generates on an embedded local Ray cluster: E expert workers and A attention workers."""
    from cluster import LLM, SamplingParams

    model_dir = args.model or ensure_demo_model()
    start = time.perf_counter()
    layout = dict(expert_workers=1, attention_workers=1, use_ray=False) if args.local else dict(
        expert_workers=args.expert_workers, attention_workers=args.attention_workers, use_ray=True)
    with LLM(model=model_dir, **layout) as llm:
        cfg = llm.config
        print(f"loaded {model_dir} in {time.perf_counter() - start:.1f}s ({cfg.num_experts} experts, "
              f"top-{cfg.num_experts_per_tok}, {cfg.num_hidden_layers} layers)")
        for info in llm.worker_info():
            held = info.get("expert_bytes", info.get("dense_bytes", 0)) / 2**20
            print(f"  {info['role']:<9} worker rank {info.get('rank', 0)}: {held:.1f} MiB of weights")
        prompts = ["Hello, my name is", "The capital of France is"]
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
        elapsed = time.perf_counter() - start
    for out in outs:
        print(f"{out.prompt!r} -> {out.text!r} ({len(out.token_ids)} tokens, {out.finish_reason})")
    total = sum(len(o.token_ids) for o in outs)
    print(f"generated {total} tokens in {elapsed:.2f}s ({total / elapsed:.1f} tok/s); "
          "the weights are random, so the text is too")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_tiny(sub)
    demo = sub.add_parser("demo", help="generate from the demo checkpoint (created on first use)")
    demo.add_argument("--model", type=Path, default=None, help=f"default: {DEFAULT_DEMO_DIR}")
    demo.add_argument("--max-tokens", type=int, default=16)
    demo.add_argument("--expert-workers", type=int, default=2)
    demo.add_argument("--attention-workers", type=int, default=1)
    demo.add_argument("--local", action="store_true", help="one process, no Ray")
    args = parser.parse_args(argv)
    handlers = {"make-tiny": cmd_make_tiny, "demo": cmd_demo}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
