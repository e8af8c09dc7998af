"""`python -m dia2_worker.serve [--host H] [--port N]`: the OpenAI-compatible speech server, for RunPod
load-balancing endpoints (the image runs it with SERVE_MODE=http).

It listens at once, so /ping can answer 204 while the model loads and warms (on the worker's loading
thread, exactly as the queue worker loads), 200 once ready and 503 if loading failed. RunPod's load
balancer sends requests to PORT and health checks to PORT_HEALTH; when they differ, /ping is served on both.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace

from .env import WorkerConfigError

log = logging.getLogger("dia2_worker.serve")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dia2_worker.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="API port (default: env PORT, else 8000; 0 picks a free one)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.port is not None:
        env["PORT"] = str(args.port)
        env.setdefault("PORT_HEALTH", str(args.port))
    try:
        run(args.host, env)
    except WorkerConfigError as exc:
        if os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(host: str, env: dict[str, str]) -> None:
    from .jobs import WorkerLimits
    from .speech_api import ServerSettings, ServerState, create_app, load_voices
    from .worker import start_loading

    settings = ServerSettings.from_env(env)
    state = ServerState(voices=load_voices(settings.voices_dir, WorkerLimits.from_env(env)))
    sockets = [_listen(host, settings.port)]
    if settings.health_port != settings.port:
        sockets.append(_listen(host, settings.health_port))
    ports = [sock.getsockname()[1] for sock in sockets]
    settings = replace(settings, port=ports[0], health_port=ports[-1])
    loading = start_loading(env)
    threading.Thread(target=_await_loading, args=(loading, state), name="dia2-ready", daemon=True).start()

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(state, settings), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    log.info("listening on http://%s:%d (health: %d)", host, ports[0], ports[-1])
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler it found: a
    # platform stopping the worker is a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    asyncio.run(server.serve(sockets=sockets))


def _exit_cleanly(signum: int, frame) -> None:
    raise SystemExit(0)


def _listen(host: str, port: int) -> socket.socket:
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    reuse_port=False)
    except OSError as exc:
        raise WorkerConfigError(f"PORT: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _await_loading(loading, state) -> None:
    """Publish the loaded service (or why loading failed) to what /ping and the routes read."""
    from .checkpoint import read_manifest

    try:
        service = loading.result()
        repo = ((read_manifest(service.settings.model_dir) or {}).get("model") or {}).get("repo")
        state.model_id = repo or service.settings.model_dir.name
        state.service = service
    except BaseException as exc:
        log.error("loading failed: %s", exc, exc_info=not isinstance(exc, WorkerConfigError))
        state.failure = str(exc) or type(exc).__name__


if __name__ == "__main__":
    main()
