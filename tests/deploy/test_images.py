"""Images through the front door: OpenAI chat `image_url` parts (data URLs) and gRPC image bytes,
down to the expert workers and back, equal to the engine in process; bad or oversized images
refused with 400 / INVALID_ARGUMENT naming the problem, and the server keeps serving."""

from __future__ import annotations

import base64
import subprocess
import sys

import grpc
import pytest

from cluster import SamplingParams
from deploy.client import Client
from tests.deploy.test_server import offline, post  # noqa: F401 (fixture)
from tests.vision.test_vision import png, random_image, zero_width_png

GREEDY = dict(max_tokens=6, temperature=0.0)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(server):
    c = Client(server["grpc"])
    yield c
    c.close()


def test_openai_chat_with_images_equals_the_engine(server, offline):  # noqa: F811
    from openai import OpenAI

    images = [png(random_image(70, 100, 31)), png(random_image(130, 64, 32))]
    api = OpenAI(base_url=server["http"] + "/v1", api_key="unused")
    content = [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": data_url(images[0])}},
               {"type": "text", "text": " and "}, {"type": "image_url", "image_url": {"url": data_url(images[1])}}]
    reply = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **GREEDY)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = f"<|im_start|>user\nCompare {image} and {image}<|im_end|>\n<|im_start|>assistant\n"
    [expected] = offline.generate({"prompt": prompt, "images": images}, SamplingParams(**GREEDY))
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)  # image tokens counted
    assert len(expected.prompt_token_ids) > len(offline.tokenizer.encode(prompt)) + 4


def test_grpc_image_bytes_and_cli_equal_the_engine(server, client, offline, tmp_path):  # noqa: F811
    image = png(random_image(96, 96, 33))
    reply = client.generate("Describe:", images=[image], **GREEDY)
    [expected] = offline.generate({"prompt": "Describe:", "images": [image]}, SamplingParams(**GREEDY))
    assert reply.text == expected.text and reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    streamed = "".join(m.text for m in client.stream("Describe:", images=[image], **GREEDY))
    assert streamed == expected.text
    (tmp_path / "image.png").write_bytes(image)
    run = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "Describe:", "--image",
                          str(tmp_path / "image.png"), "--address", server["grpc"], "--max-tokens", "6"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == expected.text + "\n", run.stderr
    assert f"[{len(expected.prompt_token_ids)} prompt + 6 completion tokens]" in run.stderr


BAD = [
    ([png(random_image(40, 40))[:60]], "cannot be decoded"),  # truncated PNG
    ([b""], "empty"),
    ([zero_width_png()], "zero width or height"),
    ([png(random_image(800, 700))], "max_image_pixels"),  # 560,000 pixels; the server takes 500,000
    ([png(random_image(32, 32))] * 3, "max_images_per_request"),
]


@pytest.mark.parametrize("images, message", BAD, ids=[m for _, m in BAD])
def test_bad_images_are_refused_and_the_server_keeps_serving(server, client, images, message):
    with pytest.raises(grpc.RpcError) as err:
        client.generate("hi", images=images, max_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    code, reply = post(server, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": parts}]})
    assert code == 400 and message in reply["error"]["message"]
    assert client.generate("still serving", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "--allow-image-urls"),
    ("data:image/png,rawbytes", "must be base64"),
    ("data:image/png;base64,%%%", "not valid base64"),
    ("ftp://example.com/cat.png", "must be a data URL"),
])
def test_image_urls_are_refused_unless_allowed(server, url, message):
    body = {"model": "tiny", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    code, reply = post(server, "/v1/chat/completions", body)
    assert code == 400 and message in reply["error"]["message"]
