"""The Serve application through its real gRPC and HTTP proxies on loopback: requests, streams and
their errors, cancellation, overload (operating it: test_server_operations.py)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from cluster import SamplingParams
from epserve_proto import generation_pb2 as pb

GREEDY = dict(max_tokens=8, temperature=0.0, ignore_eos=True)


def model_usage() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Model", app_name="epserve").cache_usage.remote().result(timeout_s=30)


def post(server, path: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(server["http"] + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_grpc_unary_and_stream_equal_the_offline_engine(client, offline):
    expected = offline.generate([[5, 6, 7, 8]], SamplingParams(**GREEDY))[0]
    reply = client.generate([5, 6, 7, 8], **GREEDY)
    assert list(reply.token_ids) == expected.token_ids and reply.text == expected.text
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (4, 8, 12)
    messages = list(client.stream([5, 6, 7, 8], **GREEDY))
    assert [t for m in messages for t in m.token_ids] == expected.token_ids
    assert "".join(m.text for m in messages) == expected.text
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert messages[-1].usage.completion_tokens == 8


def test_grpc_text_prompt_logprobs_info_and_tokenize(client, offline):
    reply = client.generate("hello world", max_tokens=4, temperature=0.0, logprobs=2, ignore_eos=True)
    expected = offline.generate(["hello world"], SamplingParams(max_tokens=4, temperature=0.0, logprobs=2,
                                                                ignore_eos=True))[0]
    assert list(reply.token_ids) == expected.token_ids
    assert [lp.token_id for lp in reply.logprobs] == expected.token_ids and len(reply.logprobs[0].top) == 2
    info = client.model_info()
    assert (info.model, info.num_experts, info.expert_workers, info.max_model_len) == ("tiny", 16, 2, 256)
    ids = client.stub.Tokenize(pb.TokenizeRequest(text="hello world")).token_ids
    assert list(ids) == offline.tokenizer.encode("hello world")
    assert client.stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == "hello world"


def test_openai_client_completions_chat_and_streaming(server, offline):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=server["http"] + "/v1", api_key="unused")
    assert [m.id for m in api.models.list().data] == ["tiny"]
    expected = offline.generate(["hello"], SamplingParams(**GREEDY))[0]
    done = api.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0.0,
                                  extra_body={"ignore_eos": True})
    assert done.choices[0].text == expected.text and done.usage.completion_tokens == 8
    stream = api.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0.0, stream=True,
                                    extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == expected.text
    chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0.0, extra_body={"ignore_eos": True})
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.choices[0].message.content == offline.generate([prompt], SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True))[0].text
    chunks = list(api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0.0, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6


BAD_GRPC = [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (dict(prompt=[3, 10**6]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    (dict(prompt=list(range(3, 300))), grpc.StatusCode.OUT_OF_RANGE, "exceeds the context length of 256"),
    (dict(prompt="hi", max_tokens=129), grpc.StatusCode.OUT_OF_RANGE, "above this server's limit of 128"),
    (dict(prompt="hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0"),
    (dict(prompt="hi", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in"),
    (dict(prompt="hi", logprobs=50), grpc.StatusCode.INVALID_ARGUMENT, "logprobs must be in 0..20"),
    (dict(prompt="hi", model="gpt-4"), grpc.StatusCode.NOT_FOUND, "model 'gpt-4' is not served here"),
]


@pytest.mark.parametrize("kwargs, code, message", BAD_GRPC, ids=[m for _, _, m in BAD_GRPC])
def test_grpc_bad_inputs_name_the_problem(client, kwargs, code, message):
    prompt = kwargs.pop("prompt")
    for call in (client.generate, lambda p, **k: list(client.stream(p, **k))):
        with pytest.raises(grpc.RpcError) as info:
            call(prompt, **kwargs)
        assert info.value.code() == code and message in info.value.details()
    assert client.generate([5], max_tokens=2).usage.completion_tokens >= 1  # still serving


def test_grpc_request_without_prompt(client):
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Generate(pb.GenerateRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no prompt" in info.value.details()


BAD_HTTP = [
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"model": "tiny", "prompt": [3, 10**6]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1000}, 400, "limit of 128"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -2}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 17}, 400, "n must be in 1..16"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "best_of": 3}, 400, "best_of must equal n"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"5": 500}}, 400, "biases in [-100, 100]"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"a": 1}}, 400, "keys must be token ids"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "suffix": "!"}, 400, "suffix is not supported"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": [str(i) for i in range(17)]}, 400,
     "at most 16 strings"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": ["x" * 300]}, 400, "at most 256 characters"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools is not supported"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format is not supported"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA"}}]}]}, 400, "'input_audio' are not"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "'nope' is not served"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages is empty"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_HTTP, ids=[m for *_, m in BAD_HTTP])
def test_http_bad_inputs_get_openai_errors(server, path, body, status, message):
    code, reply = post(server, path, body)
    assert code == status and message in reply["error"]["message"]
    assert reply["error"]["type"] and reply["error"]["code"] == status
    code, reply = post(server, "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 2})
    assert code == 200


def test_n_choices_content_parts_and_stream_usage(server, offline):
    seeded = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0, "seed": 3,
              "ignore_eos": True}
    code, reply = post(server, "/v1/completions", {**seeded, "n": 3, "best_of": 3})
    assert code == 200 and [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 18, "total_tokens": 21}
    for i, choice in enumerate(reply["choices"]):  # choice i is the request seeded seed + i
        expected = offline.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=1.0, seed=3 + i,
                                                                ignore_eos=True))[0]
        assert choice["text"] == expected.text
    req = urllib.request.Request(server["http"] + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({**seeded, "n": 2, "stream": True,
                                                  "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp if line.startswith(b"data: {")]
    text = {0: "", 1: ""}
    for event in events[:-1]:
        [choice] = event["choices"]
        text[choice["index"]] += choice["text"]
    assert text[0] == reply["choices"][0]["text"] and text[1] == reply["choices"][1]["text"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    code, biased = post(server, "/v1/completions", {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 5,
                                                    "temperature": 0.0, "ignore_eos": True, "logit_bias": {"42": 100},
                                                    "logprobs": 0})
    assert code == 200 and biased["choices"][0]["logprobs"]["tokens"] == [offline.tokenizer.decode([42])] * 5
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    chat = {"model": "tiny", "max_tokens": 4, "temperature": 0.0}
    code, joined = post(server, "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": parts}]})
    code2, plain = post(server, "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "hello world"}]})
    assert code == code2 == 200 and joined["choices"][0]["message"] == plain["choices"][0]["message"]


def test_malformed_http_body(server):
    req = urllib.request.Request(server["http"] + "/v1/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400 and "error" in json.loads(info.value.read())


def wait_idle(deadline_s: float = 20) -> dict:
    deadline = time.time() + deadline_s
    while True:
        usage = model_usage()
        if usage["running"] == 0 and usage["waiting"] == 0 or time.time() > deadline:
            return usage


def test_cancelled_grpc_stream_frees_the_request(client):
    stream = client.stream([5, 6, 7], max_tokens=120, ignore_eos=True)
    next(stream)
    next(stream)
    assert model_usage()["running"] == 1
    stream.cancel()
    usage = wait_idle()
    assert usage["running"] == 0 and usage["kv_blocks_used"] == 0 and usage["state_slots_used"] == 0


def test_disconnected_http_stream_frees_the_request(server):
    body = json.dumps({"model": "tiny", "prompt": [5, 6], "max_tokens": 120, "stream": True, "ignore_eos": True})
    req = urllib.request.Request(server["http"] + "/v1/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=60)
    resp.readline()
    resp.close()  # the client goes away mid-stream
    usage = wait_idle()
    assert usage["running"] == 0 and usage["kv_blocks_used"] == 0


def test_overload_gives_resource_exhausted_and_429(server, client):
    """Fill the instance (4 running + 4 waiting), then one more request of each kind is refused."""
    streams = [client.stream([5 + i], max_tokens=120, ignore_eos=True) for i in range(8)]
    received = []

    def drain(stream):
        try:
            for msg in stream:
                received.append(len(msg.token_ids))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.CANCELLED

    threads = [threading.Thread(target=drain, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        usage = model_usage()
        if usage["running"] == 4 and usage["waiting"] == 4:
            break
        time.sleep(0.2)
    assert (usage["running"], usage["waiting"]) == (4, 4)
    with pytest.raises(grpc.RpcError) as info:
        client.generate([9], max_tokens=4)
    req = urllib.request.Request(server["http"] + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 5}).encode())
    with pytest.raises(urllib.error.HTTPError) as http_info:
        urllib.request.urlopen(req, timeout=60)
    status, reply = http_info.value.code, json.loads(http_info.value.read())
    retry_after = http_info.value.headers.get("Retry-After")
    for stream in streams:
        stream.cancel()
    for t in threads:
        t.join(timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in info.value.details()
    assert "retry after 1 s" in info.value.details()
    assert status == 429 and reply["error"]["type"] == "rate_limit_error" and retry_after == "1"
    wait_idle()
    assert client.generate([5], max_tokens=2).usage.completion_tokens >= 1  # serving again


def test_a_burst_gets_429s_and_every_accepted_request_completes(server, client):
    """48 requests at once on an instance that holds 8 (4 running + 4 waiting) and Serve's queue of
    16: the rest are refused at once with 429 + Retry-After; none waits without bound."""
    from concurrent.futures import ThreadPoolExecutor

    body = json.dumps({"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 16, "ignore_eos": True}).encode()

    def one(_):
        req = urllib.request.Request(server["http"] + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())["usage"]["completion_tokens"], None
        except urllib.error.HTTPError as e:
            text = e.read()
            # the engine's refusal has OpenAI's body; Serve's own (its queue full) is plain text
            kind = json.loads(text)["error"]["type"] if text.startswith(b"{") else text.decode(errors="replace")
            return e.code, kind, e.headers.get("Retry-After")

    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(one, range(48)))
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 48 and ok and refused
    assert all(tokens == 16 for _, tokens, _ in ok)  # every accepted request ran to its end
    assert len(ok) + len(refused) == 48, [r for r in results if r[0] not in (200, 429)]
    assert all(retry == "1" and (kind == "rate_limit_error" or "backpressure" in kind) for _, kind, retry in refused), refused
    wait_idle()
    assert client.generate([5], max_tokens=2).usage.completion_tokens >= 1  # serving again
