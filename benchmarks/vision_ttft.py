"""Time to first token with an image: a 448x448 image + 32 text tokens against the 32 text tokens
alone, in one process, on make-tiny's multimodal model; the vision tower's share of the prefill;
transformers' conditional-generation model on the same input beside it.

    python benchmarks/vision_ttft.py                        # writes the checkpoint under /tmp once
    python benchmarks/vision_ttft.py --vision-depth 8 --vision-hidden 256   # a heavier tower

TTFT here is LLM.generate with max_tokens=1 (decode, resize, vision tower, prefill, first sample),
the median of --runs after a warm-up. The tower's time is measured inside the same runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cluster import LLM, SamplingParams
from cluster.model.tiny import TinySpec, make_tiny


def checkpoint(args) -> str:
    spec = TinySpec(multimodal=True, vision_depth=args.vision_depth, vision_hidden=args.vision_hidden,
                    vision_heads=max(2, args.vision_hidden // 64))
    out = Path(args.dir) / f"mm-d{spec.vision_depth}-h{spec.vision_hidden}"
    if not (out / "config.json").is_file():
        make_tiny(out, spec)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/epserve-vision-bench")
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=32)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--no-transformers", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = checkpoint(args)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    text = list(range(10, 42))  # 32 text tokens
    llm = LLM(model=model_dir)
    model = llm.engine.executor.runner.model
    tower_s: list[float] = []
    encode = model.visual.forward

    def timed(*a, **k):
        start = time.perf_counter()
        out = encode(*a, **k)
        tower_s.append(time.perf_counter() - start)
        return out

    model.visual.forward = timed
    one_token = SamplingParams(max_tokens=1, temperature=0)

    def ttft(prompt) -> float:
        start = time.perf_counter()
        llm.generate(prompt, one_token)
        return time.perf_counter() - start

    with_image = {"prompt_token_ids": text, "images": [image]}
    image_tokens = llm.generate(with_image, one_token)[0].prompt_token_ids.count(llm.engine.config.image_token_id)
    plain, mixed = [], []
    for _ in range(args.runs + 1):  # interleaved; the first of each is a warm-up
        plain.append(ttft([text]))
        mixed.append(ttft(with_image))
    plain, mixed, tower = plain[1:], mixed[1:], tower_s[-args.runs:]
    t_plain, t_mixed, t_tower = statistics.median(plain), statistics.median(mixed), statistics.median(tower)
    print(f"model: {model_dir}  (threads {torch.get_num_threads()})")
    print(f"image 448x448 -> {image_tokens} image tokens ({image_tokens * 4} patches); prompt "
          f"{len(text)} text + {image_tokens + 2} image tokens")
    print(f"epserve TTFT, 32 text tokens        : {1e3 * t_plain:8.1f} ms")
    print(f"epserve TTFT, image + 32 text tokens: {1e3 * t_mixed:8.1f} ms  ({t_mixed / t_plain:.2f}x)")
    print(f"  vision tower                      : {1e3 * t_tower:8.1f} ms  ({100 * t_tower / t_mixed:.0f}% of TTFT)")
    if not args.no_transformers:
        from transformers import Qwen2VLImageProcessorPil, Qwen3_5MoeForConditionalGeneration

        cfg = llm.engine.config
        v = cfg.vision
        processed = Qwen2VLImageProcessorPil(
            patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
            image_mean=list(v.image_mean), image_std=list(v.image_std),
            size={"shortest_edge": v.min_pixels, "longest_edge": v.max_pixels})([image], return_tensors="pt")
        ids = torch.tensor([[cfg.vision_start_token_id] + [cfg.image_token_id] * image_tokens
                            + [cfg.vision_end_token_id] + text])
        inputs = dict(input_ids=ids, pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"],
                      mm_token_type_ids=(ids == cfg.image_token_id).int())
        hf = Qwen3_5MoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        times = []
        with torch.no_grad():
            for _ in range(max(3, args.runs // 2) + 1):
                start = time.perf_counter()
                hf(**inputs)
                times.append(time.perf_counter() - start)
        t_hf = statistics.median(times[1:])
        print(f"transformers forward, image + text   : {1e3 * t_hf:8.1f} ms  (epserve TTFT {t_hf / t_mixed:.2f}x faster)")
    llm.shutdown()


if __name__ == "__main__":
    main()
