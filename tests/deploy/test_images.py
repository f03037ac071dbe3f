"""Images through the front door: OpenAI chat `image_url` parts (data URLs, and http URLs from the
hosts the server names) and gRPC image bytes, down to the expert workers and back, equal to the
engine in process; bad or oversized images refused with 400 / INVALID_ARGUMENT naming the problem,
and the server keeps serving, also while an image URL is slow to answer."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from cluster import SamplingParams
from deploy.client import Client
from deploy.errors import RequestError
from deploy.images import ImageInputs
from tests.deploy.test_server import post
from tests.vision.test_vision import png, random_image, zero_width_png

GREEDY = dict(max_tokens=6, temperature=0.0)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class ImageHost:
    """A local HTTP server for image URLs: `files` by path, /to/<path> redirects to http://<host>:port/<path>
    given by ?host=, and /gate.png answers only once `gate` is set (or after 30 s, noted in `answered`)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fetching, self.gate, self.answered = threading.Event(), threading.Event(), threading.Event()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path, _, query = self.path.partition("?")
                if path.startswith("/to/"):
                    self.send_response(302)
                    self.send_header("Location", f"http://{query.split('=')[1]}:{host.port}/{path[4:]}")
                    self.end_headers()
                    return
                if path == "/gate.png":
                    host.fetching.set()
                    host.gate.wait(30)
                    host.answered.set()
                data = host.files.get(path)
                self.send_response(200 if data is not None else 404)
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.gate.set()
    host.httpd.shutdown()


def test_image_urls_are_fetched_only_from_the_named_hosts(image_host):
    cat = png(random_image(20, 20, 35))
    image_host.files.update({"/cat.png": cat, "/big.png": b"x" * 1001})
    named = ImageInputs(None, 4, max_bytes=1000 + len(cat), max_pixels=10**6, allow_urls=False,
                        url_hosts=["127.0.0.1"])  # naming hosts turns fetching on for them
    assert named.url_bytes(image_host.url("/cat.png")) == cat
    assert named.url_bytes(image_host.url("/to/cat.png?host=127.0.0.1")) == cat
    refused = [(image_host.url("/cat.png", "localhost"), "'localhost' is not one this server fetches from"),
               (image_host.url("/to/cat.png?host=localhost"), "'localhost' is not one"),  # a redirect elsewhere
               (image_host.url("/missing.png"), "404"),
               ("http:///cat.png", "is not an http")]
    for url, message in refused:
        with pytest.raises(RequestError, match=message):
            named.url_bytes(url)
    small = ImageInputs(None, 4, max_bytes=1000, max_pixels=10**6, allow_urls=True)
    with pytest.raises(RequestError, match="above 1000 bytes"):
        small.url_bytes(image_host.url("/big.png"))
    any_host = ImageInputs(None, 4, max_bytes=10**6, max_pixels=10**6, allow_urls=True)
    assert any_host.url_bytes(image_host.url("/cat.png", "localhost")) == cat
    off = ImageInputs(None, 4, max_bytes=10**6, max_pixels=10**6, allow_urls=False)
    with pytest.raises(RequestError, match="--allow-image-urls"):
        off.url_bytes(image_host.url("/cat.png"))


def test_a_slow_image_url_holds_up_only_its_own_request(server, image_host):
    """The replica fetches in a thread: while an image server keeps it waiting, other requests are
    served; the fetched image then gives the same answer as the same image in a data URL."""
    image = png(random_image(64, 64, 36))
    image_host.files["/gate.png"] = image

    def chat(url: str) -> tuple[int, dict]:
        return post(server, "/v1/chat/completions", {
            "model": "tiny", "max_tokens": 6, "temperature": 0.0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe "},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]})

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, image_host.url("/gate.png"))
        assert image_host.fetching.wait(60)
        code, _ = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert code == 200 and not image_host.answered.is_set()  # served while the fetch still waited
        image_host.gate.set()
        code, fetched = slow.result(timeout=120)
    assert code == 200
    code, inline = chat(data_url(image))
    assert code == 200 and fetched["choices"][0]["message"]["content"] == inline["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def client(server):
    c = Client(server["grpc"])
    yield c
    c.close()


def test_openai_chat_with_images_equals_the_engine(server, offline):
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


def test_grpc_image_bytes_and_cli_equal_the_engine(server, client, offline, tmp_path):
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
    assert client.generate("still serving", max_tokens=2, temperature=0.0).usage.completion_tokens == 2


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "'example.com' is not one this server fetches from"),
    ("data:image/png,rawbytes", "must be base64"),
    ("data:image/png;base64,%%%", "not valid base64"),
    ("ftp://example.com/cat.png", "must be a data URL"),
])
def test_image_urls_are_refused_outside_the_named_hosts(server, url, message):
    body = {"model": "tiny", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    code, reply = post(server, "/v1/chat/completions", body)
    assert code == 400 and message in reply["error"]["message"]
