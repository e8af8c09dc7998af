"""RunPod entry point: `python -u handler.py`.

The model is loaded and warmed once per container, on a background thread started before the RunPod
SDK is imported (the SDK's import alone takes about a second); jobs are parsed, validated and run by
`dia2_worker` (see worker.py and runner.py). With DIA2_STARTUP_REPORT=path the process instead times
one job and writes its start-up phases there (python -m dia2_worker.coldstart drives this).
With SERVE_MODE=http the process is the OpenAI-compatible speech server instead (python -m dia2_worker.serve),
for RunPod load-balancing endpoints; its web stack is imported only then.
"""

import os

from dia2_worker.timing import PHASES

with PHASES.phase("import dia2_worker.worker"):
    from dia2_worker.worker import start_loading, use_sdk_logging


def main() -> None:
    mode = os.environ.get("SERVE_MODE", "").strip().lower() or "queue"
    if mode == "http":
        from dia2_worker.serve import main as serve

        serve([])
        return
    if mode != "queue":
        raise SystemExit(f"error: SERVE_MODE: must be queue (the default) or http, got {mode!r}")
    loading = start_loading()
    with PHASES.phase("import runpod"):
        import runpod

    service = loading.result()
    if os.environ.get("DIA2_STARTUP_REPORT"):
        service.write_startup_report(os.environ["DIA2_STARTUP_REPORT"])
        return
    use_sdk_logging()
    runpod.serverless.start({
        "handler": service.handle,
        "return_aggregate_stream": True,
        "concurrency_modifier": service.concurrency,
    })


if __name__ == "__main__":
    main()
