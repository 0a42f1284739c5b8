"""A pretrained checkpoint read one tensor at a time: the `Source` interface, `open` and
`read_tree`."""

import abc
import builtins
import importlib
import os
import zipfile

import numpy as np

from jaxslim._checks import public
from jaxslim.checkpoints import _names


def require(module: str):
    """Import an optional dependency of `jaxslim.checkpoints`, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"jaxslim.checkpoints needs the {module!r} package to read this checkpoint; install "
            f"it with: pip install 'jaxslim[models]'"
        ) from e


class Source(abc.ABC):
    """A checkpoint opened for lazy, per-tensor reading, in Hugging Face naming and layout.

    Made by `checkpoints.open`; one implementation per file format (`format` is `"hf"` for a
    safetensors directory, `"gguf"` for a GGUF file). Nothing is read until `read` asks for a
    tensor: files are memory-mapped, so a 70B checkpoint opens in milliseconds and `read` of one
    tensor touches only that tensor's bytes.

    Attributes:
      path: the directory or file that was opened.
      format: `"hf"` or `"gguf"`.
      config: a Hugging Face `config.json` dict (for GGUF derived from the metadata).
      metadata: the format's raw metadata (safetensors header `__metadata__`; GGUF key/values).

    Names are always Hugging Face names (`model.layers.0.self_attn.q_proj.weight`) and shapes are
    PyTorch shapes (a linear weight is `(out, in)`), whatever the file stores.

    Example:
        >>> import pathlib, tempfile
        >>> import numpy as np
        >>> from safetensors.numpy import save_file
        >>> from jaxslim import checkpoints
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> save_file({"model.norm.weight": np.ones(4, np.float32)}, d / "model.safetensors")
        >>> _ = (d / "config.json").write_text('{"model_type": "llama"}')
        >>> with checkpoints.open(d) as src:
        ...     print(src.format, src.names(), src.shape("model.norm.weight"))
        ...     src.read("model.norm.weight")
        hf ['model.norm.weight'] (4,)
        array([1., 1., 1., 1.], dtype=float32)
    """

    path: str
    format: str

    @property
    @abc.abstractmethod
    def config(self) -> dict:
        """The Hugging Face `config.json` dict."""

    @property
    @abc.abstractmethod
    def metadata(self) -> dict:
        """The format's raw metadata."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every tensor name, in Hugging Face naming, layers in numeric order."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The Hugging Face (PyTorch) shape of `name`; reads no data."""

    @abc.abstractmethod
    def dtype(self, name: str) -> np.dtype:
        """The stored dtype of `name` (`ml_dtypes.bfloat16` for bf16; `float32` for a GGUF
        block-quantized type, which `read` dequantizes)."""

    @abc.abstractmethod
    def _read(self, name: str) -> np.ndarray:
        """Read one tensor (name already checked), HF layout, stored dtype."""

    def read(self, name: str, dtype=None) -> np.ndarray:
        """Read one tensor into memory: Hugging Face layout, the stored dtype or `dtype`.

        Only this tensor's bytes are read (the file is memory-mapped). GGUF block-quantized
        tensors (Q4_0, Q8_0, Q4_K, ...) come back dequantized to float32 with
        `gguf.quants.dequantize`; llama.cpp's q/k row permutation is undone, so the result equals
        the Hugging Face tensor the GGUF was converted from (up to its quantization).

        Example:
            >>> # w = src.read("model.layers.0.self_attn.q_proj.weight", dtype=np.float32)
        """
        self._check_name(name, "read")
        out = self._read(name)
        if dtype is not None:
            out = out.astype(dtype, copy=False)
        return out

    def read_rows(self, name: str, rows, dtype=None) -> np.ndarray:
        """Rows ``rows`` (an integer array) of tensor ``name``: ``read(name, dtype)[rows]``.

        A Hugging Face directory reads only those rows' bytes (the calibration tokens' rows of
        an embedding table, without the table); other sources read the tensor first.
        """
        return self.read(name, dtype)[np.asarray(rows)]

    def tokenizer_json(self) -> str | None:
        """The text of a Hugging Face `tokenizer.json` for this checkpoint, or None.

        A HF directory returns its own `tokenizer.json`; a GGUF file builds one from its
        embedded vocabulary (see `checkpoints.open`). Load it with
        `tokenizers.Tokenizer.from_str(src.tokenizer_json())`.
        """
        return None

    def check(self) -> None:
        """Check every tensor's shape against `config` (headers only, reads no data).

        `open` calls it. Raises `ValueError` naming the file, the tensor, the expected and the
        found shape, e.g. a `q_proj.weight` that is not `(heads * head_dim, hidden)`.
        """
        layers = self.config.get("num_hidden_layers")
        for name in self.names():
            if layers is not None and name.startswith("model.layers."):
                index = int(name.split(".")[2])
                if index >= layers:
                    raise ValueError(
                        f"jaxslim.checkpoints.open: {self.path!r}: tensor {name!r} belongs to "
                        f"layer {index} but the config says num_hidden_layers={layers}; fix "
                        f"num_hidden_layers in the config or remove the extra tensors"
                    )
            want = _names.expected_shape(name, self.config)
            got = self.shape(name)
            if want is not None and got != want:
                raise ValueError(
                    f"jaxslim.checkpoints.open: {self.path!r}: tensor {name!r} has shape {got} but "
                    f"the config (hidden_size, num_attention_heads, num_key_value_heads, head_dim, "
                    f"intermediate_size, vocab_size) says {want}; the config does not describe "
                    f"these weights: fix config.json or use the checkpoint it belongs to "
                    f"(open(..., check=False) skips this check)"
                )

    @abc.abstractmethod
    def close(self) -> None:
        """Release the memory maps. Arrays already returned by `read` stay valid."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<checkpoints.Source {self.format} {self.path!r}: {len(self.names())} tensors>"

    def _check_name(self, name: str, what: str) -> None:
        if name not in self._name_set():
            stem = name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
            near = [n for n in self.names() if stem in n][:3]
            raise KeyError(
                f"checkpoints.Source.{what}: {self.path!r} has no tensor {name!r} (names are "
                f"Hugging Face names, e.g. {near or self.names()[:3]}; see src.names())"
            )

    def _name_set(self) -> frozenset:
        cached = getattr(self, "_names_cache", None)
        if cached is None:
            cached = self._names_cache = frozenset(self.names())
        return cached


def _is_tree(path: str) -> bool:
    """An Orbax checkpoint directory (no ``config.json``) or a ``.npz`` written by jaxslim."""
    if os.path.isdir(path):
        meta = os.path.isfile(os.path.join(path, "_METADATA"))
        return meta and not os.path.isfile(os.path.join(path, "config.json"))
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return "__jaxslim__.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


@public("checkpoints.open")
def open(path: str | os.PathLike, *, check: bool = True) -> Source:  # noqa: A001
    """Open a pretrained checkpoint for lazy, per-tensor reading in Hugging Face naming.

    `path` is either
      - a Hugging Face model directory: `config.json` and `model.safetensors`, or shards listed
        in `model.safetensors.index.json` (`tokenizer.json` is picked up when present), or
      - a `.gguf` file (llama.cpp) of a Llama, Mistral, Qwen2, Qwen3 or SmolLM2 model. Names are
        mapped to HF (`blk.0.attn_q.weight` -> `model.layers.0.self_attn.q_proj.weight`), shapes
        reported in HF order, quantized tensors dequantized to float32 on `read`, llama's q/k
        row permutation undone, and `config` derived from the metadata (`model_type`,
        `hidden_size`, ..., `rope_scaling` of type llama3 from `rope_freqs`,
        `tie_word_embeddings` when there is no `output.weight`). `tokenizer_json()` builds a
        `tokenizers` byte-level BPE from `tokenizer.ggml.tokens` / `tokenizer.ggml.merges`.

    Orbax checkpoint directories and `.npz` files written by jaxslim (parameter trees, what
    `checkpoints.save` writes) are recognized and refused with a pointer to `checkpoints.load`,
    which reads them whole. Nothing is unpickled: a directory with only `pytorch_model.bin` is
    refused. With `check=True` every tensor's shape is compared to the config (headers only).

    Args:
      path: a model directory or a `.gguf` file.
      check: compare tensor shapes with the config at open time.

    Returns:
      A `Source`; use it as a context manager or call `close()`.

    Raises:
      ValueError: a missing path, no `config.json`, a missing shard, a truncated or corrupt
        file, an unknown GGUF tensor type or architecture, a shape the config disagrees with;
        the message names the file, the tensor and the fix.
      ImportError: `safetensors` / `gguf` not installed (`pip install 'jaxslim[models]'`).

    Example:
        >>> from jaxslim import checkpoints
        >>> # with checkpoints.open("SmolLM2-135M-Instruct.Q4_1.gguf") as src:
        >>> #     src.config["num_hidden_layers"], src.shape("model.embed_tokens.weight")
        >>> # (30, (49152, 576))
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(
            f"jaxslim.checkpoints.open: {path!r} does not exist; pass a Hugging Face model "
            f"directory (config.json + *.safetensors) or a .gguf file"
        )
    if _is_tree(path):
        raise ValueError(
            f"jaxslim.checkpoints.open: {path!r} is a parameter tree (an Orbax checkpoint "
            f"directory or a .npz file), not a model checkpoint: read it whole with "
            f"checkpoints.load(path)"
        )
    if os.path.isdir(path):
        from jaxslim.checkpoints._safetensors import SafetensorsSource

        src = SafetensorsSource(path)
    else:
        with builtins.open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF" and not path.endswith(".gguf"):
            raise ValueError(
                f"jaxslim.checkpoints.open: {path!r} is neither a directory nor a GGUF file "
                f"(first bytes {magic!r}, a GGUF file starts with b'GGUF'); for safetensors pass "
                f"the model directory that holds config.json"
            )
        from jaxslim.checkpoints._gguf import GGUFSource

        src = GGUFSource(path)
    if check:
        try:
            src.check()
        except Exception:
            src.close()
            raise
    return src


@public("checkpoints.read_tree")
def read_tree(src: Source, *, dtype=None) -> dict[str, np.ndarray]:
    """Every tensor of `src`, by Hugging Face name, in memory (for small models).

    Args:
      src: an open `Source`.
      dtype: cast every tensor to this dtype (e.g. `np.float32`); None keeps the stored dtype.

    Returns:
      `{name: array}` in `src.names()` order.

    Example:
        >>> from jaxslim import checkpoints
        >>> # with checkpoints.open(path) as src:
        >>> #     params = checkpoints.read_tree(src)
        >>> #     params["model.norm.weight"].shape
    """
    return {name: src.read(name, dtype) for name in src.names()}
