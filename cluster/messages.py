"""msgpack encoding of the control messages between the engine and its workers.

Tensors that cross the process group never appear here; the only tensors encoded are the logits an
attention worker returns to the engine (raw little-endian fp32 bytes with their shape).
Nothing is unpickled: msgpack decodes to plain lists, ints and bytes, validated by the dataclasses.
"""

from __future__ import annotations

import msgpack
import numpy as np
import torch

from .runner import SequenceChunk, StepInput


def encode_step(step: StepInput) -> bytes:
    return msgpack.packb(
        {
            "chunks": [[c.seq_id, list(c.token_ids), c.all_logits] for c in step.chunks],
            "finished": list(step.finished),
        }
    )


def decode_step(data: bytes) -> StepInput:
    raw = msgpack.unpackb(data)
    chunks = tuple(
        SequenceChunk(int(seq_id), tuple(int(t) for t in ids), bool(all_logits))
        for seq_id, ids, all_logits in raw["chunks"]
    )
    return StepInput(chunks, tuple(int(s) for s in raw["finished"]))


def encode_tensors(tensors: list[torch.Tensor]) -> bytes:
    return msgpack.packb(
        [[list(t.shape), t.detach().float().cpu().contiguous().numpy().tobytes()] for t in tensors]
    )


def decode_tensors(data: bytes) -> list[torch.Tensor]:
    out = []
    for shape, buf in msgpack.unpackb(data):
        array = np.frombuffer(buf, dtype="<f4").reshape(shape)
        out.append(torch.from_numpy(array.copy()))
    return out
