"""Coverage-guided fuzzing (atheris / libFuzzer) of the adapter loader.

    pip install atheris==3.0.0        # not a test dependency: this is the long run
    python fuzz/fuzz_loader.py -max_total_time=3600 [-jobs=2] [CORPUS_DIR ...]

Each input is one byte choosing what it replaces in a valid saved adapter, then the bytes:

- 0: ``adapter_config.json``;
- 1: ``adapter_model.safetensors``, with the config's checksum recomputed so the input gets
  past the SHA-256 gate to the header, dtype, shape, index and finiteness checks;
- 2: ``adapter_model.safetensors`` with the checksum left stale.

``moslora.checkpoint.read_adapter`` must then return finite tensors that fit the base, or raise
``CheckpointError`` / ``FileNotFoundError``; any other exception is a finding, reported with the
input that caused it. Without a corpus directory argument the valid files are the seeds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["moslora"]):
    from moslora import CheckpointError, MoSConfig, get_mos_model
    from moslora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_adapter

import torch  # noqa: E402  (after the instrumented imports, which pull it in anyway)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

CFG = MoSConfig(target_modules=["q_proj", "v_proj"], rank=4, budget_rank=2, private_rank=1, shards_per_vector=2)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()


BASE = _tiny_llama()
WORK = Path(tempfile.mkdtemp(prefix="moslora-fuzz-"))


def _valid_files() -> dict[str, bytes]:
    model = get_mos_model(copy.deepcopy(BASE), CFG)
    with torch.no_grad():
        for p in model.mos_pools.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(WORK / "valid")
    return {name: (WORK / "valid" / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


VALID = _valid_files()
HEADER = json.loads(VALID[CONFIG_NAME])


def _files_for(data: bytes) -> dict[str, bytes]:
    mode, body = (data[0] % 3, data[1:]) if data else (0, b"")
    if mode == 0:
        return {CONFIG_NAME: body, WEIGHTS_NAME: VALID[WEIGHTS_NAME]}
    header = dict(HEADER)
    if mode == 1:
        header["weights_sha256"] = hashlib.sha256(body).hexdigest()
    return {CONFIG_NAME: json.dumps(header).encode(), WEIGHTS_NAME: body}


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point: load the adapter made from ``data``; only our errors may escape."""
    target = WORK / "adapter"
    target.mkdir(exist_ok=True)
    for name, content in _files_for(data).items():
        (target / name).write_bytes(content)
    try:
        _, _, state = read_adapter(BASE, target)
    except (CheckpointError, FileNotFoundError):
        return
    for key, tensor in state.items():  # loaded: it must be usable, not merely parsed
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AssertionError(f"{key} loaded with NaN/Inf")


def _seed_corpus() -> str:
    corpus = WORK / "seeds"
    corpus.mkdir()
    (corpus / "config").write_bytes(b"\x00" + VALID[CONFIG_NAME])
    (corpus / "weights").write_bytes(b"\x01" + VALID[WEIGHTS_NAME])
    (corpus / "stale").write_bytes(b"\x02" + VALID[WEIGHTS_NAME][:-7])
    return str(corpus)


def main() -> None:
    argv = list(sys.argv)
    if not any(Path(a).is_dir() for a in argv[1:] if not a.startswith("-")):
        argv.append(_seed_corpus())
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
