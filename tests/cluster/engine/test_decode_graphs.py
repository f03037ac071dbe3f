"""Decode steps through cluster.worker.decode_graphs' padded static rows (on a CPU they run eagerly:
the path a GPU captures and replays) give the eager engine's tokens and logprobs bit for bit and the
same expert-load counts, while batches shrink inside a bucket and new sequences take freed slots."""

from __future__ import annotations

import torch

from cluster import EngineCore, SamplingParams
from cluster.worker.decode_graphs import batch_bucket, supported, width_bucket
from cluster.worker.runner import ModelRunner
from tests.conftest import FLAGSHIP_SHAPE

FIRST = [(5, 3), (40, 9), (1, 5), (17, 12), (3, 2), (60, 7), (9, 10)]  # (prompt length, max tokens)
LATER = [(12, 6), (2, 8), (33, 5)]  # added once the first wave's short ones are done: freed slots


def generate(engine: EngineCore) -> tuple[dict, torch.Tensor]:
    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, logprobs=2, ignore_eos=True)

    for i, (length, n) in enumerate(FIRST):
        engine.add_request(f"a{i}", [(7 * i + j) % 50 + 3 for j in range(length)], params(n))
    out: dict[str, list] = {}
    for step in range(40):
        if step == 4:
            for i, (length, n) in enumerate(LATER):
                engine.add_request(f"b{i}", [(5 * i + j) % 40 + 3 for j in range(length)], params(n))
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(
                (t, lp.logprob, tuple(lp.top)) for t, lp in zip(o.new_token_ids, o.logprobs))
        if not engine.has_unfinished():
            break
    return out, engine.executor.runner.load.totals()


def test_decode_steps_through_the_graph_rows_equal_eager_steps(make_checkpoint):
    model = make_checkpoint(FLAGSHIP_SHAPE)
    eager = EngineCore(model, warm_up=False)
    padded = EngineCore(model, warm_up=False)
    runner = padded.executor.runner = ModelRunner(padded.executor.runner.model, padded.scheduler.layout,
                                                  decode_graphs=True)
    expected, expected_load = generate(eager)
    got, load = generate(padded)
    assert got == expected
    assert torch.equal(load, expected_load)
    batches = {b for b, _ in runner.graphs.graphs}
    assert {8, 4} <= batches, batches  # shrinking batches padded inside their buckets


def test_buckets():
    assert [batch_bucket(n) for n in (1, 3, 8, 9, 64, 65, 256)] == [1, 4, 8, 16, 64, 96, 256]
    assert batch_bucket(257) is None
    assert [width_bucket(n) for n in (1, 4, 5, 16, 17)] == [4, 4, 8, 16, 32]


def test_graphs_are_captured_on_cuda_in_16_bit_only():
    assert supported("cuda", torch.bfloat16) and supported("cuda", torch.float16)
    assert not supported("cuda", torch.float32) and not supported("cpu", torch.bfloat16)


def test_a_forward_that_does_not_capture_leaves_the_engine_stepping_eagerly(make_checkpoint, monkeypatch):
    from cluster.worker import decode_graphs

    def fails(self, B, W):
        raise decode_graphs.GraphCaptureError(f"batch {B}") from RuntimeError("operation not permitted")

    model = make_checkpoint(FLAGSHIP_SHAPE)
    expected, _ = generate(EngineCore(model, warm_up=False))
    engine = EngineCore(model, warm_up=False)
    runner = engine.executor.runner = ModelRunner(engine.executor.runner.model, engine.scheduler.layout,
                                                  decode_graphs=True)
    monkeypatch.setattr(decode_graphs.DecodeGraphs, "_capture", fails)
    got, _ = generate(engine)
    assert runner.graphs is None and got == expected


def test_the_warm_up_captures_every_batch_bucket_without_touching_sequences(make_checkpoint):
    """EngineCore.warm_up captures the graphs of every bucket up to max_num_seqs (and one wider
    table) at start, over scratch rows only: the steps after it give the eager engine's tokens."""
    from cluster.engine.scheduler import SchedulerConfig

    model = make_checkpoint(FLAGSHIP_SHAPE)
    expected, expected_load = generate(EngineCore(model, warm_up=False))
    engine = EngineCore(model, warm_up=False, scheduler=SchedulerConfig(max_num_seqs=24))
    runner = engine.executor.runner = ModelRunner(engine.executor.runner.model, engine.scheduler.layout,
                                                  decode_graphs=True)
    engine.warm_up()
    assert set(runner.graphs.graphs) >= {(1, 4), (2, 4), (4, 4), (8, 4), (16, 4), (24, 4), (24, 8)}
    got, load = generate(engine)
    assert got == expected and torch.equal(load, expected_load)


def test_a_warm_up_capture_that_fails_turns_graphs_off(make_checkpoint, monkeypatch):
    from cluster.worker import decode_graphs

    def fails(self, B, W):
        raise decode_graphs.GraphCaptureError(f"batch {B}") from RuntimeError("operation not permitted")

    engine = EngineCore(make_checkpoint(FLAGSHIP_SHAPE), warm_up=False)
    runner = engine.executor.runner = ModelRunner(engine.executor.runner.model, engine.scheduler.layout,
                                                  decode_graphs=True)
    monkeypatch.setattr(decode_graphs.DecodeGraphs, "_capture", fails)
    assert runner.capture_decode_graphs(8) == 0 and runner.graphs is None
