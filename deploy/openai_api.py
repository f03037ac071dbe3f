"""OpenAI-compatible HTTP routes (/v1/models, /v1/completions, /v1/chat/completions), mixed into
the class that serves requests (deploy.app: the model replica, or a separate ingress); streaming
is server-sent events. Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}
with HTTP 400 / 404 / 429."""

from __future__ import annotations

import asyncio
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
    return JSONResponse(error.openai_body(), status_code=error.http_status, headers=error.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "malformed request"}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return JSONResponse(RequestError("invalid", message, param).openai_body(), status_code=400)


MAX_N = 16  # choices per request
# fields of OpenAI's API that this server does not implement: refused by name, never ignored
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
               "suffix", "audio", "modalities", "prediction", "web_search_options")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are checked against UNSUPPORTED

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # extensions (extra_body in the openai client), as vLLM names them
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []

    def sampling(self, max_tokens: int, logprobs: int | None) -> dict:
        for name in UNSUPPORTED:
            if (self.model_extra or {}).get(name) not in (None, [], {}):
                raise RequestError("invalid", f"{name} is not supported by this server", name)
        if not 1 <= self.n <= MAX_N:
            raise RequestError("invalid", f"n must be in 1..{MAX_N}, got {self.n}", "n")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("invalid", f"best_of must equal n ({self.n}) here: choices are not ranked, "
                                          f"got {self.best_of}", "best_of")
        try:
            bias = {int(token): value for token, value in (self.logit_bias or {}).items()}
        except ValueError as e:
            raise RequestError("invalid", f"logit_bias keys must be token ids: {e}", "logit_bias") from e
        return dict(logit_bias=bias, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
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


class ContentPart(BaseModel):
    type: str
    text: str | None = None
    image_url: dict | str | None = None  # {"url": "data:image/png;base64,..."} (or the bare URL)


class ChatMessage(BaseModel):
    role: str
    content: str | list[ContentPart]

    def rendered(self, image_placeholder: str) -> tuple[dict, list[str]]:
        """{"role", "content"} for the chat template, text parts joined and each image part replaced
        by the image placeholder; and the image parts' URLs in order. Other parts are refused."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}, []
        text, urls = [], []
        for part in self.content:
            if part.type == "text" and part.text is not None:
                text.append(part.text)
            elif part.type == "image_url" and part.image_url:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.get("url")
                if not isinstance(url, str):
                    raise RequestError("invalid", "image_url parts need image_url.url", "messages")
                text.append(image_placeholder)
                urls.append(url)
            else:
                raise RequestError("invalid", f"message content parts of type {part.type!r} are not supported: "
                                              f"send text and image_url parts", "messages")
        return {"role": self.role, "content": "".join(text)}, urls


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class ScaleRequest(BaseModel):
    expert_workers: int


def _usage(lasts: list[dict]) -> dict:
    """Usage over the choices of one request (the prompt counted once)."""
    p, c = lasts[0]["num_prompt_tokens"], sum(out["num_output_tokens"] for out in lasts)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _merged(outputs: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, output) from every choice's stream as they come; ends when all have."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))
        except BaseException as e:  # handed to the consumer, who raises it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(outputs)]
    try:
        open_streams = len(tasks)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


class OpenAIRoutes:
    """Mixed into Ingress (needs .name, .auth, .prepare, .stream, .tokenizer, .chat_template, .max_model_len,
    .images, .image_placeholder)."""

    def _authorize(self, request: Request, admin: bool = False) -> None:
        self.auth.check(request.headers.get("authorization"), admin)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                            "owned_by": "epserve", "max_model_len": self.max_model_len}]}

    # -- expert placement (operators; one model instance answers) -------------------------------
    @app.get("/v1/experts")
    async def expert_status(self, request: Request) -> dict:
        self._authorize(request)
        return await self.model.call("expert_status")

    @app.post("/v1/experts/rebalance")
    async def rebalance_experts(self, request: Request) -> dict:
        self._authorize(request, admin=True)
        return await self.model.call("rebalance")

    @app.post("/v1/experts/scale")
    async def scale_experts(self, body: ScaleRequest, request: Request) -> dict:
        self._authorize(request, admin=True)
        if not 1 <= body.expert_workers <= self.model_config.num_experts:
            raise RequestError("out_of_range", f"expert_workers must be in 1..{self.model_config.num_experts}, "
                                               f"got {body.expert_workers}", "expert_workers")
        return await self.model.call("scale_experts", body.expert_workers)

    async def _start(self, model: str, prompt, sampling: dict, n: int,
                     images: list[bytes] = ()) -> tuple[list[AsyncIterator[dict]], list[dict]]:
        """Validates, starts n generations (seeds seed, seed+1, ... when seeded) and waits for each
        one's first output, so that refusals (bad input, overload) become HTTP errors rather than
        a broken stream. Returns the streams and their first outputs."""
        ids, sampling = self.prepare(model, prompt, sampling, images)
        request_id = f"http-{uuid.uuid4().hex}"
        outputs = [self.stream(ids, sampling if sampling["seed"] is None else {**sampling, "seed": sampling["seed"] + i},
                               f"{request_id}-{i}" if n > 1 else request_id) for i in range(n)]
        try:
            firsts = await asyncio.gather(*(stream.__anext__() for stream in outputs))
        except BaseException:
            for stream in outputs:
                await stream.aclose()  # cancels the ones that started
            raise
        return outputs, list(firsts)

    @staticmethod
    async def _collect(outputs: list[AsyncIterator[dict]], firsts: list[dict]) -> list[list[dict]]:
        async def rest(stream) -> list[dict]:
            return [o async for o in stream]
        return [[first] + tail for first, tail in zip(firsts, await asyncio.gather(*map(rest, outputs)))]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # -- /v1/completions ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request)
        if body.echo:
            raise RequestError("invalid", "echo is not supported", "echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise RequestError("invalid", "one prompt per request: send a string", "prompt")
            prompt = prompt[0]
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        outputs, firsts = await self._start(body.model, prompt, body.sampling(max_tokens, body.logprobs), body.n)
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(index: int, outs: list[dict]) -> dict:
            last = outs[-1]
            logprobs = None
            if body.logprobs is not None:
                lps = [lp for o in outs for lp in o["logprobs"]]
                logprobs = {"tokens": [self._token_text(t) for t, _, _ in lps],
                            "token_logprobs": [lp for _, lp, _ in lps],
                            "top_logprobs": [{self._token_text(i): v for i, v in top} for _, _, top in lps]}
            return {"index": index, "text": "".join(o["new_text"] for o in outs), "logprobs": logprobs,
                    "finish_reason": last["finish_reason"]}

        def chunk(choices: list, usage: dict | None = None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": self.name,
                    "choices": choices, "usage": usage}

        if not body.stream:
            per_choice = await self._collect(outputs, firsts)
            return chunk([choice(i, outs) for i, outs in enumerate(per_choice)], _usage([o[-1] for o in per_choice]))

        async def events():
            lasts = list(firsts)
            for i, first in enumerate(firsts):
                yield chunk([choice(i, [first])])
            async for i, o in _merged(outputs):
                lasts[i] = o
                yield chunk([choice(i, [o])])
            if body.include_usage:
                yield chunk([], _usage(lasts))

        return _sse(events())

    # -- /v1/chat/completions ----------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._authorize(request)
        rendered = [m.rendered(self.image_placeholder) for m in body.messages]
        urls = [url for _, message_urls in rendered for url in message_urls]
        self.images.check_count(len(urls), "messages")  # before anything is fetched or decoded
        try:
            prompt = self.chat_template.render([message for message, _ in rendered])
        except ValueError as e:
            raise RequestError("invalid", str(e), "messages") from e
        images = await asyncio.to_thread(self.images.prepare_urls, urls) if urls else []  # fetching blocks
        prompt_ids = self.tokenizer.encode(prompt)
        prompt_len = len(prompt_ids) + sum(
            image.num_tokens(self.model_config.vision.spatial_merge_size) for image in images)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(
            1, min(self.config.max_tokens_limit, self.max_model_len - prompt_len))
        top = (body.top_logprobs or 0) if body.logprobs else None
        outputs, firsts = await self._start(body.model, prompt_ids, body.sampling(max_tokens, top), body.n, images)
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
            per_choice = await self._collect(outputs, firsts)
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(o["new_text"] for o in outs)},
                        "logprobs": logprobs(outs), "finish_reason": outs[-1]["finish_reason"]}
                       for i, outs in enumerate(per_choice)]
            return chunk("chat.completion", choices, _usage([o[-1] for o in per_choice]))

        def delta(i: int, o: dict, first: bool) -> dict:
            content = {"role": "assistant", "content": o["new_text"]} if first else {"content": o["new_text"]}
            return {"index": i, "delta": content, "logprobs": logprobs([o]), "finish_reason": o["finish_reason"]}

        async def events():
            lasts = list(firsts)
            for i, first in enumerate(firsts):
                yield chunk("chat.completion.chunk", [delta(i, first, True)])
            async for i, o in _merged(outputs):
                lasts[i] = o
                yield chunk("chat.completion.chunk", [delta(i, o, False)])
            if body.include_usage:
                yield chunk("chat.completion.chunk", [], _usage(lasts))

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
