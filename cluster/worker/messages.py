"""msgpack encoding of the messages between the engine and its workers: step inputs, results,
and the commands of the step loop.

Tensors of the MoE layers never appear here (they cross the worker links raw); the only tensors
encoded are scoring logits, as raw little-endian fp32 bytes with their shape, and a fresh
sequence's images, as raw uint8 pixels with their size. Nothing is unpickled:
msgpack decodes to plain lists, numbers and bytes, rebuilt into the typed dataclasses.
"""

from __future__ import annotations

from dataclasses import astuple

import msgpack
import numpy as np
import torch

from vision import PreparedImage

from .step import ChunkResult, SamplingSpec, ScheduledChunk, StepInput


def encode_step(step: StepInput) -> bytes:
    chunks = [
        [c.seq_id, list(c.token_ids), c.past, list(c.new_blocks), c.slot, c.sample, c.want_logits,
         None if c.sampling is None else list(astuple(c.sampling)), c.spec_tokens, c.verify, c.next_token,
         [[start, list(image.grid), *image.pixels.shape[:2], image.pixels.tobytes()] for start, image in c.images]]
        for c in step.chunks
    ]
    return msgpack.packb({"chunks": chunks, "freed": list(step.freed)})


def decode_step(data: bytes) -> StepInput:
    raw = msgpack.unpackb(data)  # msgpack's ints, bools and arrays decode as int, bool and list
    chunks = []
    for (seq_id, ids, past, blocks, slot, sample, want_logits, sampling, spec_tokens, verify, next_token,
         images) in raw["chunks"]:
        chunks.append(ScheduledChunk(
            seq_id, tuple(ids), past, tuple(blocks), slot, sample, want_logits,
            None if sampling is None else _spec(sampling), spec_tokens, verify, next_token,
            tuple(_image(*image) for image in images) if images else (),
        ))
    return StepInput(tuple(chunks), tuple(raw["freed"]))


def _image(start: int, grid: list[int], height: int, width: int, pixels: bytes) -> tuple[int, PreparedImage]:
    array = np.frombuffer(pixels, dtype=np.uint8).reshape(int(height), int(width), 3)
    return int(start), PreparedImage(array, tuple(int(n) for n in grid))


def _spec(fields: list) -> SamplingSpec:
    *scalars, bias = fields
    return SamplingSpec(*scalars, tuple((int(t), float(b)) for t, b in bias))


def _encode_tensor(t: torch.Tensor | None):
    if t is None:
        return None
    return [list(t.shape), t.detach().float().cpu().contiguous().numpy().tobytes()]


def _decode_tensor(raw) -> torch.Tensor | None:
    if raw is None:
        return None
    shape, buf = raw
    return torch.from_numpy(np.frombuffer(buf, dtype="<f4").reshape(shape).copy())


def encode_results(results: list[ChunkResult]) -> bytes:
    return msgpack.packb([
        [r.seq_id, r.token_id, r.logprob, [list(p) for p in r.top_logprobs], _encode_tensor(r.logits),
         [[t, lp, [list(p) for p in top]] for t, lp, top in r.accepted]]
        for r in results
    ])


def decode_results(data: bytes) -> list[ChunkResult]:
    """A worker's reply to a step: its results, or raises the error it reported (encode_error)."""
    raw = msgpack.unpackb(data)
    if isinstance(raw, dict):
        raise RuntimeError(f"worker failed: {raw.get('error')}")
    return [
        ChunkResult(int(seq_id), int(token), float(logprob), _top(top), _decode_tensor(logits),
                    [(int(t), float(lp), _top(t_top)) for t, lp, t_top in accepted])
        for seq_id, token, logprob, top, logits, accepted in raw
    ]


def _top(pairs) -> list[tuple[int, float]]:
    return [(int(i), float(lp)) for i, lp in pairs]


# -- engine -> worker commands over the control link (cluster.worker.links) ---------------------
STEP, RELEASE, PAUSE = 0, 1, 2  # run a step; only forget finished sequences; leave the step loop


def encode_command(kind: int, rows: list[list[int]], step: bytes = b"", number: int = 0,
                   mtp_rows: list[list[int]] | None = None) -> bytes:
    """rows[a][m]: rows attention worker a computes in micro-batch m of this step (the expert
    exchange's message sizes); mtp_rows[a][p]: its rows in MTP pass p (step.mtp_pass_rows); step:
    that attention worker's encoded StepInput (empty for experts); number: the engine's count of
    steps, by which recovery tells a finished step from a failed one."""
    return msgpack.packb([kind, [list(r) for r in rows], step, number, [list(r) for r in mtp_rows or []]])


def decode_command(data: bytes) -> tuple[int, list[list[int]], bytes, int, list[list[int]]]:
    kind, rows, step, number, mtp_rows = msgpack.unpackb(data)
    return (int(kind), [[int(n) for n in r] for r in rows], bytes(step), int(number),
            [[int(n) for n in r] for r in mtp_rows])


def encode_error(message: str) -> bytes:
    """A worker's reply when its step failed (results are a msgpack list; an error is a dict)."""
    return msgpack.packb({"error": message})
