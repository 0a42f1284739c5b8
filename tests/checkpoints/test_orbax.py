"""QArrays saved with plain ``orbax.checkpoint`` (no jaxslim on the save side): a TrainState-like
tree round-trips bit-identically through ``restore_qarrays(tree, like=...)``, ``jaxslim inspect``
reports the true storage bits (4 for int4 group-32, 8 for int8), and what the layout cannot tell
is reported as unknown, never guessed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxslim import checkpoints, cli
from jaxslim.quant import QArray, QuantSpec, dequantize, quantize

ocp = pytest.importorskip("orbax.checkpoint")

RNG = np.random.default_rng(0)
W1 = jnp.asarray(RNG.normal(size=(64, 96)).astype(np.float32))
W2 = jnp.asarray(RNG.normal(size=(96, 32)).astype(np.float32))
INT4 = QuantSpec(4, axis=-1, group_size=32)
INT8 = QuantSpec(8, axis=-1)


def _state(w1=W1, w2=W2):
    """What a user's TrainState holds: step, QArray params, a float head, optimizer state."""
    params = {
        "layers": [{"kernel": quantize(w1, INT4)}, {"kernel": quantize(w2, INT8)}],
        "head": {"kernel": jnp.ones((32, 4)), "bias": jnp.zeros(4)},
    }
    opt = optax.adam(1e-3).init({"head": params["head"]})
    return {"step": jnp.array(7, jnp.int32), "params": params, "opt_state": opt}


def _plain_save(path, tree):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path.resolve(), tree)


def _plain_restore(path):
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path.resolve())


def test_plain_orbax_drops_the_spec_and_the_dict_layout_is_recognized(tmp_path):
    """What a QArray becomes: the dict of its four pytree children, ``None`` kept."""
    _plain_save(tmp_path / "ck", _state())
    raw = _plain_restore(tmp_path / "ck")
    d = raw["params"]["layers"][0]["kernel"]
    assert isinstance(d, dict) and sorted(d) == ["scale", "scale_scale", "values", "zero_point"]
    assert d["zero_point"] is None and d["scale_scale"] is None
    assert checkpoints.is_plain_qarray(d)
    assert not checkpoints.is_plain_qarray(raw["params"]["head"])
    assert checkpoints.plain_qarray_bits(d) == (4, (64, 96))
    assert checkpoints.plain_qarray_bits(raw["params"]["layers"][1]["kernel"]) == (8, (96, 32))


def test_restore_qarrays_is_bit_identical(tmp_path):
    state = _state()
    _plain_save(tmp_path / "ck", state)
    back = checkpoints.restore_qarrays(_plain_restore(tmp_path / "ck"), like=state)
    for i in range(2):
        q, r = state["params"]["layers"][i]["kernel"], back["params"]["layers"][i]["kernel"]
        assert isinstance(r, QArray) and (r.spec, r.shape, r.dtype) == (q.spec, q.shape, q.dtype)
        for name in ("values", "scale"):
            a, b = np.asarray(getattr(q, name)), np.asarray(getattr(r, name))
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
        np.testing.assert_array_equal(np.asarray(dequantize(r)), np.asarray(dequantize(q)))
    assert int(back["step"]) == 7
    np.testing.assert_array_equal(np.asarray(back["params"]["head"]["kernel"]), np.ones((32, 4)))


def test_restore_qarrays_from_an_abstract_template_and_through_load(tmp_path):
    """The template can be ``jax.eval_shape`` of the code that made the tree: no data needed."""
    state = _state()
    _plain_save(tmp_path / "ck", state)
    like = jax.eval_shape(_state, W1, W2)
    back = checkpoints.load(tmp_path / "ck", like=like)
    r = back["params"]["layers"][0]["kernel"]
    assert isinstance(r, QArray) and r.spec == INT4
    np.testing.assert_array_equal(
        np.asarray(r.values), np.asarray(state["params"]["layers"][0]["kernel"].values)
    )
    # Without the template the spec-less dicts stay dicts: nothing is guessed.
    assert isinstance(checkpoints.load(tmp_path / "ck")["params"]["layers"][0]["kernel"], dict)


def test_inspect_reports_the_true_bits_of_plain_orbax_qarrays(tmp_path, capsys):
    _plain_save(tmp_path / "ck", _state())
    assert cli.main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if "|" in line}
    int4 = rows["params/layers/0/kernel"].split(" | ")
    int8 = rows["params/layers/1/kernel"].split(" | ")
    # path | shape | dtype | bits | size | nonzeros | sparsity | bytes
    assert int4[1:5] == ["(64, 96)", "int4 codes (spec not saved)", "4", "6,144"]
    assert int8[1:5] == ["(96, 32)", "int8 codes (spec not saved)", "8", "3,072"]
    q4, q8 = quantize(W1, INT4), quantize(W2, INT8)
    assert int4[7].rstrip(" |") == f"{q4.nbytes:,}" and int8[7].rstrip(" |") == f"{q8.nbytes:,}"
    assert "params/layers/0/kernel/values" not in out  # one row, not the codes as uint8
    assert "2 QArrays saved without their spec" in out


def test_a_width_the_layout_does_not_pin_is_unknown(tmp_path, capsys):
    """Per-tensor or axis-less grouped scales: int4 and int2 codes take the same bytes."""
    tree = {"g": quantize(W1, QuantSpec(4, group_size=32)), "t": quantize(W2, QuantSpec(2))}
    _plain_save(tmp_path / "ck", tree)
    raw = _plain_restore(tmp_path / "ck")
    assert checkpoints.plain_qarray_bits(raw["g"]) == (None, None)
    assert checkpoints.plain_qarray_bits(raw["t"]) == (None, None)
    assert cli.main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "| g | (64, 48) | packed codes (spec not saved) | ? | ? | ? | ? |" in out
    back = checkpoints.restore_qarrays(raw, like=tree)
    assert back["g"].spec == QuantSpec(4, group_size=32) and back["t"].spec == QuantSpec(2)


def test_compress_refuses_plain_orbax_qarrays(tmp_path, capsys):
    _plain_save(tmp_path / "ck", _state())
    (tmp_path / "r.toml").write_text("[[prune]]\nsparsity = 0.5\n")
    argv = ["compress", str(tmp_path / "ck"), "--recipe", str(tmp_path / "r.toml")]
    assert cli.main([*argv, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 2 quantized leaves; compress a float checkpoint" in err


@pytest.mark.parametrize(
    "like, match",
    [
        pytest.param(
            lambda s: {**s, "params": {**s["params"], "layers": s["params"]["layers"][:1]}},
            r"'params/layers/1/kernel': like has no QArray there",
            id="template-lacks-one",
        ),
        pytest.param(
            lambda s: {**s, "extra": quantize(W2, INT8)},
            r"'extra': like has a QArray there but tree has none",
            id="tree-lacks-one",
        ),
        pytest.param(
            lambda s: {
                **s,
                "params": {
                    **s["params"],
                    "layers": [{"kernel": quantize(W1, INT8)}, s["params"]["layers"][1]],
                },
            },
            r"'params/layers/0/kernel': values are uint8, expected int8; pass like=",
            id="wrong-spec",
        ),
    ],
)
def test_restore_qarrays_with_the_wrong_template_names_the_leaf(tmp_path, like, match):
    state = _state()
    _plain_save(tmp_path / "ck", state)
    raw = _plain_restore(tmp_path / "ck")
    with pytest.raises(ValueError, match=r"^checkpoints.restore_qarrays: " + match):
        checkpoints.restore_qarrays(raw, like=like(state))


def test_flax_train_state_with_qarrays_through_plain_orbax(tmp_path, capsys):
    """A flax TrainState saved as is: restored without a target, rebuilt with like=state."""
    train_state = pytest.importorskip("flax.training.train_state")
    params = {"w4": quantize(W1, INT4), "w8": quantize(W2, INT8), "head": jnp.ones((32, 4))}
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.identity())
    _plain_save(tmp_path / "ck", state)
    assert cli.main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "| params/w4 | (64, 96) | int4 codes (spec not saved) | 4 |" in out
    assert "| params/w8 | (96, 32) | int8 codes (spec not saved) | 8 |" in out
    back = checkpoints.restore_qarrays(_plain_restore(tmp_path / "ck"), like=state)
    for k in ("w4", "w8"):
        q, r = params[k], back["params"][k]
        assert isinstance(r, QArray) and r.spec == q.spec
        assert np.asarray(r.values).tobytes() == np.asarray(q.values).tobytes()
        assert np.asarray(r.scale).tobytes() == np.asarray(q.scale).tobytes()
    assert int(back["step"]) == 0
