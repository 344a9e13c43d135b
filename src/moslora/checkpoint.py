"""Compact MoS checkpoints (save, validated load) and export to the standard PEFT LoRA format.

An MoS adapter directory holds

- ``adapter_config.json``: format and version, the ``MoSConfig``, the base model fingerprint
  (architecture, targeted layer names and shapes), the base it was trained on
  (``base_model_name_or_path``, as PEFT names it; optional), the kinds, and the weights' SHA-256;
- ``adapter_model.safetensors``: per kind ``pool_A``, ``pool_B``, ``private_A``,
  ``private_B``, ``index_A``, ``index_B`` (the compact form, never dense A/B).

Writes go through ``atomic_directory``; loads check every field before touching the base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .assets import model_reference
from .atomic import atomic_directory
from .config import MoSConfig
from .layer import MoSLinear, is_supported
from .targeting import Kind, build_pools, fingerprint, find_targets, group_kinds

FORMAT = "moslora"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class CheckpointError(ValueError):
    """An adapter directory that cannot be loaded: corrupt, mismatched or from another format."""


class Adapted(Protocol):
    """What saving and exporting read of an ``MoSModel``: ``model.py`` builds on this module,
    so it is named by its attributes here, not imported."""

    base_model: nn.Module
    mos_config: MoSConfig
    kinds: list[Kind]
    base_fingerprint: dict[str, Any]
    mos_pools: nn.ModuleDict
    mos_layers: dict[str, MoSLinear]


# ---------------------------------------------------------------------------- save


def save_adapter(model: Adapted, path: str | Path) -> None:
    """Write ``model``'s adapter (pools, private segments, indices) to ``path`` atomically."""
    tensors = {k: _compact(v.detach()).contiguous().cpu() for k, v in model.mos_pools.state_dict().items()}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.mos_config.to_dict(),
        "base_fingerprint": model.base_fingerprint,
        "base_model_name_or_path": base_name(model.base_model),
        "kinds": {
            k.key: {"pattern": k.pattern, "d_in": k.d_in, "d_out": k.d_out, "layers": list(k.layers)}
            for k in model.kinds
        },
    }
    with atomic_directory(path) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "moslora": "1"})
        header["weights_sha256"] = _sha256(tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(header, indent=2))


def base_name(base: nn.Module) -> str | None:
    """The base's name for an adapter config: ``"smollm2"``, an absolute path, or None."""
    return model_reference(getattr(getattr(base, "config", None), "_name_or_path", None))


def _compact(tensor: Tensor) -> Tensor:
    """Routing indices in the narrowest integer type that holds them (they are most of an
    adapter's non-parameter bytes); parameters as they are."""
    if tensor.is_floating_point() or tensor.numel() == 0:
        return tensor
    return tensor.to(torch.int16 if int(tensor.max()) < 2**15 else torch.int32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- load


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of an MoS adapter directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is missing {name}; is this an adapter saved by moslora?")
    try:
        header = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON ({err}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path / CONFIG_NAME} must hold a JSON object")
    if header.get("format") != FORMAT:
        hint = " (a PEFT adapter: load it with peft.PeftModel)" if "peft_type" in header else ""
        raise CheckpointError(f"{path} is not a moslora adapter{hint}")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {header.get('format_version')!r}; this moslora reads "
            f"format_version {FORMAT_VERSION}: upgrade moslora or re-save the adapter"
        )
    for key in ("config", "base_fingerprint", "weights_sha256"):
        if key not in header:
            raise CheckpointError(f"{path / CONFIG_NAME} lacks the field {key!r}; the file is corrupt")
    return header


def read_adapter(
    base_model: nn.Module, path: str | Path, view: Any = None
) -> tuple[MoSConfig, list[Kind], dict[str, Tensor]]:
    """Read and validate the adapter at ``path`` for ``base_model`` without modifying it.

    Returns the config, the base's layer kinds it targets, and the ``mos_pools`` state dict.
    ``view`` stands in for the base's module tree when its targets are wrapped (serving):
    anything with ``named_modules()`` and ``get_output_embeddings()``.
    Raises ``FileNotFoundError`` for missing files and ``CheckpointError`` for anything
    corrupt, truncated, of another format version, of wrong shape or for a different base.
    """
    path = Path(path)
    header = read_adapter_config(path)
    config = _config_of(header, path)
    tree = base_model if view is None else view
    try:
        kinds = group_kinds(tree, find_targets(tree, config.target_modules))
    except ValueError as err:
        raise CheckpointError(f"adapter {path} does not fit this base model: {err}") from None
    state = _validated_state(path, header, config, kinds, fingerprint(base_model, kinds))
    return config, kinds, state


def load_adapter_weights(model: Adapted, path: str | Path) -> None:
    """Load saved pools into an existing ``MoSModel`` of the same config (resume, best model)."""
    path = Path(path)
    header = read_adapter_config(path)
    config = _config_of(header, path)
    if config != model.mos_config:
        diff = {k: (v, getattr(model.mos_config, k)) for k, v in config.to_dict().items()
                if v != getattr(model.mos_config, k)}
        raise CheckpointError(f"adapter {path} has another config than this model (saved, ours): {diff}")
    state = _validated_state(path, header, config, model.kinds, model.base_fingerprint)
    model.mos_pools.load_state_dict(state, strict=True)


def verify_adapter(path: str | Path) -> dict[str, Any]:
    """Check an adapter directory without a base: header, checksum, and every tensor's name,
    shape, dtype, finiteness and index range against its config and recorded kinds.

    Returns its header with ``parameters`` (trainable values stored) added. Raises
    ``FileNotFoundError`` or ``CheckpointError`` as ``read_adapter`` does.
    """
    path = Path(path)
    header = read_adapter_config(path)
    config = _config_of(header, path)
    state = _validated_state(path, header, config, _kinds_of(header, path), None)
    return {**header, "parameters": sum(t.numel() for t in state.values() if t.is_floating_point())}


def _kinds_of(header: dict[str, Any], path: Path) -> list[Kind]:
    try:
        return [Kind(key, k["pattern"], int(k["d_in"]), int(k["d_out"]), tuple(k["layers"]))
                for key, k in header["kinds"].items()]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{path / CONFIG_NAME} has malformed kinds; the file is corrupt") from None


def _config_of(header: dict[str, Any], path: Path) -> MoSConfig:
    try:
        return MoSConfig.from_dict(header["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME} holds an invalid config: {err}") from None


def _validated_state(
    path: Path, header: dict[str, Any], config: MoSConfig, kinds: list[Kind],
    actual_fp: dict[str, Any] | None,
) -> dict[str, Tensor]:
    """The checked tensors of the adapter at ``path`` for ``kinds``; ``actual_fp`` (the base's
    fingerprint) is compared with the saved one unless None (no base at hand)."""
    if _sha256(path / WEIGHTS_NAME) != header["weights_sha256"]:
        raise CheckpointError(
            f"{path / WEIGHTS_NAME} does not match the checksum in {CONFIG_NAME}: the weights "
            "are corrupt, truncated or from another save"
        )
    if actual_fp is not None:
        _check_fingerprint(header["base_fingerprint"], actual_fp, path, header.get("base_model_name_or_path"))
    try:
        tensors = load_file(path / WEIGHTS_NAME)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path / WEIGHTS_NAME} cannot be read ({err}); the file is corrupt") from None
    expected: dict[str, Tensor] = {}
    for kind in kinds:
        try:
            with torch.device("meta"):  # shapes only: a hostile config must not allocate
                pools = build_pools(config, kind)
        except ValueError as err:
            raise CheckpointError(f"adapter {path} does not fit this base model: {err}") from None
        _check_index_range(tensors, kind.key, pools.plan.shards, path)
        expected.update({f"{kind.key}.{k}": v for k, v in pools.state_dict().items()})
    return _checked_state(tensors, expected, path)


def _check_fingerprint(saved: Any, actual: dict[str, Any], path: Path, base: str | None) -> None:
    if not isinstance(saved, dict) or not isinstance(saved.get("layers"), dict):
        raise CheckpointError(f"{path / CONFIG_NAME} has a malformed base_fingerprint")
    trained_on = f" (it was trained on {base})" if base else ""
    if saved.get("architecture") != actual["architecture"]:
        raise CheckpointError(
            f"adapter {path} was saved for a {saved.get('architecture')} base{trained_on}, "
            f"not this {actual['architecture']}"
        )
    ours, theirs = actual["layers"], saved["layers"]
    problems = [f"{n}: not in this base" for n in theirs if n not in ours]
    problems += [f"{n}: not in the adapter" for n in ours if n not in theirs]
    problems += [
        f"{n}: shape {ours[n]} here, {theirs[n]} in the adapter"
        for n in ours
        if n in theirs and theirs[n] != list(ours[n])
    ]
    if problems:
        raise CheckpointError(
            f"adapter {path} was saved for a different base{trained_on}: " + "; ".join(problems[:5])
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        )


def _check_index_range(tensors: dict[str, Tensor], key: str, shards: int, path: Path) -> None:
    for side in ("index_A", "index_B"):
        index = tensors.get(f"{key}.{side}")
        if index is None or index.numel() == 0:
            continue  # missing keys are reported by _checked_state
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise CheckpointError(f"{path / WEIGHTS_NAME}: {key}.{side} must be an integer tensor")
        index = index.to(torch.int64)  # torch has no min/max for the unsigned wide types
        if int(index.min()) < 0 or int(index.max()) >= shards:
            raise CheckpointError(
                f"{path / WEIGHTS_NAME}: routing index {key}.{side} points outside its pool of "
                f"{shards} shards"
            )


def _checked_state(tensors: dict[str, Tensor], expected: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path / WEIGHTS_NAME} does not match its config: missing {missing[:4]}, "
            f"unexpected {extra[:4]}"
        )
    state = {}
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{path / WEIGHTS_NAME}: {key} has shape {tuple(got.shape)}, expected "
                f"{tuple(want.shape)} for this config and base"
            )
        if got.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{path / WEIGHTS_NAME}: {key} has dtype {got.dtype}, expected {want.dtype}")
        # check after the cast: a float64 1e300 is finite but loads as Inf in a float32 pool
        if got.is_floating_point() and not torch.isfinite(got.to(want.dtype)).all():
            raise CheckpointError(f"{path / WEIGHTS_NAME}: {key} holds NaN or Inf values")
        state[key] = got.to(want.dtype)
    return state


# ---------------------------------------------------------------------------- export


def lora_factors(model: Adapted, dtype: torch.dtype | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Every adapted layer's dense LoRA factors, by module name: ``A: (r, d_in)``,
    ``B: (d_out, r)``, so that the layer's update is ``(alpha/r) · B A``.

    Detached, contiguous CPU copies, in ``dtype`` if given (else the pools' dtype); every
    export format is written from these.
    """
    factors = {}
    with torch.no_grad():
        for name, layer in model.mos_layers.items():
            a, b = layer.factors()
            factors[name] = tuple(t.detach().to(dtype or t.dtype).contiguous().cpu() for t in (a, b))
    return factors


def export_peft_lora(model: Adapted, out_dir: str | Path, dtype: torch.dtype | None = None,
                     overwrite: bool = False) -> Path:
    """Materialize every layer's ``A, B`` into a standard PEFT LoRA directory of rank ``r``.

    The result loads with ``peft.PeftModel.from_pretrained(base, out_dir)`` (and so in vLLM,
    LoRAX or TGI); it is dense, ``L · r · (d_in + d_out)`` per kind, so keep the MoS
    directory as the compact copy. ``out_dir`` must be new or empty unless ``overwrite``
    (then it is replaced whole), and is never an MoS adapter (see ``check_new_directory``).
    Returns ``out_dir``.
    """
    check_new_directory(out_dir, overwrite)
    tensors: dict[str, Tensor] = {}
    for name, (a, b) in lora_factors(model, dtype).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    cfg = model.mos_config
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model.base_model),
        "base_model_name_or_path": base_name(model.base_model),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _peft_targets(model),
        "fan_in_fan_out": all(isinstance(l.base_layer, Conv1D) for l in model.mos_layers.values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    # keep_others=False: a replaced export must not keep the old one's files
    with atomic_directory(out_dir, keep_others=False) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2))
    return out_dir


def check_new_directory(path: str | Path, overwrite: bool = False) -> None:
    """Raise unless a derived artefact (a PEFT export, a merged model) may be written to ``path``.

    ``path`` must be absent or empty, or ``overwrite`` set; an MoS adapter there is never
    replaced, ``overwrite`` or not: it is the compact original the artefact was made from.
    ``NotADirectoryError`` for a file, ``FileExistsError`` otherwise.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if _is_mos_adapter(path):
        raise FileExistsError(f"{path} holds an MoS adapter, which an export or merge never "
                              "replaces (not even with overwrite): choose a new path")
    if not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; pass overwrite=True "
                              "(--overwrite) to replace it, or choose a new path")


def _is_mos_adapter(path: Path) -> bool:
    try:
        header = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT


def _peft_targets(model: Adapted) -> list[str]:
    """Module-name suffixes when they select exactly the adapted layers (what vLLM expects),
    else the full names."""
    adapted = set(model.mos_layers)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = {
        n
        for n, m in model.base_model.named_modules()
        if n.rsplit(".", 1)[-1] in suffixes and (isinstance(m, MoSLinear) or is_supported(m))
    }
    return suffixes if selected == adapted else sorted(adapted)


def _task_type(base: nn.Module) -> str | None:
    causal = type(base).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return "CAUSAL_LM" if causal else None
