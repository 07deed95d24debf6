"""Scale-out on Ray Serve (server/ray_serve.py), with real Ray on this machine: two replicas of
the real smollm2-135m behind one endpoint answer as the single-process server does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from draftwise.api import LLM
from draftwise.errors import DraftwiseError
from draftwise.server import ServerThread, create_app

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m"
PROMPTS = ["Write a Python function that adds two numbers.", "Name three colours.", "What is 12 * 7?"]


def _ray():
    try:
        import ray
        from ray import serve  # noqa: F401
    except ModuleNotFoundError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Ray Serve tests, but {e.name} is missing (the ray extra)")
        pytest.skip(f"the ray extra is not installed ({e.name})")
    return ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single():
    """The single-process server, the reference."""
    try:
        llm = LLM(MODEL, dtype="bf16", max_batch_size=4, progress=False)
    except DraftwiseError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-model tests, but {MODEL} cannot load: {exc}")
        pytest.skip(f"cannot load {MODEL}: {exc}")
    with ServerThread(create_app(llm, served_model_name=MODEL, max_queue=16)) as srv:
        yield srv.url


def deploy(speculative_config: dict, seconds: float = 120) -> str:
    """Two replicas of MODEL with this speculation on a local Ray (2 CPUs); their URL once healthy."""
    _ray()
    from draftwise.server.ray_serve import build_application, run_application, start_ray
    from draftwise.server.settings import ServerSettings

    start_ray(None, num_cpus=2)
    port = free_port()
    settings = ServerSettings(model=MODEL, dtype="bf16", max_batch_size=4, max_queue=16, served_model_name=MODEL,
                              speculative_config=speculative_config)
    run_application(build_application(settings, replicas=2, num_cpus=0.5), "127.0.0.1", port, blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, seconds)
    return url


def undeploy() -> None:
    ray = _ray()
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def replicas(single):
    yield deploy({"method": "suffix", "num_speculative_tokens": 8, "adaptive": False})
    undeploy()


def wait_until(check, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {seconds} s")
        time.sleep(0.5)


def chat(url: str, prompt: str, stream: bool = False, max_tokens: int = 24) -> tuple[int, dict | list[str]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    with httpx.Client(timeout=120) as c:
        if not stream:
            r = c.post(f"{url}/v1/chat/completions", json=body)
            return r.status_code, r.json()
        with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            return r.status_code, [line for line in r.iter_lines() if line.startswith("data: ")]


def stream_text(lines: list[str]) -> str:
    assert lines[-1] == "data: [DONE]"
    return "".join(json.loads(x[6:])["choices"][0]["delta"].get("content") or "" for x in lines[:-1]
                   if json.loads(x[6:])["choices"])


def per_replica(text: str, name: str) -> dict[str, float]:
    """Each replica's own copy of the series `name` (its `replica` label -> value)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'replica="' in line:
            out[line.split('replica="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def metric(text: str, name: str, replica: bool = False) -> float:
    """The summed series `name` (or the sum of its per-replica copies)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if ('replica="' in line) == replica:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_greedy_chat_and_completions_equal_the_single_server(single, replicas):
    for prompt in PROMPTS:
        code, want = chat(single, prompt)
        assert code == 200
        code, got = chat(replicas, prompt)
        assert code == 200
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
        assert got["usage"] == want["usage"]
        code, lines = chat(replicas, prompt, stream=True)
        assert code == 200 and stream_text(lines) == want["choices"][0]["message"]["content"]
    body = {"model": MODEL, "prompt": "def fib(n):", "max_tokens": 16, "temperature": 0, "logprobs": 2}
    want = httpx.post(f"{single}/v1/completions", json=body, timeout=120).json()
    got = httpx.post(f"{replicas}/v1/completions", json=body, timeout=120).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert got["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]


def test_the_suffix_cache_learns_across_replicas(replicas):
    """A question answered once, by one replica, is drafted from by both afterwards: every
    later answer (whichever replica serves it) replays it (the replicas run `suffix`)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Describe a lighthouse at dusk in detail."}],
            "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    first = httpx.post(f"{replicas}/v1/chat/completions", json=body, timeout=120).json()
    time.sleep(3 * 1.0 + 1)  # sequences travel every PUSH_SECONDS, through the hub and back
    for _ in range(6):
        again = httpx.post(f"{replicas}/v1/chat/completions", json=body, timeout=120).json()
        assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        assert again["draftwise"]["mean_accepted_length"] > 4, again["draftwise"]
    text = httpx.get(f"{replicas}/metrics", timeout=10).text
    assert len(per_replica(text, "vllm:request_success_total")) == 2  # both report (which served what is Ray's choice)


def test_sixteen_concurrent_requests_spread_over_both_replicas(replicas):
    results: list[int] = []

    def one(i: int) -> None:
        code, _ = chat(replicas, f"Count from {i} to {i + 5}.", max_tokens=12)
        results.append(code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [200] * 16

    def both_served() -> bool:
        served = per_replica(httpx.get(f"{replicas}/metrics", timeout=10).text, "vllm:request_success_total")
        return len([v for v in served.values() if v > 0]) == 2

    wait_until(both_served, 30)
    text = httpx.get(f"{replicas}/metrics", timeout=10).text
    summed = metric(text, "vllm:request_success_total")
    assert summed >= 16 and summed == metric(text, "vllm:request_success_total", replica=True)


def test_disconnect_mid_stream_frees_the_row(replicas):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a very long story."}],
            "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{replicas}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    wait_until(lambda: metric(httpx.get(f"{replicas}/metrics", timeout=10).text,
                              "vllm:num_requests_running") == 0, 30)
    text = httpx.get(f"{replicas}/metrics", timeout=10).text
    assert metric(text, "vllm:generation_tokens_total") > 0


def test_bad_input_gets_the_same_error_envelope(single, replicas):
    for body in ({"model": MODEL, "prompt": "x", "temperature": -1},
                 {"model": "other-model", "prompt": "x"},
                 {"model": MODEL, "prompt": "x", "max_tokens": "many"}):
        want = httpx.post(f"{single}/v1/completions", json=body, timeout=30)
        got = httpx.post(f"{replicas}/v1/completions", json=body, timeout=30)
        assert got.status_code == want.status_code and 400 <= got.status_code < 500
        assert got.json()["error"]["type"] == want.json()["error"]["type"]
        assert got.json()["error"]["param"] == want.json()["error"]["param"]


def test_a_killed_replica_is_replaced_and_the_service_keeps_answering(replicas):
    ray = _ray()
    from ray import serve

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    assert len(names) == 2
    in_flight: list[int] = []  # long requests running while the replica dies: an answer or a 5xx, never a hang

    def long_request() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to a thousand."}],
                "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        try:
            in_flight.append(httpx.post(f"{replicas}/v1/chat/completions", json=body, timeout=90).status_code)
        except httpx.HTTPError:
            in_flight.append(-1)

    threads = [threading.Thread(target=long_request) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    for t in threads:
        t.join(timeout=100)
    assert not any(t.is_alive() for t in threads), "a request in flight on the dead replica hung"
    assert all(code == 200 or 500 <= code < 600 for code in in_flight), in_flight
    answered = 0
    deadline = time.monotonic() + 120
    while answered < 4 and time.monotonic() < deadline:  # clients retry a 5xx, as the openai client does
        try:
            code, _ = chat(replicas, "Say hi.", max_tokens=4)
        except httpx.HTTPError:
            code = 0
        answered += code == 200
        assert code in (0, 200) or code >= 500
    assert answered == 4

    def two_running() -> bool:
        app = serve.status().applications["draftwise"]
        return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values()) == 2

    wait_until(two_running, 120)


def test_replicas_need_the_ray_extra_and_a_reachable_cluster(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    (tmp_path / "ray").mkdir()  # a package named ray without serve: as if the extra were missing
    (tmp_path / "ray" / "__init__.py").write_text("")
    out = subprocess.run([sys.executable, "-m", "draftwise", "serve", "--replicas", "2", "--port", "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and 'pip install "draftwise[ray]"' in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    _ray()
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "draftwise", "serve", "--replicas", "2", "--ray-address",
                          "127.0.0.1:1", "--ray-timeout", "10", "--port", "0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--ray-address 127.0.0.1:1" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and time.monotonic() - start < 60


def test_merged_metrics_sum_replicas_but_take_the_shared_learner_from_its_freshest_copy():
    from draftwise.server.ray_serve import merge_metrics

    def exposition(requests: int, steps: int, loss: float) -> bytes:
        return (f"# HELP vllm:request_success_total Finished requests.\n# TYPE vllm:request_success_total counter\n"
                f"vllm:request_success_total {requests}.0\n"
                f"# HELP draftwise:adaptive_learner_steps adaptive speculator: learner_steps\n"
                f"# TYPE draftwise:adaptive_learner_steps gauge\ndraftwise:adaptive_learner_steps {steps}.0\n"
                f"# HELP draftwise:adaptive_learner_loss adaptive speculator: learner_loss\n"
                f"# TYPE draftwise:adaptive_learner_loss gauge\ndraftwise:adaptive_learner_loss {loss}\n").encode()

    text = merge_metrics({"r1": exposition(3, 40, 2.5), "r2": exposition(5, 42, 2.25)}).decode()
    lines = set(text.splitlines())
    assert "vllm:request_success_total 8.0" in lines  # a per-replica quantity: summed
    assert "draftwise:adaptive_learner_steps 42.0" in lines  # one learner: r2's copy is the fresher
    assert "draftwise:adaptive_learner_loss 2.25" in lines
    assert 'draftwise:adaptive_learner_steps{replica="r1"} 40.0' in lines
