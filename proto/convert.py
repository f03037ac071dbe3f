"""Conversions between the gRPC messages and plain Python values (no engine imports here)."""

from __future__ import annotations

from typing import Any

from . import generation_pb2 as pb

_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
           "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_SAMPLING_FIELDS = [f.name for f in pb.SamplingParameters.DESCRIPTOR.fields]


def sampling_kwargs(msg: pb.SamplingParameters) -> dict[str, Any]:
    """The fields the client set, as keyword arguments of SamplingParams."""
    out: dict[str, Any] = {}
    for name in _SAMPLING_FIELDS:
        field = pb.SamplingParameters.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            values = list(getattr(msg, name))
            if values:
                out[name] = tuple(values)
        elif msg.HasField(name):
            out[name] = getattr(msg, name)
    return out


def prompt_of(request: pb.GenerateRequest) -> str | list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("the request has no prompt: set `text` or `token_ids`")
    return request.text if kind == "text" else list(request.token_ids.ids)


def finish_reason(reason: str | None) -> int:
    return _FINISH[reason]


def generate_response(
    request_id: str,
    token_ids: list[int],
    text: str,
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = (),
    finish: str | None = None,
    stop_reason: str | int | None = None,
    usage: tuple[int, int] | None = None,
) -> pb.GenerateResponse:
    """usage = (prompt tokens, completion tokens), set on the last message only."""
    msg = pb.GenerateResponse(
        request_id=request_id, token_ids=token_ids, text=text, finish_reason=finish_reason(finish),
        stop_reason="" if stop_reason is None else str(stop_reason),
        logprobs=[pb.TokenLogprob(token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=i, logprob=v) for i, v in top])
                  for t, lp, top in logprobs],
    )
    if usage is not None:
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=usage[0], completion_tokens=usage[1],
                                    total_tokens=usage[0] + usage[1]))
    return msg
