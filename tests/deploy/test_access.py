"""API keys through the real proxies: a second application started with keys on the session's Serve."""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request

import grpc
import pytest
import ray

from deploy.auth import Authenticator, bearer_token
from deploy.client import Client
from deploy.errors import RequestError

KEY, OTHER_KEY, ADMIN = "sk-test-1", "sk-test-2", "sk-admin"


@pytest.fixture(scope="module")
def secure(server):
    from ray import serve

    from deploy.app import build_app

    # the separate layout (an ingress deployment in front of the model's): the main server is colocated
    cfg = server["config"].model_copy(update={"api_keys": [KEY, OTHER_KEY], "admin_api_keys": [ADMIN],
                                              "expert_workers": 1, "ingress": "separate"})
    serve.run(build_app(cfg), name="secure", route_prefix="/secure")
    yield {"http": server["http"] + "/secure", "grpc": server["grpc"]}
    serve.delete("secure")


def call(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


COMPLETION = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0.0}  # greedy: an end token sampled by chance would cut it short


def test_the_separate_layout_carries_images_and_streams_like_the_colocated(server, secure):
    """The ingress deployment hands prepared images and streams to the model's over gRPC."""
    from tests.deploy.test_images import data_url
    from tests.vision.test_vision import png, random_image

    image = data_url(png(random_image(48, 80, 37)))
    body = {"model": "tiny", "max_tokens": 5, "temperature": 0.0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]}
    code, colocated = call(server["http"] + "/v1/chat/completions", body)
    assert code == 200
    code, separate = call(secure["http"] + "/v1/chat/completions", body, key=KEY)
    assert code == 200 and separate["choices"] == colocated["choices"]
    greedy = {**COMPLETION, "max_tokens": 4, "temperature": 0.0}
    code, whole = call(secure["http"] + "/v1/completions", greedy, key=KEY)
    req = urllib.request.Request(secure["http"] + "/v1/completions", data=json.dumps({**greedy, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert code == 200 and events[-1] == "[DONE]"
    assert "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"]) == whole["choices"][0]["text"]


def test_http_needs_a_key(secure):
    code, reply = call(secure["http"] + "/v1/completions", COMPLETION)
    assert code == 401 and "missing API key" in reply["error"]["message"]
    assert reply["error"]["type"] == "authentication_error"
    code, reply = call(secure["http"] + "/v1/completions", COMPLETION, key="sk-wrong")
    assert code == 401 and reply["error"]["message"] == "invalid API key"
    for key in (KEY, OTHER_KEY, ADMIN):  # every configured key; an admin key is a key too
        code, reply = call(secure["http"] + "/v1/completions", COMPLETION, key=key)
        assert code == 200 and reply["usage"]["completion_tokens"] == 2
    assert call(secure["http"] + "/v1/models")[0] == 401
    assert call(secure["http"] + "/v1/models", key=KEY)[0] == 200
    assert call(secure["http"] + "/v1/experts")[0] == 401


def test_admin_operations_need_the_admin_key(secure):
    code, reply = call(secure["http"] + "/v1/experts/scale", {"expert_workers": 1}, key=KEY)
    assert code == 403 and "admin API key" in reply["error"]["message"]
    code, reply = call(secure["http"] + "/v1/experts/scale", {"expert_workers": 1}, key=ADMIN)
    assert code == 200 and reply["expert_workers"] == 1


def test_openai_client_sends_its_key(secure):
    openai = pytest.importorskip("openai")
    ok = openai.OpenAI(base_url=secure["http"] + "/v1", api_key=KEY)
    assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0.0).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secure["http"] + "/v1", api_key="sk-wrong").models.list()


def test_grpc_needs_a_key_but_health_does_not(secure):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    without = Client(secure["grpc"], application="secure")
    with pytest.raises(grpc.RpcError) as info:
        without.generate([5, 6], max_tokens=2)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(without.stream([5, 6], max_tokens=2))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        without.model_info()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = Client(secure["grpc"], application="secure", api_key="sk-wrong")
    with pytest.raises(grpc.RpcError) as info:
        wrong.generate([5, 6], max_tokens=2)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid API key" in info.value.details()
    assert Client(secure["grpc"], application="secure", api_key=KEY).generate([5, 6], max_tokens=2, temperature=0.0).usage.completion_tokens == 2
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(secure["grpc"]))
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), metadata=(("application", "secure"),), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    without.close(), wrong.close()


def test_authenticator_rules():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    open_server = Authenticator([], [])
    open_server.check(None)  # no keys configured: open, except admin
    with pytest.raises(RequestError, match="admin operations are disabled"):
        open_server.check("Bearer anything", admin=True)
    keyed = Authenticator(["k1"], ["a1"])
    keyed.check("Bearer a1")
    keyed.check("Bearer a1", admin=True)
    with pytest.raises(RequestError) as info:
        keyed.check("Bearer k1", admin=True)
    assert info.value.http_status == 403


def _self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made here (PEM files)."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_epserve_serve_over_https_with_a_key(server, tmp_path):
    """`epserve serve --ssl-certfile --ssl-keyfile --api-key --direct-ingress` in its own process and
    Ray cluster: the proxy's port and the model replica's own port both serve HTTPS behind the key."""
    import os
    import signal
    import ssl
    import subprocess
    import sys
    import time

    from tests.conftest import free_port

    cert, key = _self_signed(tmp_path)
    http_port, dashboard_port, metrics_port = free_port(), free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "serve", "--model", server["model_dir"], "--name", "tiny", "--expert-workers", "1",
         "--grpc-port", str(free_port()), "--http-port", str(http_port), "--ssl-certfile", cert,
         "--ssl-keyfile", key, "--api-key", KEY, "--dashboard-port", str(dashboard_port),
         "--metrics-port", str(metrics_port), "--direct-ingress"], stdout=log, stderr=subprocess.STDOUT, text=True,
        # as a user's shell: no Ray token settings inherited from this test session's own cluster
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}, "EPSERVE_API_KEY": "",
             "RAY_metrics_report_interval_ms": "1000"})  # metrics on the endpoint in 1 s, not Ray's 10
    try:
        deadline = time.time() + 180
        while "serving" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        while "Ctrl-C" not in (tmp_path / "serve.log").read_text():
            time.sleep(0.2)
        banner = (tmp_path / "serve.log").read_text()
        assert f"https://127.0.0.1:{http_port}/v1" in banner and "API keys required" in banner
        # the Ray dashboard and the Prometheus endpoint of the embedded cluster, as the banner says
        assert f"Ray dashboard  http://127.0.0.1:{dashboard_port}" in banner
        metrics_url = re.search(r"Prometheus +(http://\S+/metrics)", banner).group(1)
        assert f":{metrics_port}/metrics" in metrics_url
        version = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=30).read())
        assert version["ray_version"] == ray.__version__
        context = ssl.create_default_context(cafile=cert)
        url = f"https://127.0.0.1:{http_port}/v1/completions"
        body = json.dumps(COMPLETION).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request, context=context, timeout=60) as resp:
            assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 2
        direct_port = int(re.search(r"HTTP https://127.0.0.1:PORT/v1, PORT (\d+)", banner).group(1))
        assert direct_port > http_port  # from --http-port + 1 up
        direct = urllib.request.Request(f"https://127.0.0.1:{direct_port}/v1/completions", data=body,
                                        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(direct, context=context, timeout=60) as resp:
            assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 2
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(direct.full_url, data=body, headers={
                "Content-Type": "application/json"}), context=context, timeout=60)
        assert info.value.code == 401
        deadline = time.time() + 60
        while "ray_epserve_generated_tokens_total" not in urllib.request.urlopen(metrics_url, timeout=30).read().decode():
            assert time.time() < deadline, "no epserve metrics on the banner's Prometheus endpoint"
            time.sleep(1)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}),
                                   context=context, timeout=60)
        assert info.value.code == 401
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP is not served on that port
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=10).read()
        _dashboard_shows_the_app(dashboard_port)  # last: it skips where there is no browser
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_direct_ingress_needs_an_embedded_cluster(server):
    """Direct ingress is read where Serve's controller starts: joining a running cluster is refused."""
    from deploy.launch import start_server

    with pytest.raises(ValueError, match="embedded cluster"):
        start_server(server["config"], address="auto", direct_ingress=True)


def _dashboard_shows_the_app(port: int) -> None:
    """Headless Chromium (Debian's package, which .ci/run installs) renders the Ray dashboard's Serve
    page, and it lists the epserve application with its (colocated) model deployment, healthy."""
    import shutil
    import subprocess
    import time

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (apt-get install chromium): the dashboard page check needs it")
    deadline, dom = time.time() + 60, ""
    while time.time() < deadline:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                              "--dump-dom", f"http://127.0.0.1:{port}/#/serve"],
                             capture_output=True, text=True, timeout=120).stdout
        if all(word in dom for word in ("epserve", "Model", "HEALTHY", "RUNNING")):
            return
        time.sleep(2)
    raise AssertionError(f"the dashboard's Serve page does not show the app: {dom[-2000:]}")
