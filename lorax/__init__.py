"""lorax: fast LoRA/QLoRA fine-tuning of Hugging Face LLMs in JAX.

The public API is this module's names: load a model, make adapters, run the pure forward,
train, and export. Everything else is an implementation detail that may move.
"""

from convert.gguf import export_gguf
from convert.merged import save_merged
from lorax import distributed, sharding
from lorax.adapters import load_adapter, save_adapter
from lorax.config import ConfigError, ModelConfig, RopeConfig
from lorax.facade import FastLanguageModel, PeftModel
from lorax.kernel_weights import prepare_kernel_weights
from lorax.loading import load
from lorax.lora import LoraConfig, LoraWeights, init_lora, lora_linear, lora_linears
from lorax.model import ForwardOptions, Model, embeddings_to_host, forward, hidden_states
from lorax.train.trainer import TrainConfig, Trainer
from pallas_kernels.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FastLanguageModel",
    "ForwardOptions",
    "LoraConfig",
    "LoraWeights",
    "Model",
    "ModelConfig",
    "NF4Tensor",
    "PeftModel",
    "RopeConfig",
    "TrainConfig",
    "Trainer",
    "dequantize_nf4",
    "distributed",
    "embeddings_to_host",
    "export_gguf",
    "forward",
    "hidden_states",
    "init_lora",
    "load",
    "load_adapter",
    "lora_linear",
    "lora_linears",
    "prepare_kernel_weights",
    "quantize_nf4",
    "save_adapter",
    "save_merged",
    "sharding",
]
