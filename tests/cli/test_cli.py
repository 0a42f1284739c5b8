"""The jaxslim command: inspect counts exactly; compress equals the Python API bit for bit."""

import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxslim import cli
from jaxslim.quant import QuantSpec, quantize, storage


def _tree():
    kernel = jnp.zeros((4, 8)).at[0, :3].set(1.0)
    return {"dense": {"kernel": kernel, "bias": jnp.ones(8)}, "step": jnp.array(7, jnp.int32)}


def _check(text):
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert "dense/kernel" in lines and "| 3 |" in lines["dense/kernel"]  # nonzeros
    assert text.strip().splitlines()[-1].startswith("3 leaves, 41 entries, 12 nonzero")


def test_inspect_orbax_checkpoint(tmp_path, capsys):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", _tree())
    assert cli.main(["inspect", str(tmp_path / "ckpt")]) == 0
    _check(capsys.readouterr().out)


def test_inspect_npz(tmp_path):
    t = _tree()
    flat = {
        "dense/kernel": t["dense"]["kernel"],
        "dense/bias": t["dense"]["bias"],
        "step": t["step"],
    }
    np.savez(tmp_path / "p.npz", **{k: np.asarray(v) for k, v in flat.items()})
    _check(cli.inspect(str(tmp_path / "p.npz")))


def test_inspect_bad_path(tmp_path):
    with pytest.raises(cli.InputError, match="missing: no such file"):
        cli.inspect(str(tmp_path / "missing"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(
        ValueError, match=r"x.txt: expected an Orbax checkpoint directory or a .npz"
    ):
        cli.inspect(str(tmp_path / "x.txt"))


def _rows(text):
    """``{path: [cells]}`` of an inspect table."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| path"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def _qtree():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    return {
        "w4": quantize(x, QuantSpec(4, axis=-1)),
        "w8": quantize(x, QuantSpec(8, axis=-1, symmetric=False)),
        "b": jnp.ones(8, jnp.bfloat16),
    }


def _check_quantized(text):
    rows = _rows(text)
    # path, shape, dtype, bits, size, nonzeros, sparsity, bytes
    # int4 per-channel (16, 8): 16 * 8 / 2 bytes of packed codes + 8 float32 scales.
    assert rows["w4"][2:5] == ["int4 (float32)", "4", "128"] and rows["w4"][7] == "96"
    # int8 affine: 128 codes + 8 scales + 8 zero points.
    assert rows["w8"][2:4] == ["int8 (float32)", "8"] and rows["w8"][7] == "168"
    assert rows["b"][2:4] == ["bfloat16", "16"] and rows["b"][7] == "16"
    assert text.strip().splitlines()[-1].endswith(f"{96 + 168 + 16:,} bytes")


def test_inspect_quantized_orbax_checkpoint_counts_packed_bits(tmp_path, capsys):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", storage.to_checkpoint(_qtree()))
    assert cli.main(["inspect", str(tmp_path / "ckpt")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    _check_quantized(out)


def test_inspect_quantized_npz_counts_packed_bits(tmp_path):
    storage.save_npz(tmp_path / "q.npz", _qtree())
    _check_quantized(cli.inspect(str(tmp_path / "q.npz")))


def test_inspect_plain_bfloat16_npz(tmp_path):
    w = np.array([[0.0, 1.5], [2.0, 0.0]], np.float32).astype(ml_dtypes.bfloat16)
    np.savez(tmp_path / "p.npz", w=w)
    rows = _rows(cli.inspect(str(tmp_path / "p.npz")))
    assert rows["w"][2:8] == ["bfloat16", "16", "4", "2", "0.5000", "8"]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "inspect" in out and "jaxslim[demo]" in out


@pytest.mark.parametrize("missing", ["mnist1d", "tqdm"])
def test_demo_without_the_extra_names_it(monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    assert cli.main(["demo", "--steps", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"jaxslim: error: the demo needs the package {missing!r}, which is not installed: "
        "pip install 'jaxslim[demo]'"
    ]


def test_internal_error_is_one_line_exit_1(monkeypatch, capsys):
    def boom(path):
        raise RuntimeError("bug\nsecond line")

    monkeypatch.setattr(cli, "inspect", boom)
    monkeypatch.delenv("JAXSLIM_TRACEBACK", raising=False)
    assert cli.main(["inspect", "x"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "jaxslim: internal error: RuntimeError: bug (set JAXSLIM_TRACEBACK=1 for the traceback "
        "and please report it)"
    ]
    monkeypatch.setenv("JAXSLIM_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="bug"):
        cli.main(["inspect", "x"])


_BLOCK_EXTRAS = """
import importlib, pathlib, sys

class Block:  # an import hook: the extras' packages are not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Block())
root = pathlib.Path({root!r})
mods = sorted(
    ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in root.rglob("*.py")
    if "demo" not in p.parts
)
for m in mods:
    importlib.import_module(m)
from jaxslim import cli
assert cli.main(["demo"]) == 2
print(len(mods))
"""


def test_core_imports_without_the_extras():
    """`pip install jaxslim` (jax, flax, optax, chex, numpy) imports every module but the demo."""
    import pathlib
    import subprocess
    import tomllib

    import jaxslim

    root = pathlib.Path(jaxslim.__file__).parent
    project = tomllib.loads((root.parent / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert names == {"jax", "flax", "optax", "chex", "numpy"}
    assert "jaxslim[demo,orbax,models]" in project["optional-dependencies"]["dev"]
    blocked = ["mnist1d", "tqdm", "matplotlib", "sklearn", "orbax", "hypothesis", "pytest"]
    blocked += ["safetensors", "gguf", "tokenizers", "torch", "transformers"]
    code = _BLOCK_EXTRAS.format(blocked=blocked, root=str(root))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 20
    assert r.stderr.strip().endswith("pip install 'jaxslim[demo]'")


# --- compress ----------------------------------------------------------------------------------

_RECIPE = """
[[prune]]
where = "kernel"
sparsity = 0.5
scope = "global"

[quant]
[[quant.rules]]
where = "l2"
spec = "float"
[[quant.rules]]
where = "l1/kernel"
spec = {bits = 4, axis = -1, group_size = 4}
[[quant.rules]]
where = "bias"
spec = {bits = 8, symmetric = false}
"""


def _nnx_model():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    return MLP(nnx.Rngs(0))


def _python_api(state):
    from jaxslim import prune, quant

    mask = prune.topk_mask(prune.magnitude(state), 0.5, scope="global", where="kernel")
    state = prune.apply_mask(state, mask)
    rules = [
        ("l2", None),
        ("l1/kernel", QuantSpec(4, axis=-1, group_size=4)),
        ("bias", QuantSpec(8, symmetric=False)),
    ]
    return quant.quantize_params(state, rules)[0]


def _unwrap(tree):
    """Orbax's form of an NNX state (``{"kernel": {"value": x}}``) as a pure dict."""
    return jax.tree.map(
        lambda d: d["value"], tree, is_leaf=lambda d: isinstance(d, dict) and set(d) == {"value"}
    )


@pytest.mark.parametrize("suffix", ["", ".npz"])
def test_compress_nnx_round_trip_equals_python_api(tmp_path, capsys, suffix):
    from flax import nnx

    from jaxslim import quant

    model = _nnx_model()
    state = nnx.state(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
    (tmp_path / "r.toml").write_text(_RECIPE)
    out = tmp_path / f"out{suffix}"
    argv = ["compress", str(tmp_path / "ckpt"), "--recipe", str(tmp_path / "r.toml"), "-o"]
    assert cli.main([*argv, str(out)]) == 0
    text, err = capsys.readouterr()
    assert err == ""
    assert text.strip().splitlines()[-1].startswith("4 leaves: 848 -> 485 bytes")
    assert "| l1/kernel | (8, 16) | float32 | int4 (float32) | 128 |" in text

    if suffix:
        restored = storage.load_npz(out)
    else:
        with ocp.StandardCheckpointer() as ckpt:
            restored = storage.from_checkpoint(ckpt.restore(out))  # no target
    restored = _unwrap(restored)
    ref = nnx.to_pure_dict(_python_api(state))
    assert jax.tree.structure(restored, is_leaf=quant.is_qarray) == jax.tree.structure(
        ref, is_leaf=quant.is_qarray
    )
    for a, b in zip(
        jax.tree.leaves(restored, is_leaf=quant.is_qarray),
        jax.tree.leaves(ref, is_leaf=quant.is_qarray),
        strict=True,
    ):
        assert quant.is_qarray(a) == quant.is_qarray(b)
        if quant.is_qarray(a):
            assert a.spec == b.spec and a.shape == b.shape
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit

    # The model runs on the restored weights and gives the Python API's output exactly.
    x = jnp.linspace(-1.0, 1.0, 24).reshape(3, 8)
    nnx.replace_by_pure_dict(state, quant.dequantize_params(restored))
    nnx.update(model, state)
    got = model(x)
    other = _nnx_model()
    ref_state = nnx.state(other)
    nnx.replace_by_pure_dict(ref_state, quant.dequantize_params(ref))
    nnx.update(other, ref_state)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(other(x)))
    assert int((np.asarray(nnx.state(model)["l2"]["kernel"].value) == 0).sum()) > 0  # pruned


def test_compress_print_recipe_is_the_parsed_example(capsys):
    from jaxslim import recipe

    assert cli.main(["compress", "--print-recipe"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(recipe.EXAMPLE)
    rest = text[len(recipe.EXAMPLE) :].strip()
    assert rest.startswith("# Ready recipes") and all(n in rest for n in recipe.NAMED)
    assert recipe.parse(text).prune[1].structure.n == 2


def test_compress_progress_bar_on_large_trees(tmp_path, capsys, monkeypatch):
    tree = {f"layer{i}": {"kernel": jnp.full((4, 4), float(i + 1))} for i in range(5)}
    storage.save_npz(tmp_path / "in.npz", tree)
    (tmp_path / "r.toml").write_text("[quant]\ndefault = {bits = 8}\n")
    argv = ["compress", str(tmp_path / "in.npz"), "--recipe", str(tmp_path / "r.toml"), "-o"]
    assert cli.main([*argv, str(tmp_path / "a.npz")]) == 0
    assert "quantize" not in capsys.readouterr().err  # small tree: no bar
    monkeypatch.setattr(cli, "PROGRESS_MIN_LEAVES", 5)
    assert cli.main([*argv, str(tmp_path / "b.npz")]) == 0
    assert "quantize:   0%|          | 0/5 [" in capsys.readouterr().err
    out = storage.load_npz(tmp_path / "b.npz")
    assert out["layer4"]["kernel"].spec == QuantSpec(8)
    # --force replaces the output
    assert cli.main([*argv, str(tmp_path / "b.npz"), "--force"]) == 0


# --- demo sections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, called, kwargs",
    [
        (["demo", "--sweep"], "sweep", {"steps": 200, "seed": 0}),
        (["demo", "--sweep", "--steps", "7", "--seed", "2"], "sweep", {"steps": 7, "seed": 2}),
        (["demo", "--lm"], "lm", {"steps": 600, "recover": 150, "seed": 0, "oneshot": False}),
        (
            ["demo", "--lm", "--oneshot", "--steps", "30"],
            "lm",
            {"steps": 30, "recover": 7, "seed": 0, "oneshot": True},
        ),
        (["demo", "--oneshot"], "mnist1d", {"steps": 3000, "seed": 0, "oneshot": True}),
    ],
)
def test_demo_flags_pick_the_section(monkeypatch, capsys, argv, called, kwargs):
    from jaxslim.demo import reports

    calls = []
    for name in ("mnist1d", "lm", "sweep"):
        monkeypatch.setattr(reports, name, lambda _n=name, **kw: calls.append((_n, kw)) or "REPORT")
    assert cli.main(argv) == 0
    assert calls == [(called, kwargs)]
    assert capsys.readouterr().out.startswith("REPORT\n\ntotal ")


def _tiny_mnist1d(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(48, 40)).astype(np.float32)
    y = rng.integers(0, 10, 48).astype(np.int32)
    return x, y, x[:16], y[:16]


@pytest.mark.standard_promotion  # optax 0.2.8's Adam bias correction mixes int and float
def test_sweep_demo_prints_the_accuracy_vs_params_table_and_the_saving(monkeypatch):
    from jaxslim.demo import data as D
    from jaxslim.demo import sweep

    monkeypatch.setattr(D, "load_mnist1d", _tiny_mnist1d)
    from jaxslim.demo import reports

    text = reports.sweep(steps=2, depths=(1, 2), seeds=1, width=4, loop_variants=1)
    assert text.startswith("# jaxslim demo --sweep: activation x depth x seeds on MNIST-1D")
    table = [line for line in text.splitlines() if line.startswith("|")]
    # one column per depth with its parameter count (40*4+4 [+ 4*4+4] + 4*10+10)
    assert table[0] == "| activation | depth 1 (214 params) | depth 2 (234 params) |"
    assert [line.split(" | ")[0][2:] for line in table[2:]] == list(sweep.ACTIVATIONS)
    accs = [
        float(cell.split(" +- ")[0])
        for line in table[2:]
        for cell in line.strip("| ").split(" | ")[1:]
    ]
    assert len(accs) == 10 and all(0.0 <= a <= 1.0 for a in accs)
    assert all(abs(a * 16 - round(a * 16)) < 0.01 for a in accs)  # k / 16 to 3 decimals
    assert "10 variants (5 activations x 2 depths x 1 seeds) vmapped" in text
    assert "x faster vmapped" in text
    assert "grow (splice.deepen) relu depth 1 -> 2: max |logit change| 0.0e+00" in text
    assert "shrink (splice.drop_layer) relu depth 2 -> 1" in text
