"""Read pretrained checkpoints one tensor at a time, in Hugging Face naming: Hugging Face
safetensors directories (single file or sharded) and llama.cpp GGUF files (dequantized, q/k
permutation undone, config and tokenizer derived from the metadata). Write them back for servers
no one here wrote: GGUF (F32/F16, Q8_0/Q4_0/Q4_1 from QArray codes) for llama.cpp, a plain
Hugging Face checkpoint for transformers, and the compressed-tensors layout (W4A16
pack-quantized, W8A8 int-quantized) for vLLM.

Needs the `models` extra (`pip install 'jaxslim[models]'`: safetensors, gguf, tokenizers); they
are imported only when a checkpoint is opened.
"""

from jaxslim.checkpoints._export_gguf import GGUFTensor, export_gguf, gguf_quantize, gguf_spec
from jaxslim.checkpoints._export_safetensors import export_compressed_tensors, export_hf
from jaxslim.checkpoints._names import (
    gguf_to_hf_name,
    hf_to_gguf_name,
    permute_qk,
    unpermute_qk,
)
from jaxslim.checkpoints._source import Source, open, read_tree

__all__ = [
    "open",
    "Source",
    "read_tree",
    "hf_to_gguf_name",
    "gguf_to_hf_name",
    "permute_qk",
    "unpermute_qk",
    "export_gguf",
    "gguf_spec",
    "gguf_quantize",
    "GGUFTensor",
    "export_hf",
    "export_compressed_tensors",
]
