#!/usr/bin/env python3
"""Bake Dia2 weights into the serving layout the worker loads fastest; run once, at image build.

The published checkpoint (and its Mimi codec) is downloaded from the Hub or read from a local directory,
converted once to the tensors the engine holds (q/k/v and audio embeddings fused, Mimi's code vectors
precomputed) in one dtype, and written with the config, the tokenizer and a manifest.json of sources,
resolved revisions and file hashes, so a worker start reads tensors as they are and checks only sizes.

    python bake_weights.py --model nari-labs/Dia2-2B --out /models/dia2-2b      # HF_TOKEN is honoured
    python bake_weights.py --model ./Dia2-2B --mimi ./mimi --out /models/dia2-2b
    python bake_weights.py --model nari-labs/Dia2-2B --asr Systran/faster-whisper-large-v3 --out /models/dia2-2b
    python bake_weights.py --demo --out /tmp/dia2-demo                            # no network
    python bake_weights.py --random-shape 2b --out /tmp/dia2-2b-random            # no network
    python bake_weights.py --verify /models/dia2-2b
    python bake_weights.py --demo --out /tmp/dia2-demo --compile-cache              # + torch.compile's artifacts

The result appears all at once: it is built in a hidden sibling of --out and renamed into place when done,
so an interrupted bake leaves at most a `.NAME.partial-*` directory beside it, never a half-written --out.

With --compile-cache the worker's start is then run with torch.compile on the bake's device, and the compiled
artifacts are kept in DIR/compile-cache/<device key>/ (dia2_worker/precompile.py), so a worker started on that
kind of device compiles nothing. They are device-specific and not byte-identical: the manifest leaves them out.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dia2_worker.config import Dia2Config

MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""What Dia2Tokenizer.from_dir reads; only tokenizer.json is required."""
MIMI_FILES = ("config.json", "model.safetensors")
ASR_FILES = ("config.json", "model.bin", "tokenizer.json", "preprocessor_config.json", "vocabulary.*")
"""A CTranslate2 Whisper conversion, as faster-whisper reads it (the vocabulary is .json or .txt)."""
ASR_DIR = "asr"
"""Where the speech recognition model goes inside the bake (the worker's default ASR_MODEL_DIR)."""
DEFAULT_MIMI = "kyutai/mimi"
DTYPES = ("bfloat16", "float16", "float32")
RANDOM_SEED = 0
TOOLS = ("torch", "safetensors", "huggingface_hub", "tokenizers", "numpy", "ctranslate2")
"""Packages whose versions the manifest records."""
STARTED = time.perf_counter()
FIXED_MTIME = 315_532_800
"""1980-01-01 UTC: every file and directory of a bake gets this mtime (or SOURCE_DATE_EPOCH's), so rebuilding
the image's weights layer from the same sources gives the same bytes and metadata, hence the same layer digest."""
COMPILE_CACHE_DIR = "compile-cache"
"""Where --compile-cache puts the compiled artifacts (dia2_worker.compile_cache.DIRECTORY); not in the manifest."""
RECORDED_FLAGS = ("--model", "--demo", "--random-shape", "--dtype", "--revision", "--mimi", "--mimi-revision")
"""The flags that decide a bake's content, which the manifest records; --out and --force only say where."""


class BakeError(Exception):
    """A problem the user can fix (bad source, failed download, occupied --out): reported without a traceback."""


@dataclass(frozen=True)
class Source:
    """A checkpoint directory to read, and what the manifest records about where it came from."""

    dir: Path
    repo: str | None = None
    revision: str | None = None
    path: str | None = None

    @property
    def record(self) -> dict[str, str | None]:
        return {"repo": self.repo, "revision": self.revision, "path": self.path}

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.revision}" if self.repo else str(self.path)


NO_SOURCE: dict[str, str | None] = {"repo": None, "revision": None, "path": None}


# ---------------------------------------------------------------------- sources


def fetch(spec: str, revision: str | None, files: Sequence[str]) -> Source:
    """A local directory as it is, or Hub repo `spec` downloaded at one commit (only `files`, into the HF cache)."""
    directory = Path(spec)
    if directory.is_dir():
        if revision is not None:
            raise BakeError(f"{spec}: a revision applies to a Hub repo, not to a local directory")
        return Source(directory, path=str(directory.resolve()))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    log(f"downloading {', '.join(files)} from {spec}" + (f" at {revision}" if revision else ""))
    if not sys.stderr.isatty():  # progress bars on a terminal; an image build's log gets the lines above only
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        snapshot = Path(snapshot_download(spec, revision=revision, allow_patterns=list(files)))
    except HFValidationError as exc:
        raise BakeError(f"{spec}: neither a local directory nor a Hub repo id ({exc})") from None
    except OSError as exc:  # the Hub's HTTP errors, and network failures with nothing cached
        raise BakeError(f"{spec}: download failed: {exc}") from None
    # snapshot folders are named by the commit they hold: the revision resolved
    return Source(snapshot, repo=spec, revision=snapshot.name)


@contextmanager
def reading(source: Source) -> Iterator[None]:
    """Errors in a source's files become BakeErrors that name the source (repo and commit, or path)."""
    from safetensors import SafetensorError

    from dia2_worker.checkpoint import CheckpointError
    from dia2_worker.config import ConfigError

    try:
        yield
    except (CheckpointError, ConfigError) as exc:
        raise BakeError(f"{source.label}: {exc}") from None
    except SafetensorError as exc:
        raise BakeError(f"{source.label}: model.safetensors is not a readable safetensors file ({exc})") from None


def default_mimi(model: Source, config: Dia2Config) -> str:
    """The model directory's own mimi/ (as the engine loads it), else the repo its config names, else kyutai/mimi."""
    own = model.dir / "mimi"
    return str(own) if own.is_dir() else config.assets.mimi or DEFAULT_MIMI


def real_mimi_config() -> dict[str, Any]:
    """kyutai/mimi's config.json values: MimiConfig's defaults are the published codec."""
    from dia2_worker.mimi import MimiConfig

    values = dataclasses.asdict(MimiConfig())
    return {"model_type": "mimi", **{name: value for name, value in values.items() if value is not None}}


# ---------------------------------------------------------------------- writing the layout


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors sorts tensors by dtype, then name: with one dtype, file order is name order, which is also
    the order the loader reads them in (safe_open's keys()), so a load reads the file front to back."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates it owner-only; the worker may run as another user than the bake


def write_converted(out: Path, model: Source, config: Dia2Config, mimi: Source, dtype: torch.dtype) -> None:
    """The serving layout from published (or already baked) directories: fused engine tensors, the codec's own."""
    import torch

    from dia2_worker.checkpoint import load_weights
    from dia2_worker.mimi import load_mimi

    cpu = torch.device("cpu")
    if not (model.dir / "tokenizer.json").is_file():
        raise BakeError(f"{model.label}: tokenizer.json not found")
    log(f"converting {model.label} to {dtype}")
    with reading(model):
        tensors = load_weights(model.dir, config, cpu, dtype)
    save_tensors(tensors, out / "model.safetensors")
    del tensors
    for name in ("config.json", *TOKENIZER_FILES):
        if (model.dir / name).is_file():
            shutil.copyfile(model.dir / name, out / name)
    log(f"converting Mimi {mimi.label} to {dtype}")
    with reading(mimi):
        codec = load_mimi(mimi.dir, cpu, dtype)
    (out / "mimi").mkdir()
    save_tensors(codec.state_dict(), out / "mimi" / "model.safetensors")
    shutil.copyfile(mimi.dir / "config.json", out / "mimi" / "config.json")


def write_random(out: Path, config_dict: dict[str, Any], mimi_config: dict[str, Any], dtype: torch.dtype) -> None:
    """A random-weight checkpoint of these shapes, with the demo tokenizer, straight in the serving layout."""
    from dia2_worker.config import Dia2Config
    from dia2_worker.random_model import demo_tokenizer, random_dia2_tensors, random_mimi, tokenizer_files

    log(f"drawing random weights in {dtype}")
    (out / "config.json").write_text(json.dumps(config_dict, indent=1) + "\n")
    tensors = random_dia2_tensors(Dia2Config.from_dict(config_dict), RANDOM_SEED, "cpu", dtype)
    save_tensors(tensors, out / "model.safetensors")
    del tensors
    for name, text in tokenizer_files(demo_tokenizer()).items():
        (out / name).write_text(text)
    (out / "mimi").mkdir()
    (out / "mimi" / "config.json").write_text(json.dumps(mimi_config, indent=1) + "\n")
    codec = random_mimi(mimi_config, RANDOM_SEED + 1, "cpu", dtype)
    save_tensors(codec.state_dict(), out / "mimi" / "model.safetensors")


def write_asr(out: Path, asr: Source | None) -> None:
    """The speech recognition model in out/asr: a converted Whisper's files as they are, or (asr None) the tiny
    random-weight one the demo uses."""
    from dia2_worker.random_asr import write_random_asr

    target = out / ASR_DIR
    if asr is None:
        log("building the tiny random-weight speech recognition model")
        write_random_asr(target)
        return
    log(f"copying speech recognition model {asr.label}")
    target.mkdir()
    for pattern in ASR_FILES:
        for file in asr.dir.glob(pattern):
            shutil.copyfile(file, target / file.name)
    missing = [name for name in ("config.json", "model.bin", "tokenizer.json") if not (target / name).is_file()]
    if missing or not any(target.glob("vocabulary.*")):
        raise BakeError(f"{asr.label}: not a CTranslate2 Whisper conversion (missing "
                        f"{', '.join(missing or ['vocabulary.json/.txt'])}); faster-whisper's models are, e.g. "
                        "Systran/faster-whisper-large-v3")


def payload_files(directory: Path) -> list[str]:
    """Every file of a bake but its manifest, as the manifest names them (POSIX paths relative to it)."""
    from dia2_worker.checkpoint import MANIFEST

    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(name for name in names if name != MANIFEST and not name.startswith(COMPILE_CACHE_DIR + "/"))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (a 2B checkpoint is 4 GB)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path, dtype_name: str, sources: dict[str, Any], argv: Sequence[str]) -> None:
    """What the bake holds and how it was made: the worker checks sizes at start, --verify the hashes."""
    from dia2_worker.checkpoint import LAYOUT_VERSION, MANIFEST

    log("hashing")
    files = {name: {"size": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
             for name in payload_files(directory)}
    manifest = {
        "layout_version": LAYOUT_VERSION,
        "dtype": dtype_name,
        **sources,
        "files": files,
        "bake": {"command": ["bake_weights.py", *recorded_argv(argv)],
                 "versions": {"python": platform.python_version(), **{t: metadata.version(t) for t in TOOLS}}},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def recorded_argv(argv: Sequence[str]) -> list[str]:
    """The command line without where the bake went: two bakes of one source record the same command."""
    kept: list[str] = []
    keep = False
    for arg in argv:
        if arg.startswith("-"):
            keep = arg.split("=", 1)[0] in RECORDED_FLAGS
        if keep:
            kept.append(arg)
    return kept


def fix_metadata(directory: Path) -> None:
    """Same permissions and mtimes on every rebuild (the bytes already are the same)."""
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH") or FIXED_MTIME)
    for path in [*directory.rglob("*"), directory]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def check_loads(directory: Path, dtype: torch.dtype) -> None:
    """Load the bake as the worker will, so a bake the engine cannot use fails here and not at worker start."""
    from dia2_worker.engine import Dia2Engine

    log("checking that the engine loads it")
    try:
        Dia2Engine.load(directory, device="cpu", dtype=dtype)
    except Exception as exc:  # whatever stops the engine loading it makes the bake unusable
        raise BakeError(f"the engine cannot load the baked checkpoint: {exc}") from None


@contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    """A fresh hidden sibling of `out` to build in, renamed to `out` only if the body finishes.

    --force replaces an earlier bake, never a directory without a manifest: a mistyped --out must not delete
    something else."""
    from dia2_worker.checkpoint import MANIFEST

    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise BakeError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BakeError(f"{out}: not empty; pass --force to replace it")
        if not (out / MANIFEST).is_file():
            raise BakeError(f"{out}: not empty and not a bake (no {MANIFEST}); --force replaces only a bake")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    partial = out.with_name(f".{out.name}.partial-{tag}")
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():  # moved aside first, deleted after: `out` is always a whole bake, old or new
        replaced = out.with_name(f".{out.name}.replaced-{tag}")
        out.rename(replaced)
        partial.rename(out)
        shutil.rmtree(replaced)
    else:
        partial.rename(out)


def bake(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """--out from --model (converted) or from random weights (--demo, --random-shape): hashed, then load-checked."""
    import torch

    dtype = getattr(torch, args.dtype)
    with staging(args.out, args.force) as partial:
        if args.model is not None:
            from dia2_worker.config import Dia2Config

            model = fetch(args.model, args.revision, (*MODEL_FILES, *TOKENIZER_FILES))
            with reading(model):
                config = Dia2Config.load(model.dir / "config.json")
            mimi = fetch(args.mimi or default_mimi(model, config), args.mimi_revision, MIMI_FILES)
            write_converted(partial, model, config, mimi, dtype)
            sources: dict[str, Any] = {"model": model.record, "mimi": mimi.record}
        else:
            from dia2_worker.random_model import DEMO_CONFIG, DEMO_MIMI_CONFIG
            from dia2_worker.shapes import published_config

            if args.demo:
                write_random(partial, DEMO_CONFIG, DEMO_MIMI_CONFIG, dtype)
            else:
                write_random(partial, published_config(args.random_shape), real_mimi_config(), dtype)
            shape = "demo" if args.demo else args.random_shape
            sources = {"model": NO_SOURCE, "mimi": NO_SOURCE, "random": {"shape": shape, "seed": RANDOM_SEED}}
        if args.asr is not None:
            asr = fetch(args.asr, args.asr_revision, ASR_FILES)
            write_asr(partial, asr)
            sources["asr"] = asr.record
        elif args.demo:
            write_asr(partial, None)
            sources["asr"] = {**NO_SOURCE, "random": "demo"}
        write_manifest(partial, args.dtype, sources, argv)
        check_loads(partial, dtype)
        fix_metadata(partial)
        if args.compile_cache:
            make_compile_cache(partial, args.device)


def make_compile_cache(directory: Path, device: str | None) -> None:
    """The worker's start with torch.compile on, in a process of its own (Inductor reads where its cache is when
    it first compiles), compiling into DIR/compile-cache/<device key>/."""
    import subprocess

    log("making the compile cache (torch.compile of the serving path: minutes)")
    command = [sys.executable, "-m", "dia2_worker.precompile", "--model-dir", str(directory)]
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*command, *(["--device", device] if device else [])], env=env)
    if done.returncode != 0:
        raise BakeError(f"the compile cache could not be made: python -m dia2_worker.precompile exited with "
                        f"{done.returncode} (its log is above)")


# ---------------------------------------------------------------------- verifying


def verify(directory: Path) -> int:
    """Recheck a bake against its manifest (every file present, its size, then its sha256); files checked."""
    from dia2_worker.checkpoint import MANIFEST, CheckpointError, read_manifest

    try:
        manifest = read_manifest(directory)
    except CheckpointError as exc:
        raise BakeError(str(exc)) from None
    files = (manifest or {}).get("files")
    if not files:
        raise BakeError(f"{directory}: no {MANIFEST} listing its files, so not a baked directory")
    problems = [f"{name}: sha256 {digest}, {MANIFEST} says {entry['sha256']} (corrupted)"
                for name, entry in files.items() if (digest := sha256_of(directory / name)) != entry["sha256"]]
    problems += [f"{name}: not listed in {MANIFEST}" for name in payload_files(directory) if name not in files]
    if problems:
        raise BakeError(f"{directory}: " + "; ".join(problems) + "; re-run bake_weights.py")
    return len(files)


# ---------------------------------------------------------------------- command line


def log(message: str) -> None:
    """Progress on stderr, timed, so an image build's log shows where a bake spends its time."""
    print(f"bake_weights [{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bake_weights.py", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--model", metavar="REPO_OR_DIR",
                      help="the Dia2 checkpoint: a Hub repo id (nari-labs/Dia2-2B), or a local directory in the "
                           "published layout (or an earlier bake, e.g. to change --dtype)")
    mode.add_argument("--demo", action="store_true", help="a tiny random checkpoint, no network (first runs, tests)")
    mode.add_argument("--random-shape", choices=("1b", "2b"),
                      help="random weights of the published Dia2-1B/2B and Mimi shapes, no network (cold starts)")
    mode.add_argument("--verify", metavar="DIR", type=Path, help="recheck every file of a bake against its manifest")
    parser.add_argument("--out", metavar="DIR", type=Path, help="where the bake goes (required but for --verify)")
    parser.add_argument("--force", action="store_true", help="replace --out if it holds an earlier bake")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of every tensor (bfloat16)")
    parser.add_argument("--revision", help="branch, tag or commit of --model (main); the commit is recorded")
    parser.add_argument("--mimi", metavar="REPO_OR_DIR",
                        help="the Mimi codec: a Hub repo id or a local directory (the model's mimi/ if it has one, "
                             "else the repo its config names, else kyutai/mimi)")
    parser.add_argument("--mimi-revision", metavar="REVISION", help="branch, tag or commit of --mimi (main)")
    parser.add_argument("--asr", metavar="REPO_OR_DIR",
                        help="speech recognition model for voice prefixes sent without words: a CTranslate2 Whisper "
                             "conversion (Systran/faster-whisper-large-v3), Hub repo id or local directory; baked "
                             "into DIR/asr (--demo bakes a tiny random one)")
    parser.add_argument("--asr-revision", metavar="REVISION", help="branch, tag or commit of --asr (main)")
    parser.add_argument("--compile-cache", action="store_true",
                        help="also run the worker's start with torch.compile on this machine's device and keep the "
                             "compiled artifacts in DIR/compile-cache/ (a worker on the same kind of device then "
                             "compiles nothing; TORCH_COMPILE=auto turns compile on when they are there)")
    parser.add_argument("--device", help="the device --compile-cache compiles for (cuda when available, else cpu)")
    args = parser.parse_args(argv)
    if args.verify is None and args.out is None:
        parser.error("--out is required")
    if args.verify is not None and (args.out is not None or args.force or args.asr is not None):
        parser.error("--verify takes no --out, --force or --asr")
    if args.asr_revision is not None and args.asr is None:
        parser.error("--asr-revision needs --asr")
    if args.device is not None and not args.compile_cache:
        parser.error("--device needs --compile-cache")
    if args.verify is not None and args.compile_cache:
        parser.error("--verify takes no --compile-cache")
    for flag in ("revision", "mimi", "mimi_revision"):
        if getattr(args, flag) is not None and args.model is None:
            parser.error(f"--{flag.replace('_', '-')} needs --model")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.verify is not None:
            count = verify(args.verify)
            print(f"{args.verify}: {count} files match manifest.json")
            return 0
        bake(args, argv)
    except BakeError as exc:
        print(f"bake_weights.py: error: {exc}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    log(f"done: {args.out}, {size / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
