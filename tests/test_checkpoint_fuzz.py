"""Fuzzed adapter loading: any damaged adapter directory loads correctly or fails with our errors.

Every test starts from the bytes of one valid saved adapter, damages them, and hands the
directory to ``MoSModel.from_pretrained``. The only acceptable outcomes are

- a model whose logits are finite and whose pools hold exactly what the files say, or
- ``CheckpointError`` (corrupt / mismatched) or ``FileNotFoundError`` (missing files).

Anything else (an ``IndexError`` from torch, a ``TypeError`` from a malformed field, a
``NotImplementedError`` for an exotic dtype) is a bug in the loader and fails the test.

Mutations come in two flavours: *raw* ones (truncation, flipped bytes) leave the checksum
stale, so they test the SHA-256 gate; *consistent* ones re-write the files and recompute
``weights_sha256``, so they get past the gate and exercise the deeper checks.

CI runs the example counts below (>= 500 in all). For a longer run, raise them all at once:
``MOSLORA_FUZZ_SCALE=50 pytest tests/test_checkpoint_fuzz.py``.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_adapter, tiny_llama
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moslora import CheckpointError, MoSConfig, MoSModel, get_mos_model
from moslora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, _sha256

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') skips this file



# Two kinds over the 4-layer tiny Llama: enough to have pools, private segments and indices
# of two shapes, small enough that a load plus a forward pass costs a few milliseconds.
CFG = MoSConfig(target_modules=["q_proj", "v_proj"], rank=4, budget_rank=2, private_rank=1, shards_per_vector=2)
SCALE = int(os.environ.get("MOSLORA_FUZZ_SCALE", "1"))
TOKENS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
SRC = Path(__file__).resolve().parents[1] / "src" / "moslora"

# Outcomes of every example run in this module, printed at the end (docs/reliability.md).
TALLY: collections.Counter[str] = collections.Counter()


def _examples(n: int) -> settings:
    # deadline=None: the first forward pass of a process is slow and would trip the deadline.
    return settings(max_examples=n * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- the valid adapter


def _build_valid() -> tuple[dict[str, bytes], torch.nn.Module]:
    """Save one randomized adapter and return its files' bytes plus a pristine base model."""
    pristine = tiny_llama()
    model = get_mos_model(copy.deepcopy(pristine), CFG)
    randomize_adapter(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = {name: (Path(tmp) / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    return files, pristine


VALID, PRISTINE = _build_valid()
VALID_HEADER = json.loads(VALID[CONFIG_NAME])
with tempfile.TemporaryDirectory() as _tmp:
    (Path(_tmp) / WEIGHTS_NAME).write_bytes(VALID[WEIGHTS_NAME])
    VALID_TENSORS = load_file(Path(_tmp) / WEIGHTS_NAME)
TENSOR_KEYS = sorted(VALID_TENSORS)


@pytest.fixture(scope="module", autouse=True)
def report_tally():
    """Print how the fuzzed cases ended; run with -s to see it."""
    yield
    print(f"\nfuzzed cases: {sum(TALLY.values())}; outcomes: {dict(sorted(TALLY.items()))}")


# ---------------------------------------------------------------------------- the oracle


def _check_load(files: dict[str, bytes | None]) -> None:
    """Write ``files`` (None = leave the file out) to a fresh directory and load it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        for name, data in files.items():
            if data is not None:
                (path / name).write_bytes(data)
        _assert_loads_or_rejects(path)


def _assert_loads_or_rejects(path: Path) -> None:
    # from_pretrained modifies its base on success, so every load gets its own copy.
    base = copy.deepcopy(PRISTINE)
    try:
        model = MoSModel.from_pretrained(base, path)
    except (CheckpointError, FileNotFoundError) as err:
        TALLY[type(err).__name__] += 1
        return
    # Anything else propagates and fails the test, with hypothesis' minimal failing input.
    TALLY["loaded"] += 1
    on_disk = load_file(path / WEIGHTS_NAME)
    loaded = model.mos_pools.state_dict()
    floats = [v for v in loaded.values() if v.is_floating_point()]
    # The loader promises no NaN/Inf in what it attaches (finite logits alone can hide one).
    assert all(torch.isfinite(v).all() for v in floats)
    # A flipped exponent bit can leave a finite but huge weight (1e30): it loads faithfully
    # and overflows in the forward pass, a property of the weights, not of the file (as in
    # SPECIAL below). Weights of a sane size must give finite logits.
    if all(v.abs().max() < 1e4 for v in floats if v.numel()):
        with torch.no_grad():
            assert torch.isfinite(model(TOKENS).logits).all()
    assert set(loaded) == set(on_disk)
    for key, value in loaded.items():
        assert torch.equal(value, on_disk[key].to(value.dtype)), key


def _with_weights(weights: bytes, consistent: bool) -> dict[str, bytes]:
    """The valid config with ``weights``; if ``consistent``, its checksum matches them."""
    header = dict(VALID_HEADER)
    if consistent:
        header["weights_sha256"] = _sha_of(weights)
    return {CONFIG_NAME: json.dumps(header).encode(), WEIGHTS_NAME: weights}


def _sha_of(weights: bytes) -> str:
    # Use the library's own checksum function, on a real file, so the two cannot drift apart.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "w").write_bytes(weights)
        return _sha256(Path(tmp) / "w")


def _serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, Path(tmp) / WEIGHTS_NAME, metadata={"format": "pt", "moslora": "1"})
        return (Path(tmp) / WEIGHTS_NAME).read_bytes()


def test_the_valid_adapter_loads(tmp_path):
    """The oracle's baseline: the unmutated adapter must load (else every case is vacuous)."""
    for name, data in VALID.items():
        (tmp_path / name).write_bytes(data)
    base = copy.deepcopy(PRISTINE)
    MoSModel.from_pretrained(base, tmp_path)
    assert "MoSLinear" in repr(base)


# ---------------------------------------------------------------------------- raw byte damage


@_examples(80)
@given(name=st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]), cut=st.floats(0, 1, exclude_max=True),
       consistent=st.booleans())
def test_truncation(name, cut, consistent):
    data = VALID[name][: int(cut * len(VALID[name]))]
    if name == WEIGHTS_NAME:
        _check_load(_with_weights(data, consistent))
    else:
        _check_load({CONFIG_NAME: data, WEIGHTS_NAME: VALID[WEIGHTS_NAME]})


@_examples(100)
@given(name=st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8),
       consistent=st.booleans())
def test_flipped_bytes(name, flips, consistent):
    data = bytearray(VALID[name])
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    if name == WEIGHTS_NAME:
        _check_load(_with_weights(bytes(data), consistent))
    else:
        _check_load({CONFIG_NAME: bytes(data), WEIGHTS_NAME: VALID[WEIGHTS_NAME]})


@_examples(40)
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(2**30, 2**63), st.integers(0, 4096)))
def test_header_length(length):
    """The first 8 bytes of a safetensors file give its header's size; lie about it."""
    weights = struct.pack("<Q", length) + VALID[WEIGHTS_NAME][8:]
    _check_load(_with_weights(weights, consistent=True))


@_examples(3)  # only three non-empty subsets exist
@given(missing=st.sets(st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]), min_size=1))
def test_missing_files(missing):
    _check_load({name: None if name in missing else data for name, data in VALID.items()})


# ---------------------------------------------------------------------------- tensor damage

# Every dtype safetensors can store; the exotic ones (unsigned, float8) are where torch ops
# are least complete.
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
          torch.uint64, torch.bool]
# 1e300 only survives in a float64 tensor and turns into Inf when loaded as float32; 1e5
# overflows float16. Huge *finite* float32 values (1e30) are left out on purpose: they load
# faithfully and then overflow in the forward pass, a property of the weights, not the file.
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 1e5, 0.0]


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Unsigned casts of negative values are undefined in torch; clamp first so the bytes on
    # disk are well defined (the loader still has to judge them).
    # (via int64, since torch cannot clamp the wide unsigned types).
    if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) and not tensor.is_floating_point():
        tensor = tensor.to(torch.int64).clamp(min=0)
    return tensor.to(dtype)


# An edit is plain data, (what, key, argument), so a failing example prints readably.
TensorEdit = tuple[str, str, Any]


@st.composite
def tensor_edits(draw) -> TensorEdit:
    """One edit of the saved tensor dict: dtype, shape, value, index, missing or extra key."""
    key = draw(st.sampled_from(TENSOR_KEYS))
    what = draw(st.sampled_from(["dtype", "shape", "special", "index", "drop", "extra", "rename"]))
    if what == "dtype":
        return what, key, draw(st.sampled_from(DTYPES))
    if what == "shape":
        return what, key, tuple(draw(st.lists(st.integers(0, 9), max_size=4)))
    if what == "special":
        return what, key, (draw(st.integers(0, 10**6)), draw(st.sampled_from(SPECIAL)))
    if what == "index":
        # Index values around the pool size (8 shards here), negative, and near the int range.
        index_key = key.rsplit(".", 1)[0] + "." + draw(st.sampled_from(["index_A", "index_B"]))
        value = draw(st.one_of(st.integers(-3, 12), st.integers(-(2**31), 2**31 - 1)))
        dtype = draw(st.sampled_from([torch.int16, torch.int32, torch.int64]))
        return what, index_key, (draw(st.integers(0, 10**6)), value, dtype)
    if what == "extra":
        return what, draw(st.sampled_from([key + "_extra", "lora_A.weight", key.rsplit(".", 1)[0] + ".pool_C"])), None
    return what, key, None  # drop, rename


def _apply(tensors: dict[str, torch.Tensor], edit: TensorEdit) -> None:
    what, key, arg = edit
    if what == "extra":
        tensors[key] = torch.zeros(2, 2)
    elif key not in tensors:
        return  # an earlier edit dropped or renamed it
    elif what == "dtype":
        tensors[key] = _cast(tensors[key], arg)
    elif what == "shape":
        tensors[key] = torch.zeros(arg, dtype=tensors[key].dtype)
    elif what == "special":
        _set_flat(tensors, key, *arg)
    elif what == "index":
        _set_index(tensors, key, *arg)
    elif what == "drop":
        del tensors[key]
    elif what == "rename":  # a tensor of the right shape under the wrong layer kind's name
        tensors[key.replace("q_proj", "k_proj").replace("v_proj", "o_proj")] = tensors.pop(key)


def _set_flat(tensors: dict[str, torch.Tensor], key: str, pos: int, value: float) -> None:
    tensor = tensors[key].clone()
    if tensor.numel() == 0:
        return
    flat = tensor.view(-1)
    if flat.dtype == torch.bool:  # no NaN and no range (torch.iinfo refuses bool): set the bit
        flat[pos % flat.numel()] = value != 0
        tensors[key] = tensor
        return
    # Integer tensors cannot hold NaN/Inf; store the largest value of their type instead.
    # (capped at 2**63 - 1, the largest int torch accepts from Python, for uint64).
    if not flat.is_floating_point():
        big = min(torch.iinfo(flat.dtype).max, 2**63 - 1)
        value = big if not math.isfinite(value) or abs(value) > 2**15 else value
    # Through a float64 tensor: a value too big for the dtype becomes Inf instead of an error.
    flat[pos % flat.numel()] = torch.tensor(value, dtype=torch.float64).to(flat.dtype)
    tensors[key] = tensor


def _set_index(tensors: dict[str, torch.Tensor], key: str, pos: int, value: int, dtype: torch.dtype) -> None:
    tensor = tensors[key].to(torch.int64)  # int64 first: torch cannot edit some unsigned types
    if tensor.numel() == 0:
        return
    tensor.view(-1)[pos % tensor.numel()] = value
    info = torch.iinfo(dtype)
    tensors[key] = tensor.clamp(info.min, info.max).to(dtype)


Q = "model/layers/*/self_attn/q_proj@64x64"


@_examples(160)
@given(edits=st.lists(tensor_edits(), min_size=1, max_size=3))
# Cases the fuzzer found once, pinned so every run checks them.
@example(edits=[("dtype", f"{Q}.index_A", torch.uint16)])  # torch has no min() for uint16
@example(edits=[("dtype", f"{Q}.pool_A", torch.float8_e4m3fn)])  # nor isfinite() for float8
@example(edits=[("dtype", f"{Q}.pool_A", torch.float64), ("special", f"{Q}.pool_A", (0, 1e300))])
def test_tensor_edits(edits):
    tensors = {k: v.clone() for k, v in VALID_TENSORS.items()}
    for edit in edits:
        _apply(tensors, edit)
    _check_load(_with_weights(_serialize(tensors), consistent=True))


# ---------------------------------------------------------------------------- JSON damage


def _json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / list indices) into the JSON tree, root excluded."""
    paths = []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        paths.append(prefix + (key,))
        paths.extend(_json_paths(child, prefix + (key,)))
    return paths


JSON_PATHS = _json_paths(VALID_HEADER)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
              st.text(max_size=8), st.sampled_from(["moslora", "LlamaForCausalLM", "q_proj", "all-linear"])),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6,
)


DELETE = "<delete>"


@st.composite
def json_edits(draw) -> tuple[tuple, Any]:
    """(path, new value or DELETE): delete a field, or give it a value of any JSON type."""
    path = draw(st.sampled_from(JSON_PATHS))
    return path, DELETE if draw(st.booleans()) else draw(JSON_VALUES)


def _edit_at(header: dict, path: tuple, value: Any) -> None:
    node = header
    for key in path[:-1]:
        node = node[key]
    if value == DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


@_examples(150)
@given(edits=st.lists(json_edits(), min_size=1, max_size=3), keep_checksum=st.booleans())
# Cases the fuzzer found once, pinned so every run checks them.
@example(edits=[(("base_fingerprint", "layers", "model.layers.0.self_attn.v_proj"), None)], keep_checksum=True)
@example(edits=[(("config", "rank"), DELETE)], keep_checksum=True)  # default rank 16 does not fit
@example(edits=[(("config", "budget_rank"), 473408589)], keep_checksum=True)  # a 30 GB pool
def test_json_edits(edits, keep_checksum):
    header = copy.deepcopy(VALID_HEADER)
    for path, value in edits:
        try:
            _edit_at(header, path, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed or retyped this field's parent: nothing to do
    # keep_checksum re-asserts the right weights_sha256 after the edits, so that edits to the
    # other fields are judged by the deeper checks rather than stopped at the checksum.
    if keep_checksum and isinstance(header, dict):
        header["weights_sha256"] = VALID_HEADER["weights_sha256"]
    text = json.dumps(header, allow_nan=True)
    _check_load({CONFIG_NAME: text.encode(), WEIGHTS_NAME: VALID[WEIGHTS_NAME]})


@_examples(30)
@given(top=JSON_VALUES)
def test_config_file_of_any_json_type(top):
    """A config file holding a list, a number, a string ... instead of an object."""
    _check_load({CONFIG_NAME: json.dumps(top).encode(), WEIGHTS_NAME: VALID[WEIGHTS_NAME]})


# ---------------------------------------------------------------------------- no pickle


def test_no_pickle_in_the_package():
    """Loading pickles runs arbitrary code; the package must only read safetensors / JSON."""
    offenders = []
    for file in sorted(SRC.rglob("*.py")):
        for number, line in enumerate(file.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\b|\bcPickle\b|\bdill\b|\bcloudpickle\b", code):
                offenders.append(f"{file.name}:{number}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{file.name}:{number}: {line.strip()}")
    assert SRC.is_dir() and any(SRC.rglob("checkpoint.py"))  # the scan looked in the right place
    assert offenders == []
