"""The generation benchmark on the tiny shape on CPU: the report's format, and the execution modes drawing
identical tokens (the host-sync reference path against the plain eager one, greedy and seeded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dia2_worker import bench
from dia2_worker.engine import GenerationRequest

FRAMES = 8
NUMBERS = ("ms_per_frame_p50", "ms_per_frame_p90", "ms_per_frame_mean", "codec_ms_per_frame", "rtf", "ttfa_ms",
           "audio_s_per_wall_s")


@pytest.fixture(scope="module")
def one_thread():
    """`--threads 1` sets torch's threads for the process: put them back for the other test files."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def run_bench(directory: Path, *args: str) -> dict:
    path = bench.main(["--shape", "tiny", "--device", "cpu", "--frames", str(FRAMES), "--json",
                       str(directory / "report.json"), *args])
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def modes_report(tmp_path_factory, one_thread) -> dict:
    return run_bench(tmp_path_factory.mktemp("modes"), *one_thread)


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory, one_thread) -> dict:
    return run_bench(tmp_path_factory.mktemp("sweep"), "--concurrency", "1,2", *one_thread)


@pytest.fixture(scope="module")
def engine():
    return bench.build_engine("tiny", torch.device("cpu"), torch.float32, seed=0)


def check_entry(entry: dict, mode: str, batch: int) -> None:
    assert (entry["device"], entry["shape"], entry["mode"], entry["dtype"]) == ("cpu", "tiny", mode, "float32")
    assert (entry["batch"], entry["frames"]) == (batch, FRAMES)
    for key in NUMBERS:
        assert isinstance(entry[key], float) and math.isfinite(entry[key]) and entry[key] > 0, key
    assert entry["ms_per_frame_p50"] <= entry["ms_per_frame_p90"]
    assert entry["peak_mem_gb"] is None  # CPU
    assert isinstance(entry["realtime"], bool) and entry["codec_graphed"] is False


def test_modes_report(modes_report):
    assert modes_report["shape"] == "tiny" and modes_report["frames"] == FRAMES
    assert modes_report["streams_realtime"] is None
    machine = modes_report["machine"]
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == 1 and "git_commit" in machine
    results = modes_report["results"]
    assert [r["mode"] for r in results] == ["reference-like", "eager-fp32"]  # the CPU default
    for entry in results:
        check_entry(entry, entry["mode"], 1)
        split = entry["split_ms"]
        assert set(split) == {"step", "backbone", "depformer", "sampling"}
        assert all(math.isfinite(value) for value in split.values()) and split["backbone"] > 0 < split["depformer"]


def test_host_sync_and_eager_paths_draw_the_same_tokens(modes_report):
    reference, eager = (r["checks"] for r in modes_report["results"])
    assert reference == {"baseline": None, "greedy_matches_baseline": None, "sampled_matches_baseline": None,
                         "sampling_repeats": True}
    assert eager == {"baseline": "reference-like", "greedy_matches_baseline": True,
                     "sampled_matches_baseline": True, "sampling_repeats": True}


def test_concurrency_report(sweep_report):
    results = sweep_report["results"]
    assert [(r["mode"], r["batch"]) for r in results] == [("eager-fp32", 1), ("eager-fp32", 2)]
    for entry in results:
        check_entry(entry, "eager-fp32", entry["batch"])
        assert entry["split_ms"] is None and entry["checks"] is None
    realtime = [r["batch"] for r in results if r["realtime"]]
    assert sweep_report["streams_realtime"] == (max(realtime) if realtime else 0)


def test_default_json_path_names_device_date_and_shape(modes_report, sweep_report):
    date = modes_report["date"][:10]
    assert bench.default_json_path(modes_report).name == f"bench-cpu-{date}-tiny.json"
    assert bench.default_json_path(sweep_report).name == f"bench-cpu-{sweep_report['date'][:10]}-tiny-concurrency.json"
    assert bench.default_json_path(modes_report).parent == bench.RESULTS_DIR


def test_compared_tokens_are_real_draws(engine):
    """The checks compare something: tokens are in the audio vocabulary, and greedy differs from sampled."""
    reqs, clock, steps = bench.requests(engine, seed=3), bench.Clock(engine.device), 6
    runner = bench.new_runner(engine, bench.MODES["reference-like"], 1)
    drawn = {key: bench.tokens(runner, engine.prepare(request), steps, clock) for key, request in reqs.items()}
    eager = bench.new_runner(engine, bench.MODES["eager-fp32"], 1)
    for key, request in reqs.items():
        assert torch.equal(bench.tokens(eager, engine.prepare(request), steps, clock), drawn[key]), key
    for tokens in drawn.values():
        assert tokens.shape == (engine.config.num_codebooks, steps)
        assert tokens.min() >= 0 and tokens.max() < engine.config.data.audio_vocab_size
    assert not torch.equal(drawn["greedy"], drawn["sampled"])


def test_script_fills_the_context(engine):
    script = bench.longest_script(engine)
    engine.check(GenerationRequest(script))
    with pytest.raises(ValueError):
        engine.check(GenerationRequest(script + " " + bench.SCRIPT))


def test_graph_mode_needs_cuda():
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--modes", "graph"])
    with pytest.raises(ValueError, match="CUDA"):
        bench.run("tiny", "cpu", ["graph"], frames=1)
