"""RunPod entry point: `python -u handler.py`.

The model is loaded and warmed once per container, on a background thread started before the RunPod
SDK is imported (the SDK's import alone takes about a second); jobs are parsed, validated and run by
`dia2_worker` (see worker.py and runner.py).
"""

import os

from dia2_worker.worker import start_loading, use_sdk_logging


def main() -> None:
    loading = start_loading()
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")  # the SDK's default, DEBUG, logs every yielded chunk
    import runpod

    service = loading.result()
    use_sdk_logging()
    runpod.serverless.start({
        "handler": service.handle,
        "return_aggregate_stream": True,
        "concurrency_modifier": service.concurrency,
    })


if __name__ == "__main__":
    main()
