"""`draftwise serve`: an OpenAI-compatible HTTP server (needs the `server` extra)."""

from __future__ import annotations

import argparse
import os

from draftwise.commands.generate import (DEFAULT_MODEL, add_model_args, add_speculation_args,
                                        speculative_config_from_args)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /tokenize and "
                    "/detokenize, with continuous batching and optional speculation. SIGTERM drains: new requests "
                    "get 503, in-flight ones get --shutdown-timeout seconds to finish.",
    )
    p.add_argument("model_ref", nargs="?", default=None, metavar="MODEL",
                   help="the model, as `vllm serve MODEL` takes it (the same as --model)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled name, .gguf file or HF folder (default {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $DRAFTWISE_API_KEY)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (cache rows, default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429 (default 64)")
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                   help="request body cap, 413 above (default 4 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive, 408 after (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    r = p.add_argument_group("scale-out on Ray Serve (needs the ray extra: pip install \"draftwise[ray]\")")
    r.add_argument("--replicas", type=int, default=None,
                   help="engine replicas behind the one endpoint, each a process with its own engine, batching "
                        "and speculation (default: one engine in this process, no Ray)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscale on ongoing requests, down to this many")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscale on ongoing requests, up to this many")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. ray://head:10001 or head:6379; default: start Ray here)")
    r.add_argument("--ray-timeout", type=float, default=30.0,
                   help="seconds to wait for the Ray cluster at --ray-address (default 30)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    r.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPUs per replica (num_gpus; default 0; use 1 with --device cuda)")
    add_model_args(p)
    add_speculation_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from draftwise.errors import BadInput

    try:
        from draftwise.server import serve
        from draftwise.server.app import build_app
        from draftwise.server.settings import ServerSettings
    except ModuleNotFoundError as e:
        raise BadInput(f"the server needs the 'server' extra ({e.name} is missing): "
                       "pip install 'draftwise[server]'") from None
    if args.model_ref is not None:
        if args.model not in (DEFAULT_MODEL, args.model_ref):
            raise BadInput(f"two models given: {args.model_ref} and --model {args.model}; give one")
        args.model = args.model_ref
    for name in ("max_batch_size", "max_queue", "max_request_bytes"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise BadInput(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.port < 65536:
        raise BadInput(f"--port {args.port} is not a port number (0-65535)")
    for name in ("shutdown_timeout", "header_timeout", "body_timeout"):
        if not getattr(args, name) >= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0 seconds")
    spec = speculative_config_from_args(args)
    scaled = args.min_replicas is not None or args.max_replicas is not None or args.ray_address is not None
    if args.replicas is not None and args.replicas < 1:
        raise BadInput("--replicas must be at least 1")
    settings = ServerSettings(
        model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
        revision=args.revision, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
        speculative_config=spec.model_dump(exclude_none=True) if spec else None,
        served_model_name=args.served_model_name or args.model,
        api_key=args.api_key or os.environ.get("DRAFTWISE_API_KEY"), max_queue=args.max_queue,
        max_body_bytes=args.max_request_bytes, shutdown_timeout=args.shutdown_timeout, body_timeout=args.body_timeout)
    if (args.replicas or 1) > 1 or scaled:
        return run_replicas(args, spec, settings)
    app = build_app(settings)
    print(f"serving {args.model} ({describe(app.state.draftwise.serving())}) on http://{args.host}:{args.port}/v1",
          flush=True)
    serve(app, args.host, args.port, args.log_level, args.header_timeout)
    return 0


def describe(serving: dict[str, str]) -> str:
    """'w4a8-all, bf16, cpu, suffix': what the start line says is served."""
    method = serving["speculator"]
    return ", ".join([serving["quantization"] if serving["quantization"] != "none" else "not quantized",
                      serving["dtype"], serving["device"], "plain decoding" if method == "none" else method])


def run_replicas(args: argparse.Namespace, spec, settings) -> int:
    """`--replicas N` (or autoscaling, or a cluster): the same API served by Ray Serve replicas."""
    from draftwise.errors import BadInput
    from draftwise.server.ray_serve import build_application, require_ray, run_application, start_ray

    require_ray()  # before anything slow: one line naming the extra when it is missing
    lo, hi = args.min_replicas, args.max_replicas
    if (lo is not None and lo < 0) or (hi is not None and hi < 1) or (lo is not None and hi is not None and lo > hi):
        raise BadInput("--min-replicas must be >= 0 and <= --max-replicas, and --max-replicas >= 1")
    _pull_once(args.model, args.revision)
    start_ray(args.ray_address, args.ray_timeout)
    app = build_application(settings, replicas=args.replicas or 1, min_replicas=lo, max_replicas=hi,
                            num_cpus=args.cpus_per_replica, num_gpus=args.gpus_per_replica)
    serving = describe({"quantization": settings.quantization, "dtype": settings.dtype,
                        "device": settings.device or "default device", "speculator": spec.method if spec else "none"})
    print(f"serving {args.model} ({serving}) on http://{args.host}:{args.port}/v1 with Ray Serve "
          f"({args.replicas or lo} replica(s))", flush=True)
    run_application(app, args.host, args.port)
    return 0


def _pull_once(model: str, revision: str | None) -> None:
    """Fetch and convert the weights once here (`load_weights` fills the download and the
    conversion caches), so that replicas only read the shared cache."""
    import gc

    from draftwise.models.loading import load_weights

    load_weights(model, revision=revision)
    gc.collect()  # the driver does not keep the tensors
