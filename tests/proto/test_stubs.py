"""The committed stubs are what grpcio-tools makes of the committed .proto."""

from __future__ import annotations

from pathlib import Path

from epserve_proto import convert
from epserve_proto import generation_pb2 as pb
from epserve_proto.regenerate import GENERATED, HERE, regenerate


def test_committed_stubs_match_the_proto(tmp_path: Path):
    regenerate(tmp_path)
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (HERE / name).read_text(), f"{name} is stale: run proto/regenerate.py"


def test_conversions():
    req = pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=5, temperature=0.0, stop=["x"]))
    assert convert.prompt_of(req) == "hi"
    assert convert.sampling_kwargs(req.sampling) == {"max_tokens": 5, "temperature": 0.0, "stop": ("x",)}
    assert convert.sampling_kwargs(pb.SamplingParameters()) == {}
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]))
    assert convert.prompt_of(req) == [1, 2]
    msg = convert.generate_response("r", [4], "a", [(4, -0.5, [(4, -0.5)])], "length", None, (2, 1))
    assert msg.finish_reason == pb.FINISH_REASON_LENGTH and msg.usage.total_tokens == 3
    assert msg.logprobs[0].top[0].token_id == 4
