"""Checkpoint formats: Hugging Face safetensors/config, bitsandbytes 4-bit, PEFT, GGUF."""
