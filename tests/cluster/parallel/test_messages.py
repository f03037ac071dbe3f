"""Every process boundary is a typed message with a round-trip test."""

from __future__ import annotations

import torch

from cluster.worker.messages import decode_results, decode_step, encode_results, encode_step
from cluster.worker.step import ChunkResult, SamplingSpec, ScheduledChunk, StepInput


def test_step_round_trip():
    step = StepInput(
        chunks=(
            ScheduledChunk(3, (1, 2, 3), 0, (4, 5), 2, True, False, SamplingSpec(0.7, 0.9, 5, 0.1, 42, 0.5, 0.25, 1.1, 3, 3)),
            ScheduledChunk(4, (9,), 17, (), -1, True, False, None),
            ScheduledChunk(5, (1, 2), 0, (6,), 0, False, True, SamplingSpec()),
        ),
        freed=(1, 2),
    )
    assert decode_step(encode_step(step)) == step


def test_results_round_trip():
    results = [ChunkResult(3, 17, -1.5, [(17, -1.5), (4, -2.0)]), ChunkResult(5, -1, 0.0, [], torch.randn(2, 7))]
    decoded = decode_results(encode_results(results))
    assert [(r.seq_id, r.token_id, r.logprob, r.top_logprobs) for r in decoded] == [
        (3, 17, -1.5, [(17, -1.5), (4, -2.0)]), (5, -1, 0.0, [])]
    assert torch.equal(decoded[1].logits, results[1].logits) and decoded[0].logits is None
