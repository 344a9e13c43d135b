"""Known-harmless output of our dependencies, silenced where it arises and nowhere else.

- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import
  on CPUs with AVX512-BF16 when the optional ``kernels`` package is absent; it then uses its
  own CPU kernel, which is what we want. Only that message of that one logger is dropped.
- peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
  FutureWarning on every PeftModel creation; ignored only inside ``peft_calls()``.
- transformers draws a "Loading weights" progress bar per model load; off only inside
  ``no_loading_bars()``.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_KERNEL_NOTICE)


def silence_bitsandbytes_kernel_notice() -> None:
    """Drop bitsandbytes' optional-kernel notice; must run before bitsandbytes is imported."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelNotice) for f in logger.filters):
        logger.addFilter(_DropKernelNotice())


@contextmanager
def peft_calls() -> Iterator[None]:
    """Around a call into peft: without transformers' ``is_gradient_checkpointing`` warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning, module=r"transformers\.modeling_utils")
        yield


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Around a model load: no transformers progress bar (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
