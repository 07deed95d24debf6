"""One learner for all Ray Serve replicas (server/ray_learner.py), with real Ray on this
machine: two replicas of the real smollm2-135m running the adaptive speculator send their
traffic to one learner actor, which trains on all of it and pushes its weights back to
both; answers stay the single plain server's, token for token."""

from __future__ import annotations

import threading

import httpx
import pytest

import test_ray_serve
from test_ray_serve import _ray, chat, deploy, per_replica, undeploy, wait_until

single = test_ray_serve.single  # the plain single-process server (a fixture), the reference

pytestmark = pytest.mark.real_model

ADAPTIVE = {"method": "adaptive", "num_speculative_tokens": 6, "parts": ["learner", "suffix"],
            "learner": {"min_tokens": 16, "swap_every": 2, "batch_size": 2, "max_len": 64, "train_share": 0}}
PROMPTS = [f"Write one sentence about the number {i}." for i in range(8)]


@pytest.fixture(scope="module")
def learning_replicas(single):
    yield deploy(ADAPTIVE, 180)
    undeploy()


def test_one_learner_learns_from_every_replica_and_every_replica_drafts_with_its_weights(single, learning_replicas):
    ray = _ray()
    from draftwise.server.ray_learner import LEARNER_NAME

    url = learning_replicas
    want = {}
    for p in PROMPTS:
        code, body = chat(single, p)
        assert code == 200
        want[p] = body["choices"][0]["message"]["content"]

    def a_round() -> None:  # all prompts at once, so both replicas get some
        got: dict[str, str] = {}

        def one(p: str) -> None:
            code, body = chat(url, p)
            got[p] = body["choices"][0]["message"]["content"] if code == 200 else f"HTTP {code}"

        threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert got == want  # lossless whatever weights each replica drafts with

    actor = ray.get_actor(LEARNER_NAME, namespace="draftwise")
    for _ in range(5):  # until both replicas have sent traffic (Ray picks the replica)
        a_round()
        wait_until(lambda: sum(ray.get(actor.stats.remote())["received"].values()) >= len(PROMPTS), 30)
        if len(ray.get(actor.stats.remote())["received"]) == 2:
            break
    stats = ray.get(actor.stats.remote())
    assert len(stats["received"]) == 2 and min(stats["received"].values()) > 0, stats
    wait_until(lambda: ray.get(actor.stats.remote())["version"] >= 1, 120)  # trained while the replicas idle

    def both_swapped() -> bool:  # a replica swaps the new weights in at its next engine step
        a_round()
        return len([v for v in per_replica(httpx.get(f"{url}/metrics", timeout=10).text,
                                           "draftwise:adaptive_swaps").values() if v > 0]) == 2

    wait_until(both_swapped, 240)
    stats = ray.get(actor.stats.remote())
    assert stats["error"] is None and stats["steps"] >= 2 and stats["buffer_tokens"] > 0
    text = httpx.get(f"{url}/metrics", timeout=10).text
    steps = per_replica(text, "draftwise:adaptive_learner_steps")
    assert len(steps) == 2 and min(steps.values()) >= 2  # both report the one learner's steps, not their own
    assert set(per_replica(text, "draftwise:adaptive_swaps")) == set(stats["received"])  # the same two replicas
