"""Pallas GPU kernels and their plain-jnp references; array-level code only (no lorax imports).

Each op picks its compiled kernel on GPU and its reference elsewhere; ``impl=`` and
``interpret=`` force either (see ``pallas_kernels._backend``).
"""

from pallas_kernels.expert_matmul import (
    MosaicRaggedConfig,
    expert_lora_matmul,
    expert_lora_matmul_reference,
)
from pallas_kernels.flash_attention import attention_reference, flash_attention
from pallas_kernels.flash_attention_mgpu import MgpuAttentionConfig
from pallas_kernels.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from pallas_kernels.nf4_matmul import (
    NF4MatmulConfig,
    nf4_lora_matmul,
    nf4_lora_matmul_group,
    nf4_lora_matmul_reference,
)

__all__ = [
    "MgpuAttentionConfig",
    "MosaicRaggedConfig",
    "NF4MatmulConfig",
    "NF4Tensor",
    "attention_reference",
    "dequantize_nf4",
    "expert_lora_matmul",
    "expert_lora_matmul_reference",
    "flash_attention",
    "nf4_lora_matmul",
    "nf4_lora_matmul_group",
    "nf4_lora_matmul_reference",
    "quantize_nf4",
]
