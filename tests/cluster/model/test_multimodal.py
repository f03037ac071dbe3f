"""Prompts with images through the engine, exact against transformers' conditional-generation
model: logits with one and two images of different sizes (in one process, chunked prefill splitting
the image tokens, and on Ray with two expert workers), greedy generation, and refusals."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from cluster.config import ModelConfig
from cluster.engine.scheduler import SchedulerConfig
from cluster.model.tiny import TinySpec
from tests.reference import hf_vl_greedy, hf_vl_logits
from tests.vision.test_vision import random_image

SPEC = TinySpec(seed=22, num_experts=16, top_k=4, multimodal=True)
ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(make_checkpoint):
    return make_checkpoint(SPEC)


def prompts(model_dir: str) -> list[tuple[list[int], list]]:
    """(ids with one <|image_pad|> per image, images): one image, then two of different sizes."""
    cfg = ModelConfig.from_pretrained(model_dir)
    image = [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
    return [([10, 11] + image + [12, 13, 14], [random_image(70, 100, 1)]),
            ([20] + image + [21, 22] + image + [23, 24, 25], [random_image(64, 130, 2), random_image(96, 96, 3)])]


def test_logits_match_transformers_in_one_process(model_dir):
    cases = prompts(model_dir)
    expected = [hf_vl_logits(model_dir, ids, images) for ids, images in cases]
    # a budget of 8 tokens per step: the image tokens are split over chunked-prefill steps
    for scheduler in (None, SchedulerConfig(max_num_batched_tokens=8)):
        with LLM(model=model_dir, scheduler=scheduler) as llm:
            got = llm.score([{"prompt_token_ids": ids, "images": images} for ids, images in cases])
        for ours, ref in zip(got, expected):
            assert ours.shape == ref.shape
            assert (ours - ref).abs().max() <= ATOL


def test_greedy_generation_matches_transformers(model_dir):
    ids, images = prompts(model_dir)[1]
    expected = hf_vl_greedy(model_dir, ids, images, 12)
    with LLM(model=model_dir) as llm:
        # batched with a text-only prompt and the one-image prompt: rows of both kinds in one step
        out = llm.generate([{"prompt_token_ids": ids, "images": images}, [5, 6, 7],
                            {"prompt_token_ids": prompts(model_dir)[0][0], "images": prompts(model_dir)[0][1]}],
                           SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out[0].token_ids == expected


def test_text_prompt_with_images_puts_them_first(model_dir):
    cfg = ModelConfig.from_pretrained(model_dir)
    image = random_image(64, 64, 4)
    with LLM(model=model_dir) as llm:
        [placed] = llm.generate({"prompt": "Hello", "images": [image]}, SamplingParams(max_tokens=2))
        assert placed.prompt_token_ids[0] == cfg.vision_start_token_id
        assert placed.prompt_token_ids.count(cfg.image_token_id) == 4  # 64x64: 4x4 patches, 2x2 tokens
        with pytest.raises(ValueError, match="2 image placeholders"):
            llm.generate({"prompt_token_ids": prompts(model_dir)[1][0], "images": [image]})
        with pytest.raises(ValueError, match="cannot be decoded"):
            llm.generate({"prompt": "Hello", "images": [b"\x89PNG broken"]})
        with pytest.raises(ValueError, match="unknown prompt keys"):
            llm.generate({"prompt": "Hello", "image": [image]})


def test_text_only_model_refuses_images(make_checkpoint):
    with LLM(model=make_checkpoint(TinySpec(seed=23, num_experts=8, top_k=2))) as llm:
        with pytest.raises(ValueError, match="no vision tower"):
            llm.generate({"prompt": "Hello", "images": [random_image(40, 40)]})


def test_expert_parallel_matches_reference_and_single_process(ray_cluster, model_dir):
    cases = prompts(model_dir)
    requests = [{"prompt_token_ids": ids, "images": images} for ids, images in cases]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with LLM(model=model_dir) as llm:
        local = [o.token_ids for o in llm.generate(requests, greedy)]
    with LLM(model=model_dir, expert_workers=2, attention_workers=1, use_ray=True) as llm:
        got = llm.score(requests)
        remote = [o.token_ids for o in llm.generate(requests, greedy)]
    for ours, (ids, images) in zip(got, cases):
        assert (ours - hf_vl_logits(model_dir, ids, images)).abs().max() <= ATOL
    assert remote == local


def test_speculative_decoding_after_images_is_lossless(make_checkpoint):
    """MTP drafts over an image prompt (the MTP layer gets the image embeddings too): greedy
    tokens equal plain decoding, with a budget that splits the image tokens over chunks."""
    model_dir = make_checkpoint(TinySpec(seed=24, num_experts=16, top_k=4, multimodal=True, mtp=True))
    requests = [{"prompt_token_ids": ids, "images": images} for ids, images in prompts(model_dir)]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    budget = SchedulerConfig(max_num_batched_tokens=8)
    with LLM(model=model_dir, scheduler=budget) as llm:
        plain = [o.token_ids for o in llm.generate(requests, greedy)]
    with LLM(model=model_dir, scheduler=budget,
             speculative_config={"method": "mtp", "num_speculative_tokens": 2}) as llm:
        drafted = [o.token_ids for o in llm.generate(requests, greedy)]
        assert llm.spec_stats()["verify_steps"] > 0
    assert drafted == plain
