"""Training pieces: the chunked LM loss, schedules and optimizers."""

from lorax.train.loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    cross_entropy_reference,
    mean_loss,
    shift_labels,
)
from lorax.train.optim import (
    QuantizedArray,
    ScaleByAdam8bitState,
    adamw_8bit,
    dequantize_blockwise,
    dynamic_code,
    make_optimizer,
    make_schedule,
    optimizer_state_bytes,
    quantize_blockwise,
    scale_by_adam_8bit,
    zeros_blockwise,
)

__all__ = [
    "IGNORE_INDEX",
    "QuantizedArray",
    "ScaleByAdam8bitState",
    "adamw_8bit",
    "chunked_cross_entropy",
    "cross_entropy_reference",
    "dequantize_blockwise",
    "dynamic_code",
    "make_optimizer",
    "make_schedule",
    "mean_loss",
    "optimizer_state_bytes",
    "quantize_blockwise",
    "scale_by_adam_8bit",
    "shift_labels",
    "zeros_blockwise",
]
