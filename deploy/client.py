"""A small gRPC client for epserve.v1.Generation (used by `epserve generate`, `bench` and `demo`)."""

from __future__ import annotations

import grpc

from epserve_proto import generation_pb2 as pb
from epserve_proto import generation_pb2_grpc as pb_grpc


def request(prompt: str | list[int], model: str = "", request_id: str = "", images: list[bytes] = (),
            **sampling) -> pb.GenerateRequest:
    """images: encoded images (PNG, JPEG, ...) for a model with a vision tower."""
    msg = pb.GenerateRequest(model=model, request_id=request_id, sampling=pb.SamplingParameters(**sampling),
                             images=list(images))
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.ids.extend(prompt)
    return msg


class Client:
    def __init__(self, address: str = "127.0.0.1:9000", application: str | None = None,
                 api_key: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        # Serve routes by application name when several run; with one it is optional
        self.metadata = ((("application", application),) if application else ()) + (
            (("authorization", f"Bearer {api_key}"),) if api_key else ())

    def generate(self, prompt, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(request(prompt, **kwargs), metadata=self.metadata, timeout=timeout)

    def stream(self, prompt, timeout: float | None = None, **kwargs):
        """An iterator of GenerateResponse deltas; call .cancel() on it to stop early."""
        return self.stub.GenerateStream(request(prompt, **kwargs), metadata=self.metadata, timeout=timeout)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()
