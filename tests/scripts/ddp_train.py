"""Train a tiny MoS model on a tiny JSONL task; run alone or under `accelerate launch`.

Each process writes its final adapter state to OUT/rank<R>.safetensors, so the test can
compare ranks with each other and with a single-process run of the same global batch.

    python ddp_train.py DATA.jsonl OUT PER_DEVICE_BATCH
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from moslora import MoSConfig
from moslora.assets import default_model_path
from moslora.train import TrainConfig, train

data, out, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(default_model_path())
torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=len(tokenizer)))
cfg = TrainConfig(task=data, output_dir=str(out / "run"), max_steps=4, batch_size=batch, eval_steps=4,
                  eval_examples=2, test_examples=2, max_length=48, learning_rate=1e-2, warmup_ratio=0.0,
                  progress=False,
                  mos=MoSConfig(target_modules=["q_proj", "v_proj"], rank=3, budget_rank=2, private_rank=1))
result = train(cfg, base=base, tokenizer=tokenizer)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
state = {k: v.detach().contiguous() for k, v in result.model.mos_pools.state_dict().items()}
save_file(state, out / f"rank{rank}.safetensors")
