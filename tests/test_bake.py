"""bake_weights.py: the demo bake loads and generates offline; a Hub bake (through huggingface_hub, against a
loopback Hub) downloads only what it needs, records what it got, and converts every tensor exactly; corrupt,
missing and bad inputs fail with clear messages."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bake_weights
from dia2_worker.checkpoint import (CheckpointError, engine_shapes, load_published_weights, load_weights, read_manifest,
                                    safetensors_shapes)
from dia2_worker.config import Dia2Config
from dia2_worker.engine import Dia2Engine, GenerationParams, GenerationRequest
from dia2_worker.mimi import MimiCodec, MimiConfig
from dia2_worker.mimi.weights import codec_tensors
from hf_hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPO, MIMI_REPO = "nari-labs/Dia2-tiny", "kyutai/mimi-tiny"
MODEL_SHA, MIMI_SHA = "1d2c3b4a" * 5, "5e6f7a8b" * 5
TOKEN = "hf_loopback_test_token"
MODEL_DOWNLOADS = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json"}


def run_bake(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """bake_weights.py as the image build runs it: a fresh process, Hub settings only from `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    loopback = {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # a developer's proxy must not see these
    clean.update({**loopback, **env})
    return subprocess.run([sys.executable, str(ROOT / "bake_weights.py"), *args], cwd=ROOT, env=clean,
                          capture_output=True, text=True, timeout=120)


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def files_beside_manifest(directory: Path) -> list[str]:
    """What a bake's manifest must list: every file under it but the manifest."""
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(name for name in names if name != "manifest.json")


def assert_clean_failure(code: int, stderr: str, out: Path, *expected: str) -> None:
    """Exit 1, one clear message naming the problem, no traceback, and nothing left at or beside --out."""
    assert code == 1, stderr
    assert "Traceback" not in stderr
    for text in expected:
        assert text in stderr, stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_import_is_cheap():
    code = "import bake_weights, sys; print(sorted({'torch', 'huggingface_hub', 'safetensors'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------- --demo


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A --demo bake made with the Hub unreachable and offline mode on."""
    out = tmp_path_factory.mktemp("demo") / "dia2-demo"
    result = run_bake("--demo", "--out", str(out), env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    return out


def test_demo_bake_is_the_serving_layout(demo_dir):
    manifest = read_manifest(demo_dir)
    assert manifest is not None and manifest["dtype"] == "bfloat16"
    assert manifest["model"] == manifest["mimi"] == {"repo": None, "revision": None, "path": None}
    assert manifest["random"] == {"shape": "demo", "seed": 0}
    assert sorted(manifest["files"]) == files_beside_manifest(demo_dir)
    config = Dia2Config.load(demo_dir / "config.json")
    assert safetensors_shapes(demo_dir / "model.safetensors") == engine_shapes(config)
    assert {t.dtype for t in load_file(str(demo_dir / "model.safetensors")).values()} == {torch.bfloat16}
    codec = MimiCodec.skeleton(MimiConfig.load(demo_dir / "mimi" / "config.json"))
    mimi = load_file(str(demo_dir / "mimi" / "model.safetensors"))
    assert {n: tuple(t.shape) for n, t in mimi.items()} == {n: tuple(t.shape) for n, t in codec.state_dict().items()}
    assert {t.dtype for t in mimi.values()} == {torch.bfloat16}


def test_rebuilt_bakes_are_identical_in_bytes_and_metadata(demo_dir, tmp_path):
    """What keeps the image's weights layer digest across rebuilds: same files, bytes, modes and mtimes,
    wherever --out was."""
    again = tmp_path / "elsewhere" / "dia2"
    assert bake_weights.main(["--demo", "--out", str(again)]) == 0

    def listing(root: Path) -> dict[str, tuple]:
        return {p.relative_to(root).as_posix(): (p.is_dir() or p.read_bytes(), p.stat().st_mode, p.stat().st_mtime)
                for p in [root, *root.rglob("*")]}

    first, second = listing(demo_dir), listing(again)
    assert first == second
    fixed = int(os.environ.get("SOURCE_DATE_EPOCH") or bake_weights.FIXED_MTIME)
    assert {mtime for _, _, mtime in first.values()} == {fixed}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls run best on one thread; two spin-waiting threads stall for seconds on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_engine_loads_demo_bake_and_generates(demo_dir, one_thread):
    engine = Dia2Engine.load(demo_dir)
    result = engine.generate(GenerationRequest("[S1] Hello there.", GenerationParams(seed=1, max_frames=60)))
    assert result.tokens.shape[0] == engine.config.num_codebooks and result.tokens.shape[1] > 0
    assert result.waveform.numel() == result.tokens.shape[1] * engine.codec.frame_size
    assert torch.isfinite(result.waveform).all()


# ---------------------------------------------------------------------- --verify and worker-start checks


@pytest.fixture
def demo_copy(demo_dir, tmp_path) -> Path:
    return Path(shutil.copytree(demo_dir, tmp_path / "copy"))


def test_verify_passes_on_an_intact_bake(demo_copy, capsys):
    assert bake_weights.main(["--verify", str(demo_copy)]) == 0
    assert "12 files match" in capsys.readouterr().out  # 7, and 5 of the speech recognition model


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize("damage, file, worker_error, verify_error", [
    (_flip_a_byte, "model.safetensors", None, "model.safetensors: sha256"),
    (_truncate, "mimi/model.safetensors", "truncated", "truncated"),
    (Path.unlink, "tokenizer.json", "listed in manifest.json but missing", "listed in manifest.json but missing"),
])
def test_damaged_bake_is_caught(demo_copy, capsys, damage, file, worker_error, verify_error):
    damage(demo_copy / file)
    if worker_error is None:  # same size: only the hashes of --verify see it, the worker-start check cannot
        assert read_manifest(demo_copy) is not None
    else:
        with pytest.raises(CheckpointError, match=worker_error):
            read_manifest(demo_copy)
    assert bake_weights.main(["--verify", str(demo_copy)]) == 1
    err = capsys.readouterr().err
    assert file in err and verify_error in err and "Traceback" not in err


def test_verify_flags_unlisted_files_and_non_bakes(demo_copy, tiny_dir, capsys):
    (demo_copy / "mimi" / "extra.bin").write_bytes(b"x")
    assert bake_weights.main(["--verify", str(demo_copy)]) == 1
    assert "mimi/extra.bin: not listed in manifest.json" in capsys.readouterr().err
    assert bake_weights.main(["--verify", str(tiny_dir)]) == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_force_replaces_only_a_bake(demo_copy, tmp_path, capsys):
    assert bake_weights.main(["--demo", "--out", str(demo_copy)]) == 1
    assert "not empty; pass --force" in capsys.readouterr().err
    (demo_copy / "stale.txt").write_text("from an older bake")
    assert bake_weights.main(["--demo", "--out", str(demo_copy), "--force"]) == 0
    assert not (demo_copy / "stale.txt").exists()
    assert bake_weights.main(["--verify", str(demo_copy)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    other = tmp_path / "not-a-bake"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert bake_weights.main(["--demo", "--out", str(other), "--force"]) == 1
    assert "not a bake (no manifest.json)" in capsys.readouterr().err
    assert (other / "notes.txt").exists()


def test_usage_errors():
    for argv in (["--demo"], ["--demo", "--model", "x", "--out", "o"], ["--demo", "--revision", "v1", "--out", "o"]):
        with pytest.raises(SystemExit) as exit_info:
            bake_weights.parse_args(argv)
        assert exit_info.value.code == 2


# ---------------------------------------------------------------------- --model from a local directory


def test_local_published_dir(tiny_dir, tmp_path):
    out = tmp_path / "baked"
    assert bake_weights.main(["--model", str(tiny_dir), "--out", str(out), "--dtype", "float32"]) == 0
    manifest = manifest_of(out)
    assert manifest["model"] == {"repo": None, "revision": None, "path": str(tiny_dir.resolve())}
    assert manifest["mimi"] == {"repo": None, "revision": None, "path": str((tiny_dir / "mimi").resolve())}
    config = Dia2Config.load(out / "config.json")
    cpu = torch.device("cpu")
    baked = load_weights(out, config, cpu, torch.float32)
    published = load_published_weights(tiny_dir / "model.safetensors", config, cpu, torch.float32)
    assert baked.keys() == published.keys() and all(torch.equal(baked[n], published[n]) for n in baked)


def _without(name: str):
    return lambda directory: (directory / name).unlink()


def _wrong_tensors(directory: Path) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["transformer.extra.weight"] = tensors.pop("transformer.audio_embeds.3.weight")
    save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize("spoil, expected", [
    (_without("config.json"), "config.json: file not found"),
    (_without("model.safetensors"), "model.safetensors: weights file not found"),
    (_without("tokenizer.json"), "tokenizer.json not found"),
    (_wrong_tensors, "missing tensors: transformer.audio_embeds.3.weight | unexpected tensors: transformer.extra"),
    (lambda directory: (directory / "model.safetensors").write_bytes(b"not safetensors"),
     "model.safetensors is not a readable safetensors file"),
    (_without("mimi/model.safetensors"), "mimi/model.safetensors: weights file not found"),
], ids=["no-config", "no-weights", "no-tokenizer", "wrong-tensors", "not-safetensors", "no-mimi-weights"])
def test_bad_model_dir_fails_clearly(tiny_dir, tmp_path, capsys, spoil, expected):
    source = Path(shutil.copytree(tiny_dir, tmp_path / "source"))
    spoil(source)
    out = tmp_path / "baked"
    code = bake_weights.main(["--model", str(source), "--out", str(out)])
    assert_clean_failure(code, capsys.readouterr().err, out, str(source), expected)


def test_model_neither_dir_nor_repo_id(tmp_path, capsys):
    out = tmp_path / "baked"
    code = bake_weights.main(["--model", str(tmp_path / "no" / "such" / "dir"), "--out", str(out)])
    assert_clean_failure(code, capsys.readouterr().err, out, "neither a local directory nor a Hub repo id")


# ---------------------------------------------------------------------- --model from the Hub


@pytest.fixture(scope="module")
def hub(tiny_dir) -> Iterator[HubServer]:
    """The tiny checkpoint published as two private repos, as nari-labs and kyutai publish Dia2 and Mimi."""
    repos = {MODEL_REPO: (tiny_dir, MODEL_SHA), MIMI_REPO: (tiny_dir / "mimi", MIMI_SHA)}
    with HubServer(repos, token=TOKEN) as server:
        yield server


def hub_env(hub: HubServer, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), **({"HF_TOKEN": token} if token else {})}


@pytest.fixture(scope="module")
def hub_bake(hub, tmp_path_factory) -> Path:
    """A bake of the Hub repos (branch main), with the server's record of it from a clean start."""
    hub.requests.clear()
    hub.downloads.clear()
    work = tmp_path_factory.mktemp("hub")
    out = work / "baked"
    result = run_bake("--model", MODEL_REPO, "--mimi", MIMI_REPO, "--out", str(out), env=hub_env(hub, work / "hf"))
    assert result.returncode == 0, result.stderr
    (work / "stderr.txt").write_text(result.stderr)
    return out


def test_hub_bake_log_has_no_progress_bars_off_a_terminal(hub_bake):
    """An image build's log is not a terminal: progress is the bake's own timed lines, not redrawn bars."""
    log = (hub_bake.parent / "stderr.txt").read_text()
    assert "downloading config.json" in log and "it/s]" not in log and "%|" not in log


def test_hub_bake_downloads_only_the_needed_files_with_the_token(hub, hub_bake):
    assert sorted(hub.downloads) == sorted([(MODEL_REPO, name) for name in MODEL_DOWNLOADS]
                                           + [(MIMI_REPO, "config.json"), (MIMI_REPO, "model.safetensors")])
    repo_requests = [r for r in hub.requests if r.origin == "hub" and r.path.startswith(
        (f"/api/models/{MODEL_REPO}/", f"/api/models/{MIMI_REPO}/", f"/{MODEL_REPO}/", f"/{MIMI_REPO}/"))]
    assert {r.method for r in repo_requests} == {"GET", "HEAD"}
    assert {r.authorization for r in repo_requests} == {f"Bearer {TOKEN}"}
    cdn_requests = [r for r in hub.requests if r.origin == "cdn"]
    assert len(cdn_requests) == 2 and {r.authorization for r in cdn_requests} == {None}  # signed URLs: no token


def test_hub_bake_manifest_records_revisions_and_hashes(hub_bake, tiny_dir):
    manifest = manifest_of(hub_bake)
    assert manifest["layout_version"] == 1 and manifest["dtype"] == "bfloat16"
    assert manifest["model"] == {"repo": MODEL_REPO, "revision": MODEL_SHA, "path": None}
    assert manifest["mimi"] == {"repo": MIMI_REPO, "revision": MIMI_SHA, "path": None}
    assert manifest["bake"]["command"][:3] == ["bake_weights.py", "--model", MODEL_REPO]
    assert "--out" not in manifest["bake"]["command"]
    assert sorted(manifest["files"]) == files_beside_manifest(hub_bake)
    for name, entry in manifest["files"].items():
        data = (hub_bake / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "mimi/config.json"):
        assert (hub_bake / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert bake_weights.main(["--verify", str(hub_bake)]) == 0


def test_hub_bake_round_trips_every_tensor(hub_bake, tiny_dir):
    """Each baked tensor against the published tensors it must hold, sliced out by the published shapes (the
    config's head counts and codebooks), and every published tensor held exactly once."""
    published = load_file(str(tiny_dir / "model.safetensors"))
    baked = load_file(str(hub_bake / "model.safetensors"))
    config = Dia2Config.load(hub_bake / "config.json")
    assert {n: tuple(t.shape) for n, t in baked.items()} == engine_shapes(config)
    dec, held = config.model.decoder, []
    q_rows, kv_rows = dec.gqa_query_heads * dec.gqa_head_dim, dec.kv_heads * dec.gqa_head_dim

    def holds(part: torch.Tensor, name: str) -> None:
        assert torch.equal(part, published[name].to(torch.bfloat16)), name
        held.append(name)

    for name, tensor in baked.items():
        if name.endswith(".attn.qkv.weight"):
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
            for part, proj in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
                holds(part, name.replace(".qkv.", f".{proj}."))
        elif name == "transformer.audio_embed.weight":
            for c, table in enumerate(tensor.view(config.num_codebooks, config.data.audio_vocab_size, -1)):
                holds(table, f"transformer.audio_embeds.{c}.weight")
        else:
            holds(tensor, name)
    assert sorted(held) == sorted(published)

    codec = MimiCodec.skeleton(MimiConfig.load(tiny_dir / "mimi" / "config.json"))
    expected = codec_tensors(codec, load_file(str(tiny_dir / "mimi" / "model.safetensors")), torch.device("cpu"),
                             torch.bfloat16)
    baked = load_file(str(hub_bake / "mimi" / "model.safetensors"))
    assert baked.keys() == expected.keys() and all(torch.equal(baked[n], expected[n]) for n in baked)


@pytest.mark.parametrize("args, token, expected", [
    (["--revision", "v9"], TOKEN, "Revision Not Found"),
    ([], None, "Repository Not Found"),
    (["--mimi", "kyutai/no-such-mimi"], TOKEN, "kyutai/no-such-mimi: download failed"),
], ids=["unknown-revision", "no-token", "unknown-mimi-repo"])
def test_hub_errors_are_clear(hub, tmp_path, args, token, expected):
    out = tmp_path / "baked"
    result = run_bake("--model", MODEL_REPO, *args, "--out", str(out), env=hub_env(hub, tmp_path / "hf", token))
    assert_clean_failure(result.returncode, result.stderr, out, expected)


def test_hub_bake_pins_a_commit(hub, tmp_path):
    out = tmp_path / "baked"
    result = run_bake("--model", MODEL_REPO, "--revision", MODEL_SHA, "--mimi", MIMI_REPO, "--out", str(out),
                      env=hub_env(hub, tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert manifest_of(out)["model"]["revision"] == MODEL_SHA
