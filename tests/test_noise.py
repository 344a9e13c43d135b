"""Known-harmless dependency noise is silenced at its source, and nothing else is."""

import logging
import warnings

from conftest import tiny_llama

from moslora import MoSConfig
from moslora.noise import BNB_CPU_LOGGER, BNB_KERNEL_NOTICE


def test_only_bitsandbytes_kernel_notice_is_dropped(caplog):
    logger = logging.getLogger(BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        logger.warning(BNB_KERNEL_NOTICE + ": %s. Please make sure ...", "No module named 'kernels'")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


def _future_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_a_peft_lora_run_has_no_gradient_checkpointing_warning():
    from moslora.model import wrap

    cfg = MoSConfig(target_modules=["q_proj"], rank=2, budget_rank=2)
    assert not [m for m in _future_warnings(lambda: wrap(tiny_llama(), "lora", cfg))
                if "is_gradient_checkpointing" in m]
    # outside peft the deprecation still shows: only peft's use of it is silenced
    assert any("is_gradient_checkpointing" in m
               for m in _future_warnings(lambda: tiny_llama().is_gradient_checkpointing))


def test_loading_a_model_draws_no_progress_bar(tmp_path, capfd):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from moslora.assets import default_model_path
    from moslora.base import load_base

    tiny_llama().save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(tmp_path / "base")
    hf_logging.enable_progress_bar()  # whatever an earlier test left
    capfd.readouterr()
    load_base(str(tmp_path / "base"))
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled()  # restored for everything else
