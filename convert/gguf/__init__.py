"""GGUF, llama.cpp's model format: export (with K-quants) and import.

``export_gguf(model, lora, path, quant)`` writes a lorax model, LoRA merged in, as a file
llama.cpp and Ollama run (architectures llama, which also computes Mistral and Mixtral,
qwen2, qwen3, gemma2, gemma3, phi3, qwen3moe, qwen2moe);
``load_gguf(path, build_config, ...)`` reads such a file back (``lorax.load("model.gguf")``
calls it). ``GGUFFile`` reads any GGUF strictly, and every malformed file is a
``GGUFError`` (a ``ValueError``) naming the file and tensor.
"""

from convert.gguf.export import export_gguf
from convert.gguf.format import GGUFError
from convert.gguf.load import bundled_smollm2_path, load_gguf
from convert.gguf.quants import SCHEMES
from convert.gguf.reader import GGUFFile

__all__ = [
    "SCHEMES",
    "GGUFError",
    "GGUFFile",
    "bundled_smollm2_path",
    "export_gguf",
    "load_gguf",
]
