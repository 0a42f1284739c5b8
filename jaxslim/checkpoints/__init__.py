"""Read pretrained checkpoints one tensor at a time, in Hugging Face naming: Hugging Face
safetensors directories (single file or sharded) and llama.cpp GGUF files (dequantized, q/k
permutation undone, config and tokenizer derived from the metadata). Write them back for servers
no one here wrote: GGUF (F32/F16, Q8_0/Q4_0/Q4_1 from QArray codes) for llama.cpp, a plain
Hugging Face checkpoint for transformers, and the compressed-tensors layout (W4A16
pack-quantized, W8A8 int-quantized) for vLLM.

Parameter trees of any model, QArrays included, go to and from Orbax checkpoint directories and
`.npz` files with `save` / `load` (`save_orbax`, `load_orbax`, `save_npz`, `load_npz`), a CRC-32
per leaf written with them and verified on load; `to_checkpoint` / `from_checkpoint` give the
stored form of QArrays for any array store, and `restore_qarrays` rebuilds QArrays saved with plain
Orbax from a template.

Reading HF and GGUF checkpoints needs the `models` extra (`pip install 'jaxslim[models]'`:
safetensors, gguf, tokenizers), Orbax directories the `orbax` extra; they are imported only when
a checkpoint is opened.
"""

from jaxslim.checkpoints._export_gguf import GGUFTensor, export_gguf, gguf_quantize, gguf_spec
from jaxslim.checkpoints._export_safetensors import export_compressed_tensors, export_hf
from jaxslim.checkpoints._names import (
    gguf_to_hf_name,
    hf_to_gguf_name,
    permute_qk,
    unpermute_qk,
)
from jaxslim.checkpoints._npz import load_npz, save_npz
from jaxslim.checkpoints._orbax import load_orbax, save_orbax
from jaxslim.checkpoints._qarrays import (
    from_checkpoint,
    is_plain_qarray,
    plain_qarray_bits,
    restore_qarrays,
    to_checkpoint,
)
from jaxslim.checkpoints._source import Source, open, read_tree
from jaxslim.checkpoints._store import load, save

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
    "save",
    "load",
    "save_orbax",
    "load_orbax",
    "save_npz",
    "load_npz",
    "to_checkpoint",
    "from_checkpoint",
    "restore_qarrays",
    "is_plain_qarray",
    "plain_qarray_bits",
]
