"""Every Python example in README.md runs as written (each block is self-contained)."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.standard_promotion
@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, capsys):
    namespace = {"__name__": f"readme_block_{i}"}
    # README code is user code: it broadcasts biases the usual way.
    with jax.numpy_rank_promotion("allow"):
        exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), namespace)
    if "report.sparsity" in BLOCKS[i]:
        printed = capsys.readouterr().out
        assert abs(float(printed.split()[-1]) - 0.9) < 1e-4  # round(0.9 * n) per kernel
