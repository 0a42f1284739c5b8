"""Hugging Face model directories: `config.json` + `model.safetensors` or shards listed in
`model.safetensors.index.json`, read one memory-mapped tensor at a time."""

import glob
import json
import os
import struct
from typing import NamedTuple

import ml_dtypes
import numpy as np

from jaxslim.checkpoints import _names
from jaxslim.checkpoints._source import Source, require

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class _Entry(NamedTuple):
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    stop: int


def _read_range(file: str, start: int, stop: int) -> np.ndarray:
    out = np.empty(stop - start, np.uint8)
    with open(file, "rb") as f:
        f.seek(start)
        if f.readinto(memoryview(out)) != stop - start:
            raise _error(file, "is truncated (a tensor ends past the end of the file)")
    return out


def _error(path: str, what: str) -> ValueError:
    return ValueError(f"jaxslim.checkpoints.open: {path!r}: {what}")


def _read_header(file: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data begins."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise _error(
                file,
                "not a safetensors file or truncated (its 8-byte header length "
                f"{n} does not fit the {size}-byte file); download it again",
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise _error(file, f"corrupt safetensors header ({e}); download it again") from e
    return header, 8 + n


def _entries(file: str) -> tuple[dict[str, _Entry], dict]:
    """Validate one safetensors file with the `safetensors` package, then index its tensors."""
    safetensors = require("safetensors")
    try:
        with safetensors.safe_open(file, framework="numpy"):
            pass
    except Exception as e:  # SafetensorError: truncated data, overlapping offsets, bad header
        raise _error(
            file,
            f"truncated or corrupt safetensors file (safetensors says: {e}); "
            "download it again or re-save it with safetensors.numpy.save_file",
        ) from e
    header, base = _read_header(file)
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise _error(
                file,
                f"tensor {name!r} has dtype {info.get('dtype')!r}, which "
                f"jaxslim.checkpoints cannot read (known: {', '.join(_DTYPES)}); "
                "convert the checkpoint to bf16/f16/f32",
            )
        begin, end = info["data_offsets"]
        out[name] = _Entry(
            file, dtype, tuple(int(d) for d in info["shape"]), base + begin, base + end
        )
    return out, meta


def _shard_files(path: str) -> tuple[list[str], dict | None]:
    """The safetensors files of a model directory, and the index weight map if sharded."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise _error(
                index,
                f"not a valid index ({e!r}): it must be JSON with a "
                "'weight_map' {tensor name: shard file}; re-download it",
            ) from e
        files = sorted(set(weight_map.values()))
        for shard in files:
            if not os.path.exists(os.path.join(path, shard)):
                users = sorted(n for n, s in weight_map.items() if s == shard)
                raise _error(
                    index,
                    f"lists shard {shard!r} (for {len(users)} tensors, e.g. "
                    f"{users[0]!r}) but {os.path.join(path, shard)!r} does not exist; "
                    "download the missing shard into the directory",
                )
        return [os.path.join(path, s) for s in files], weight_map
    if os.path.exists(os.path.join(path, _SINGLE)):
        return [os.path.join(path, _SINGLE)], None
    pickles = glob.glob(os.path.join(path, "pytorch_model*.bin")) + glob.glob(
        os.path.join(path, "*.pt*")
    )
    if pickles:
        raise _error(
            path,
            f"holds only PyTorch pickles ({os.path.basename(pickles[0])}), which "
            "jaxslim never unpickles; convert the model to safetensors (in Python: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, "
            "safe_serialization=True)) and open the directory again",
        )
    raise _error(
        path,
        f"has no {_SINGLE} and no {_INDEX}; pass a Hugging Face model directory "
        "with safetensors weights, or a .gguf file",
    )


class SafetensorsSource(Source):
    """A Hugging Face model directory (see `checkpoints.open`)."""

    format = "hf"

    def __init__(self, path: str):
        self.path = path
        files, weight_map = _shard_files(path)
        config_file = os.path.join(path, "config.json")
        if not os.path.exists(config_file):
            raise _error(
                path,
                "has no config.json; copy the model's config.json (from the Hugging "
                "Face repository it came from) into the directory",
            )
        try:
            with open(config_file) as f:
                self._config = json.load(f)
        except ValueError as e:
            raise _error(config_file, f"is not valid JSON ({e}); re-download it") from e
        self._entries: dict[str, _Entry] = {}
        self._metadata: dict = {}
        for file in files:
            entries, meta = _entries(file)
            self._entries.update(entries)
            self._metadata.update(meta)
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self._entries:
                    raise _error(
                        os.path.join(path, shard),
                        f"has no tensor {name!r}, which "
                        f"{_INDEX} places there; the shard is incomplete or from another "
                        "checkpoint: download it again",
                    )
        self._names = sorted(self._entries, key=_names.natural_key)

    @property
    def config(self) -> dict:
        return self._config

    @property
    def metadata(self) -> dict:
        return self._metadata

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name, "shape")
        return self._entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        self._check_name(name, "dtype")
        return self._entries[name].dtype

    def _read(self, name: str) -> np.ndarray:
        # A plain read into a fresh buffer, not a memory map: pages of a mapped file stay
        # resident in the process (and count in its RSS) after the tensor is freed, so a
        # block-by-block pass over a large checkpoint would keep every block's bytes mapped.
        e = self._entries[name]
        return _read_range(e.file, e.start, e.stop).view(e.dtype).reshape(e.shape)

    def read_rows(self, name: str, rows, dtype=None) -> np.ndarray:
        """Rows ``rows`` (sorted or not, repeats allowed) of a tensor, reading only those rows'
        bytes (an embedding table's used tokens without reading the table)."""
        self._check_name(name, "read_rows")
        e = self._entries[name]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = e.shape[0] if e.shape else 0
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise _error(
                e.file,
                f"read_rows({name!r}): rows must be in [0, {n}), got "
                f"{rows[(rows < 0) | (rows >= n)][:5].tolist()}",
            )
        row_bytes = (e.stop - e.start) // max(n, 1)
        out = np.empty((rows.size, row_bytes), np.uint8)
        with open(e.file, "rb") as f:
            for i, r in enumerate(rows):
                f.seek(e.start + int(r) * row_bytes)
                if f.readinto(memoryview(out[i])) != row_bytes:
                    raise _error(e.file, f"is truncated inside tensor {name!r}; download it again")
        res = out.view(e.dtype).reshape(rows.size, *e.shape[1:])
        return res if dtype is None else res.astype(dtype, copy=False)

    def tokenizer_json(self) -> str | None:
        file = os.path.join(self.path, "tokenizer.json")
        if not os.path.exists(file):
            return None
        with open(file, encoding="utf-8") as f:
            return f.read()

    def close(self) -> None:
        pass  # every read opens and closes its file
