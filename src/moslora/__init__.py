"""moslora: Mixture of Shards (MoS), LoRA with global shard pools (arXiv 2410.00938).

    from moslora import MoSConfig, get_mos_model, MoSModel, export_peft_lora, export_gguf
"""

from .noise import silence_bitsandbytes_kernel_notice

silence_bitsandbytes_kernel_notice()  # before any import of peft or transformers loads bitsandbytes

from .checkpoint import CheckpointError, export_peft_lora
from .config import MoSConfig, PoolPlan, solve_pools
from .layer import MoSLinear
from .llamacpp import export_gguf
from .model import MoSModel, ParameterReport, get_mos_model
from .pools import ShardPools

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "MoSConfig",
    "MoSLinear",
    "MoSModel",
    "ParameterReport",
    "PoolPlan",
    "ShardPools",
    "export_gguf",
    "export_peft_lora",
    "get_mos_model",
    "solve_pools",
]
