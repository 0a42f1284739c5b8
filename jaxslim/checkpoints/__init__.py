"""Read pretrained checkpoints one tensor at a time, in Hugging Face naming: Hugging Face
safetensors directories (single file or sharded) and llama.cpp GGUF files (dequantized, q/k
permutation undone, config and tokenizer derived from the metadata).

Needs the `models` extra (`pip install 'jaxslim[models]'`: safetensors, gguf, tokenizers); they
are imported only when a checkpoint is opened.
"""

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
]
