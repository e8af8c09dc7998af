"""The generation benchmark on the tiny shape on CPU: the report's format, seeded sampling repeating, the
kernel count, the original runtime's row, and nothing written without --json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dia2_worker import bench
from dia2_worker.engine import GenerationRequest

from conftest import needs_compiler

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
    path = directory / "report.json"
    report = bench.main(["--device", "cpu", "--frames", str(FRAMES), "--json", str(path), *args])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    return report


@pytest.fixture(scope="module")
def modes_report(tmp_path_factory, one_thread) -> dict:
    return run_bench(tmp_path_factory.mktemp("modes"), "--modes", "eager-fp32", *one_thread)


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory, one_thread) -> dict:
    return run_bench(tmp_path_factory.mktemp("sweep"), "--concurrency", "1,2", *one_thread)


@pytest.fixture(scope="module")
def kernels_report(tmp_path_factory, one_thread) -> dict:
    return run_bench(tmp_path_factory.mktemp("kernels"), "--kernels", "--no-compile", "--batch", "1,64", *one_thread)


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
    assert modes_report["shape"] == "tiny" and modes_report["frames"] == FRAMES  # tiny: the CPU's default
    assert modes_report["streams_realtime"] is None
    machine = modes_report["machine"]
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == 1 and "git_commit" in machine
    (entry,) = modes_report["results"]
    check_entry(entry, "eager-fp32", 1)
    split = entry["split_ms"]
    assert set(split) == {"step", "backbone", "depformer", "sampling"}
    assert all(math.isfinite(value) for value in split.values()) and split["backbone"] > 0 < split["depformer"]
    assert entry["checks"] == {"baseline": None, "greedy_matches_baseline": None, "sampled_matches_baseline": None,
                               "sampling_repeats": True}


def test_concurrency_report(sweep_report):
    results = sweep_report["results"]
    assert [(r["mode"], r["batch"]) for r in results] == [("eager-fp32", 1), ("eager-fp32", 2)]
    for entry in results:
        check_entry(entry, "eager-fp32", entry["batch"])
        assert entry["split_ms"] is None and entry["checks"] is None
    realtime = [r["batch"] for r in results if r["realtime"]]
    assert sweep_report["streams_realtime"] == (max(realtime) if realtime else 0)


def test_kernel_count_by_region_does_not_grow_with_the_batch(kernels_report):
    from dia2_worker.kernels import REGIONS

    one, many = kernels_report["results"]
    assert (one["batch"], many["batch"]) == (1, 64)
    for entry in (one, many):
        assert (entry["device"], entry["shape"], entry["dtype"]) == ("cpu", "tiny", "bfloat16")
        assert set(entry["kernels_by_region"]) == set(REGIONS) and all(entry["kernels_by_region"].values())
        assert entry["kernels_per_frame"] == sum(entry["kernels_by_region"].values())
        assert entry["host_syncs_per_frame"] == 0
    assert one["kernels_by_region"] == many["kernels_by_region"]


def test_the_operator_counter_counts_leaf_kernels_only():
    """Views and allocations are free, a fused function is one kernel, a host read is a sync."""
    import torch.nn.functional as F

    from dia2_worker.kernels import count_operators

    x = torch.randn(4, 8)
    with count_operators() as counter:
        y = x.view(2, 16).t()[0]  # views: nothing
        torch.empty(3)
        z = F.rms_norm(x, (8,)) * 2 + 1  # one fused norm, a mul, an add
        F.scaled_dot_product_attention(x.view(1, 1, 4, 8), x.view(1, 1, 4, 8), x.view(1, 1, 4, 8))
        float(z.sum())  # a kernel and a host sync
    assert sum(counter.counts.values()) == 5 and dict(counter.host_syncs) == {"_local_scalar_dense": 1}
    assert set(counter.counts) == {"sampling"} and y.shape == (2,)


@needs_compiler
def test_the_profiled_counter_counts_compiled_kernels_by_region():
    """Compiled code on the CPU: each generated kernel and each operator the compiled code calls is one kernel,
    charged to the region function running it (found in Dynamo's rewritten copy of its code too)."""
    import torch._inductor.config
    import torch.nn.functional as F

    from dia2_worker.kernels import count_profiled_kernels
    from dia2_worker.mimi.streaming import StreamingDecoder

    weight = torch.randn(8, 8)

    def as_decode_step(self, codes, active=None):  # a region's code: StreamingDecoder.decode_step's
        return (F.linear(codes, weight).relu() * 2 + 1).sum(-1)  # a matrix product, then one fused kernel

    region_code = StreamingDecoder.decode_step.__code__
    as_decode_step.__code__ = as_decode_step.__code__.replace(
        co_filename=region_code.co_filename, co_firstlineno=region_code.co_firstlineno, co_name=region_code.co_name)
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        fused = torch.compile(as_decode_step, fullgraph=True)
        x = torch.randn(4, 8)
        fused(None, x)
        counts = count_profiled_kernels(lambda: (fused(None, x), x.view(2, 16).t().clone()), torch.device("cpu"),
                                        outside="step")
    assert dict(counts) == {"codec decode": 2, "step": 1}  # mm + the fused tail; the clone (the view is free)


def test_nothing_is_written_without_json(tmp_path, monkeypatch, one_thread):
    results = bench.ROOT / "bench" / "results"
    before = sorted(results.iterdir())
    monkeypatch.chdir(tmp_path)
    report = bench.main(["--device", "cpu", "--kernels", *one_thread])
    assert report["results"][0]["shape"] == "tiny"
    assert sorted(results.iterdir()) == before and not list(tmp_path.iterdir())


def test_original_runtime_row(tmp_path, one_thread):
    """The original runtime on the same checkpoint, greedy, beside ours: same tokens, its numbers recorded."""
    src = bench.DEFAULT_ORIGINAL_SRC
    if not bench.original_available(src):
        pytest.skip(f"the original Dia2 runtime is not at {src}")
    (entry,) = run_bench(tmp_path, "--modes", "original", *one_thread)["results"]
    assert entry["mode"] == "original" and entry["dtype"] == "float32"
    assert entry["original_options"] == {"use_cuda_graph": False, "use_torch_compile": False}
    assert entry["checks"] == {"greedy_matches_original": True}
    assert entry["frames"] > 20 and entry["ms_per_frame"] > 0 and entry["kernels_per_frame"] > 100
    assert entry["ours"]["mode"] == "eager-fp32" and entry["ours"]["kernels_per_frame"] > 100


def test_compared_tokens_are_real_draws(engine):
    """The checks compare something: tokens are in the audio vocabulary, greedy differs from sampled, and a
    seeded generation repeats."""
    reqs, clock, steps = bench.requests(engine, seed=3), bench.Clock(engine.device), 6
    runner = bench.new_runner(engine, bench.MODES["eager-fp32"], 1)
    drawn = {key: bench.tokens(runner, engine.prepare(request), steps, clock) for key, request in reqs.items()}
    assert torch.equal(bench.tokens(runner, engine.prepare(reqs["sampled"]), steps, clock), drawn["sampled"])
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
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--modes", "original", "--original-src", "/nonexistent"])
    with pytest.raises(ValueError, match="CUDA"):
        bench.run("tiny", "cpu", ["graph"], frames=1)
