"""RunPod entry point: `python -u handler.py`.

The model is loaded and warmed once per container, on a background thread started before the RunPod
SDK is imported (the SDK's import alone takes about a second); jobs are parsed, validated and run by
`dia2_worker` (see worker.py and runner.py). With DIA2_STARTUP_REPORT=path the process instead times
one job and writes its start-up phases there (python -m dia2_worker.coldstart drives this).
With SERVE_MODE=http the process is the OpenAI-compatible speech server instead (python -m dia2_worker.serve),
for RunPod load-balancing endpoints; its web stack is imported only then.
"""

import os
import sys

from dia2_worker.timing import PHASES

with PHASES.phase("import dia2_worker.worker"):
    from dia2_worker import cli
    from dia2_worker.worker import start_loading, use_sdk_logging

HELP = """usage: python -u handler.py [--rp_serve_api [--rp_api_host HOST] [--rp_api_port PORT]]
                         [--test_input JSON]

The Dia2 RunPod worker. Without arguments it serves jobs from the RunPod platform; the RunPod SDK's
flags run it locally instead: --rp_serve_api starts the SDK's local API server (default
http://localhost:8000), --test_input '{"input": {...}}' runs one job and exits.

Settings come from environment variables (README.md lists them all): MODEL_DIR (the baked model,
default /models/dia2), DEVICE, DTYPE, SLOTS, MAX_CONCURRENCY, JOB_TIMEOUT_S, UPLOAD_TIMEOUT_S,
INLINE_AUDIO_MAX_BYTES, SPOOL_MAX_BYTES, LOG_LEVEL, the MAX_* job limits and the BUCKET_* storage.
SERVE_MODE=http runs the OpenAI-compatible speech server instead (python -m dia2_worker.serve --help)."""


def main() -> int:
    if {"-h", "--help"} & set(sys.argv[1:]):  # before anything loads
        print(HELP)
        return 0
    mode = os.environ.get("SERVE_MODE", "").strip().lower() or "queue"
    if mode == "http":
        from dia2_worker.serve import main as serve

        serve([])
        return 0
    if mode != "queue":
        print(f"handler.py: error: SERVE_MODE: must be queue (the default) or http, got {mode!r}", file=sys.stderr)
        return 2
    loading = start_loading()
    with PHASES.phase("import runpod"):
        import runpod

    try:
        service = loading.result()
    except cli.user_errors() as exc:
        if cli.debugging():
            raise
        print(f"handler.py: error: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("DIA2_STARTUP_REPORT"):
        service.write_startup_report(os.environ["DIA2_STARTUP_REPORT"])
        return 0
    use_sdk_logging()
    runpod.serverless.start({
        "handler": service.handle,
        "return_aggregate_stream": True,
        "concurrency_modifier": service.concurrency,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
