"""Scale-out on Ray Serve: several engine replicas behind one OpenAI-compatible endpoint.

`draftwise serve --replicas N` builds a Ray Serve application whose one deployment runs,
in every replica (a Ray actor, a process of its own), the very app the single-process
server runs (`build_app`: `create_app` over an `LLM`): continuous batching and
speculation inside each replica, Ray Serve's proxy in front spreading requests over them, and its autoscaler
adding or removing replicas on ongoing requests (`--min-replicas/--max-replicas`). So
everything the single server does holds per request: streaming, sampling options,
logprobs, the error envelope, the API key, the body cap, the queue limit (429, per
replica), a client disconnect cancelling its request (Ray cancels the replica's handler,
which aborts the engine request and frees its cache row), `/health`.

What spans replicas (what a speculator learns from traffic passes through the `Proposer`
hooks, never its internals: `share` once, then `take_shared` and `adopt` every
`PUSH_SECONDS`):
- the suffix cache's learned traffic: every replica's suffix cache (the `suffix` method,
  or the adaptive speculator's suffix part) sends its finished sequences to one
  `ReplicaHub` actor and takes the other replicas' from it; so a question answered by
  one replica is drafted from by all of them;
- the adaptive speculator's online learning: one `SharedLearner` actor trains one head on
  every replica's traffic and pushes its weights back to all of them
  (server/ray_learner.py), so N replicas learn from N times the traffic;
- `/metrics`: each replica pushes its own exposition to the same hub every
  `PUSH_SECONDS`; a scrape, whichever replica answers it, returns every series summed
  over the replicas (but the shared learner's numbers, which every replica copies: those
  of the freshest copy), and each replica's own copy labelled `replica="<id>"`.
- weights: replicas load from the shared cache (`~/.cache/draftwise`); the driver pulls a
  bundled model once before any replica starts, so replicas never download or convert.

Ray is an optional extra (`pip install "draftwise[ray]"`); nothing imports it unless
`--replicas` is given.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import asdict

from draftwise.errors import BadInput
from draftwise.server.settings import ServerSettings

HUB_NAME = "draftwise-replicas"
APP_NAME = "draftwise"
PUSH_SECONDS = 1.0
STALE_SECONDS = 30.0  # a replica that stopped pushing this long ago (dead, replaced) drops out


def require_ray():
    try:
        import ray

        importlib.import_module("ray.serve")  # the extra installs Serve, not just ray
    except ImportError as e:  # not installed, or installed without Serve
        raise BadInput(f"--replicas needs the 'ray' extra ({e.name or 'ray.serve'} is missing): "
                       f"pip install \"draftwise[ray]\"") from None
    return ray


def start_ray(address: str | None, timeout: float = 30.0, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or start a local Ray instance, loopback only). An
    address that does not accept a connection within `timeout` seconds is refused before
    Ray is touched (Ray itself would retry for minutes). Ray must start on the main thread."""
    ray = require_ray()
    if ray.is_initialized():
        return
    if address and address != "auto":
        _probe(address, timeout)
    kwargs = {"address": address} if address else {"num_cpus": num_cpus, "_node_ip_address": "127.0.0.1"}
    try:
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported as one line
        where = f"--ray-address {address}" if address else "starting a local Ray instance"
        raise BadInput(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _probe(address: str, timeout: float) -> None:
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--ray-address {address}: expected HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise BadInput(f"--ray-address {address}: no Ray cluster answered within {timeout:.0f} s "
                       f"({e.strerror or type(e).__name__})") from None


# --- metrics across replicas -------------------------------------------------------------------


def replica_hub():
    """The named actor the replicas share (created by the first one to ask): each replica's
    latest metrics, and the finished sequences of every replica's suffix cache."""
    ray = require_ray()

    @ray.remote(num_cpus=0)
    class ReplicaHub:
        def __init__(self, keep: int = 10000) -> None:
            self.texts: dict[str, tuple[float, bytes]] = {}  # replica -> (when, its exposition)
            self.log: list[tuple[str, list[int]]] = []  # (replica, tokens), in arrival order
            self.dropped = 0  # entries before log[0] (the log keeps the newest `keep`)
            self.keep = keep

        def put(self, replica: str, text: bytes) -> None:
            self.texts[replica] = (time.time(), text)

        def get(self) -> dict[str, bytes]:
            now = time.time()
            return {r: t for r, (at, t) in self.texts.items() if now - at < STALE_SECONDS}

        def exchange(self, replica: str, sequences: list[list[int]], since: int) -> tuple[list[list[int]], int]:
            """Add this replica's sequences; return the others' that arrived after position `since`."""
            self.log += [(replica, seq) for seq in sequences]
            if len(self.log) > self.keep:
                cut = len(self.log) - self.keep
                self.log, self.dropped = self.log[cut:], self.dropped + cut
            start = max(0, since - self.dropped)
            theirs = [seq for who, seq in self.log[start:] if who != replica]
            return theirs, self.dropped + len(self.log)

    return ReplicaHub.options(name=HUB_NAME, namespace="draftwise", get_if_exists=True,
                              lifetime="detached").remote()


# series that describe the one shared learner (server/ray_learner.py): every replica reports
# its latest copy of them, so the merged line is the freshest copy (most learner steps), not a sum
LEARNER_STEPS = "draftwise:adaptive_learner_steps"
ONE_LEARNER = (LEARNER_STEPS, "draftwise:adaptive_learner_loss", "draftwise:adaptive_learner_buffer_tokens")


def merge_metrics(texts: dict[str, bytes]) -> bytes:
    """Every series summed over the replicas (the shared learner's: its freshest copy), then
    each replica's own copy with a `replica` label."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    totals: dict[tuple[str, str, tuple], float] = {}
    per_replica: list[tuple[str, str, dict, float]] = []
    parsed = {replica: list(text_string_to_metric_families(text.decode())) for replica, text in texts.items()}
    steps = {replica: s.value for replica, fams in parsed.items() for fam in fams for s in fam.samples
             if s.name == LEARNER_STEPS}
    freshest = max(sorted(steps), key=lambda r: steps[r]) if steps else None
    for replica, fams in sorted(parsed.items()):
        for fam in fams:
            families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
            for s in fam.samples:
                if s.name.endswith("_created"):  # creation timestamps: not a quantity to sum
                    continue
                key = (fam.name, s.name, tuple(sorted(s.labels.items())))
                if s.name not in ONE_LEARNER:
                    totals[key] = totals.get(key, 0.0) + s.value
                elif replica == freshest:
                    totals[key] = s.value
                per_replica.append((fam.name, s.name, {**s.labels, "replica": replica}, s.value))
    for (fam, name, labels), value in totals.items():
        families[fam].add_sample(name, dict(labels), value)
    for fam, name, labels, value in per_replica:
        families[fam].add_sample(name, labels, value)

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


# --- the application ---------------------------------------------------------------------------


def build_replica_app(settings: ServerSettings, num_gpus: float = 0.0):
    """In a replica: the single server's app (`build_app`), its metrics and suffix traffic shared."""
    import ray
    from fastapi import Response
    from prometheus_client import CONTENT_TYPE_LATEST

    from draftwise.server.app import build_app

    app = build_app(settings, progress=False)
    state = app.state.draftwise
    replica = ray.get_runtime_context().get_actor_id()[:12]
    hub = replica_hub()
    proposer = state.llm.engine.proposer
    sharing = proposer.share() if proposer is not None else None  # what its method learns from traffic
    seen = 0  # position in the traffic hub's log already taken
    link = None
    if sharing is not None and sharing.learner is not None:  # the adaptive speculator: one learner for all replicas
        from draftwise.server.ray_learner import LearnerLink

        link = LearnerLink(proposer, sharing.learner, state.llm.engine, settings, replica, num_gpus)

    def push_forever() -> None:
        nonlocal seen
        while True:
            learned = proposer.take_shared() if sharing is not None else None
            try:
                hub.put.remote(replica, state.metrics.render())  # fire and forget
                if learned is not None and sharing.sequences:
                    theirs, seen = ray.get(hub.exchange.remote(replica, learned.sequences, seen), timeout=30)
                    proposer.adopt(sequences=theirs)
            except Exception:  # noqa: BLE001 - the hubs are best effort; serving goes on
                pass
            try:
                if link is not None:
                    link.sync(learned.examples)
            except Exception as e:  # noqa: BLE001 - drafting goes on with the weights it has
                logging.getLogger("draftwise.adaptive").warning("adaptive: shared learner unreachable: %s", e)
            time.sleep(PUSH_SECONDS)

    threading.Thread(target=push_forever, name="draftwise-replica-sync", daemon=True).start()

    # /metrics answers for every replica (replace the single server's route)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/metrics"]

    @app.get("/metrics")
    async def metrics() -> Response:
        texts = await hub.get.remote()
        texts[replica] = state.metrics.render()  # this replica's freshest numbers
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE_LATEST)

    return app


def build_application(settings: ServerSettings, *, replicas: int = 2, min_replicas: int | None = None,
                      max_replicas: int | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0):
    """The Ray Serve application: one deployment, `replicas` replicas (or autoscaled)."""
    require_ray()
    from ray import serve

    data = asdict(settings)

    def builder():
        return build_replica_app(ServerSettings(**data), num_gpus)

    options: dict = {"name": APP_NAME, "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
                     "max_ongoing_requests": settings.max_batch_size + settings.max_queue + 1,
                     "graceful_shutdown_timeout_s": settings.shutdown_timeout, "health_check_period_s": 2,
                     "health_check_timeout_s": 30}
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        options["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": max(lo, min(replicas, max_replicas or replicas)),
                                         "max_replicas": max_replicas if max_replicas is not None else max(lo, replicas),
                                         "target_ongoing_requests": max(1, settings.max_batch_size)}
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress(builder)(), **options)
    return deployment.bind()


def run_application(app, host: str, port: int, blocking: bool = True):
    """Start Serve's HTTP proxy on host:port and deploy `app`; with `blocking`, serve until
    SIGTERM / Ctrl-C, then shut Serve down (replicas drain for `shutdown_timeout`)."""
    require_ray()
    import signal

    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    drop_shared_actors()  # a previous deployment's (detached: they outlive it on a cluster)
    handle = serve.run(app, name=APP_NAME, route_prefix="/")
    if not blocking:
        return handle
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    drop_shared_actors()
    return None


def drop_shared_actors() -> None:
    """Kill the replicas' shared actors (hub, learner), if any."""
    import ray

    from draftwise.server.ray_learner import LEARNER_NAME

    for name in (HUB_NAME, LEARNER_NAME):
        try:
            ray.kill(ray.get_actor(name, namespace="draftwise"))
        except ValueError:  # none by that name
            pass
