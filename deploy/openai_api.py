"""OpenAI-compatible HTTP routes (/v1/models, /v1/completions, /v1/chat/completions), mixed into
the ingress deployment; streaming is server-sent events. Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}} with HTTP 400 / 404 / 429."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from .errors import RequestError

app = FastAPI(title="epserve", description="OpenAI-compatible API of an epserve model")


@app.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(error.openai_body(), status_code=error.http_status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "malformed request"}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return JSONResponse(RequestError("invalid", message, param).openai_body(), status_code=400)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # extensions (extra_body in the openai client), as vLLM names them
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []

    def sampling(self, max_tokens: int, logprobs: int | None) -> dict:
        if self.n != 1:
            raise RequestError("invalid", f"n must be 1, got {self.n}", "n")
        return dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    min_p=self.min_p, seed=self.seed, stop=self.stop or (), stop_token_ids=self.stop_token_ids,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class ScaleRequest(BaseModel):
    expert_workers: int


def _usage(out: dict) -> dict:
    p, c = out["num_prompt_tokens"], out["num_output_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class OpenAIRoutes:
    """Mixed into Ingress (needs .name, .prepare, .stream, .tokenizer, .chat_template, .max_model_len)."""

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                            "owned_by": "epserve", "max_model_len": self.max_model_len}]}

    # -- expert placement (operators; one model instance answers) -------------------------------
    @app.get("/v1/experts")
    async def expert_status(self) -> dict:
        return await self.model.expert_status.remote()

    @app.post("/v1/experts/rebalance")
    async def rebalance_experts(self) -> dict:
        return await self.model.rebalance.remote()

    @app.post("/v1/experts/scale")
    async def scale_experts(self, body: ScaleRequest) -> dict:
        if not 1 <= body.expert_workers <= self.model_config.num_experts:
            raise RequestError("out_of_range", f"expert_workers must be in 1..{self.model_config.num_experts}, "
                                               f"got {body.expert_workers}", "expert_workers")
        return await self.model.scale_experts.remote(body.expert_workers)

    async def _start(self, model: str, prompt, sampling: dict) -> tuple[list[int], AsyncIterator[dict], dict]:
        """Validates, starts generation and waits for the first output, so that refusals (bad
        input, overload) become HTTP errors rather than a broken stream."""
        ids, sampling = self.prepare(model, prompt, sampling)
        outputs = self.stream(ids, sampling, f"http-{uuid.uuid4().hex}")
        first = await outputs.__anext__()
        return ids, outputs, first

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # -- /v1/completions ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        if body.echo:
            raise RequestError("invalid", "echo is not supported", "echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise RequestError("invalid", "one prompt per request: send a string", "prompt")
            prompt = prompt[0]
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        _, outputs, first = await self._start(body.model, prompt, body.sampling(max_tokens, body.logprobs))
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(outs: list[dict]) -> dict:
            last = outs[-1]
            logprobs = None
            if body.logprobs is not None:
                lps = [lp for o in outs for lp in o["logprobs"]]
                logprobs = {"tokens": [self._token_text(t) for t, _, _ in lps],
                            "token_logprobs": [lp for _, lp, _ in lps],
                            "top_logprobs": [{self._token_text(i): v for i, v in top} for _, _, top in lps]}
            return {"index": 0, "text": "".join(o["new_text"] for o in outs), "logprobs": logprobs,
                    "finish_reason": last["finish_reason"]}

        def chunk(choices: list, usage: dict | None = None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": self.name,
                    "choices": choices, "usage": usage}

        if not body.stream:
            outs = [first] + [o async for o in outputs]
            return chunk([choice(outs)], _usage(outs[-1]))

        async def events():
            last = first
            yield chunk([choice([first])])
            async for o in outputs:
                last = o
                yield chunk([choice([o])])
            if body.include_usage:
                yield chunk([], _usage(last))

        return _sse(events())

    # -- /v1/chat/completions ----------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        try:
            prompt = self.chat_template.render([m.model_dump() for m in body.messages])
        except ValueError as e:
            raise RequestError("invalid", str(e), "messages") from e
        prompt_len = len(self.tokenizer.encode(prompt))
        max_tokens = body.max_completion_tokens or body.max_tokens or max(
            1, min(self.config.max_tokens_limit, self.max_model_len - prompt_len))
        top = (body.top_logprobs or 0) if body.logprobs else None
        _, outputs, first = await self._start(body.model, prompt, body.sampling(max_tokens, top))
        chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(outs: list[dict]) -> dict | None:
            if not body.logprobs:
                return None
            return {"content": [
                {"token": self._token_text(t), "logprob": lp, "bytes": None,
                 "top_logprobs": [{"token": self._token_text(i), "logprob": v, "bytes": None} for i, v in tops]}
                for o in outs for t, lp, tops in o["logprobs"]]}

        def chunk(kind: str, choices: list, usage: dict | None = None) -> dict:
            return {"id": chat_id, "object": kind, "created": created, "model": self.name,
                    "choices": choices, "usage": usage}

        if not body.stream:
            outs = [first] + [o async for o in outputs]
            message = {"role": "assistant", "content": "".join(o["new_text"] for o in outs)}
            return chunk("chat.completion", [{"index": 0, "message": message, "logprobs": logprobs(outs),
                                              "finish_reason": outs[-1]["finish_reason"]}], _usage(outs[-1]))

        async def events():
            last = first
            role = {"role": "assistant"}
            for o in [first]:
                yield chunk("chat.completion.chunk", [{"index": 0, "delta": {**role, "content": o["new_text"]},
                                                       "logprobs": logprobs([o]), "finish_reason": o["finish_reason"]}])
            async for o in outputs:
                last = o
                yield chunk("chat.completion.chunk", [{"index": 0, "delta": {"content": o["new_text"]},
                                                       "logprobs": logprobs([o]), "finish_reason": o["finish_reason"]}])
            if body.include_usage:
                yield chunk("chat.completion.chunk", [], _usage(last))

        return _sse(events())


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c)}\n\n"
        except RequestError as e:  # failed mid-stream: the status is sent already; say so in-band
            yield f"data: {json.dumps(e.openai_body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")
