"""One exact Llama-family decoder (Llama, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3) as pure
functions over a params pytree, with HF checkpoint mapping, a tokenizer, perplexity and generation.

A model is ``(params, config)``: ``params`` a nested dict of arrays (kernels in Flax ``(in, out)``
layout; the tree is documented in ``jaxslim/models/_params.py``), ``config``
a hashable ``Config`` holding what shapes cannot tell. Sizes are read from the shapes, so a pruned
tree runs as it is, and every jaxslim tool that traces ``fn(params, *args)`` works on
``lambda p, x: models.forward(p, x, config)``.

>>> import jax, jax.numpy as jnp
>>> from jaxslim import models
>>> cfg = models.Config(head_dim=8)
>>> params = models.init(jax.random.key(0), cfg, vocab=32, hidden=16, layers=2, heads=2,
...                      kv_heads=1, intermediate=24)
>>> models.forward(params, jnp.array([[1, 2, 3]]), cfg).shape
(1, 3, 32)
"""

from jaxslim.models._config import Config, RopeScaling
from jaxslim.models._eval import PerplexityResult, perplexity
from jaxslim.models._generate import generate
from jaxslim.models._llama import block, embed, forward, head, init_cache, rms_norm
from jaxslim.models._load import from_hf_tensors, load, to_hf_tensors
from jaxslim.models._params import LayerSizes, Sizes, init, sizes
from jaxslim.models._stream import compress_streamed, load_streamed
from jaxslim.models._tokenizer import Tokenizer

__all__ = [
    "Config",
    "RopeScaling",
    "forward",
    "block",
    "embed",
    "head",
    "init",
    "init_cache",
    "rms_norm",
    "sizes",
    "Sizes",
    "LayerSizes",
    "generate",
    "perplexity",
    "PerplexityResult",
    "from_hf_tensors",
    "to_hf_tensors",
    "load",
    "compress_streamed",
    "load_streamed",
    "Tokenizer",
]
