"""Invariants of the model: config checks, sizes, logical axes, causality, packing, RoPE,
scan vs loop, remat, mixed precision and the attention dispatch."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.kernels import reference
from instructjax.model import attention as attention_lib
from instructjax.model import transformer as tm
from instructjax.model.config import ModelConfig, count_params

# Tiny but complete: GQA (4 query heads on 2 kv heads), qkv bias, untied head.
BASE = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=48, max_seq_len=32, qkv_bias=True, tie_embeddings=False)
# Two float32 computations of the same math that differ only in summation order (packed vs
# alone, scan vs loop, remat vs not) agree to a few float32 ulps of unit-scale logits;
# 1e-5 leaves ~10x headroom while any leak between tokens shows up at 1e-2 or more.
SAME_MATH_TOL = dict(atol=1e-5, rtol=1e-5)
LOGICAL_NAMES = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers"}


def normal(key, shape, dtype=jnp.float32):
    # Drawn flat and reshaped: on this CPU, XLA takes seconds to compile threefry for
    # rank-3+ shapes but milliseconds for rank 1 (the values are equally random).
    return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def random_tokens(seed, shape, vocab_size=BASE.vocab_size):
    flat = jax.random.randint(jax.random.key(seed), (int(np.prod(shape)),), 0, vocab_size)
    return flat.reshape(shape).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def forward(cfg):
    """Jitted logits(params, tokens, positions, segment_ids), compiled once per config."""
    return jax.jit(lambda params, tokens, positions, segment_ids: tm.Transformer(cfg).apply(
        {"params": params}, tokens, positions, segment_ids))


@functools.lru_cache(maxsize=None)
def params_for(cfg, seed=0):
    """init_params, once per config: each init costs a compile."""
    return tm.init_params(cfg, jax.random.key(seed))


def arange_positions(B, T, offset=0):
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :] + offset, (B, T))


# ---------------------------------------------------------------- config

def test_config_unknown_key_is_named():
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dict({**BASE.to_dict(), "num_layer": 3})
    message = str(err.value)
    assert "num_layer" in message and "num_layers" in message and "rope_theta" in message


def test_config_round_trip_and_missing_key():
    assert ModelConfig.from_dict(BASE.to_dict()) == BASE
    d = BASE.to_dict()
    del d["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("field,value,named", [
    ("remat_policy", "everything", "'none', 'full', 'save_dots'"),
    ("attention_impl", "flash", "'xla', 'pallas', 'cudnn'"),
    ("dtype", "bf16", "bfloat16"),
    ("param_dtype", "float64", "float32"),
    ("num_kv_heads", 3, "multiple"),
    ("head_dim", 7, "even"),
    ("num_layers", 0, "positive"),
])
def test_config_rejects_bad_values(field, value, named):
    with pytest.raises(ValueError) as err:
        BASE.replace(**{field: value})
    message = str(err.value)
    assert field in message and str(value) in message and named in message


# ---------------------------------------------------------------- sizes and logical axes

@pytest.mark.parametrize("tie,bias,kv_heads,scan", [
    (True, False, 4, True), (False, False, 2, True), (True, True, 1, False),
    (False, True, 2, False)])
def test_param_count_matches_closed_form(tie, bias, kv_heads, scan):
    cfg = BASE.replace(tie_embeddings=tie, qkv_bias=bias, num_kv_heads=kv_heads,
                       scan_layers=scan)
    # eval_shape gives init_params' exact pytree without spending time on the values.
    shapes = jax.eval_shape(lambda: tm.init_params(cfg, jax.random.key(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count_params(cfg)
    assert ("lm_head" in shapes) == (not tie)


@pytest.mark.parametrize("scan,tie", [(True, True), (True, False), (False, False)])
def test_every_param_has_one_logical_name_per_dim(scan, tie):
    cfg = BASE.replace(scan_layers=scan, tie_embeddings=tie)
    shapes = jax.eval_shape(lambda: tm.init_params(cfg, jax.random.key(0)))
    # The names sharded creation reads (train/state.py): those of the boxed init.
    boxed = jax.eval_shape(lambda: tm.init_boxed_params(tm.Transformer(cfg), jax.random.key(0)))
    specs = nn.get_partition_spec(boxed)
    assert jax.tree.structure(shapes) == jax.tree.structure(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for shape, spec in zip(jax.tree.leaves(shapes), flat_specs):
        assert len(spec) == len(shape.shape), (spec, shape)
        assert all(name in LOGICAL_NAMES for name in spec), spec
    if scan:
        query_spec = tuple(specs["layers"]["attn"]["query"]["kernel"])
        assert query_spec == ("layers", "embed", "heads", "head_dim")


# ---------------------------------------------------------------- causality and packing

def test_causal_and_segment_isolation_by_gradient():
    """d logits[b, t] / d block-input[b, s] is exactly 0 unless s may be seen from t."""
    B, T = 2, 16
    tokens = random_tokens(1, (B, T))
    # Row 0 is one document; row 1 packs two documents and padding.
    segment_ids = jnp.array([[1] * T, [1] * 6 + [2] * 7 + [0] * 3], jnp.int32)
    positions = jnp.array([list(range(T)), list(range(6)) + list(range(7)) + [0] * 3],
                          jnp.int32)
    model = tm.Transformer(BASE)
    # The 'perturbations' collection holds a zero added to the blocks' input (see
    # Transformer.perturb); its gradient is the gradient w.r.t. that continuous input.
    perturbations = {"embed_out": jnp.zeros((B, T, BASE.embed_dim), jnp.dtype(BASE.dtype))}
    params = params_for(BASE)
    with jax.numpy_rank_promotion("raise"):
        @jax.jit
        def input_grad(perturbations, t):
            def logits_at_t(perturbations):
                logits = model.apply({"params": params, "perturbations": perturbations},
                                     tokens, positions, segment_ids)
                return jnp.sum(jax.lax.dynamic_index_in_dim(logits, t, axis=1))
            return jax.grad(logits_at_t)(perturbations)["embed_out"]

        seg = np.asarray(segment_ids)
        for t in range(T):
            grad = np.asarray(input_grad(perturbations, t))
            for b in range(B):
                for s in range(T):
                    visible = s == t or (s < t and seg[b, s] == seg[b, t] != 0)
                    touched = np.any(grad[b, s] != 0.0)
                    assert touched == visible, (b, t, s, visible)


def test_packed_documents_match_documents_alone():
    doc_a, doc_b = random_tokens(2, (1, 5)), random_tokens(3, (1, 7))
    pad = jnp.zeros((1, 4), jnp.int32)
    packed = jnp.concatenate([doc_a, doc_b, pad], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7 + [0] * 4], jnp.int32)
    positions = jnp.array([list(range(5)) + list(range(7)) + [0] * 4], jnp.int32)
    params = params_for(BASE)
    fwd = forward(BASE)
    logits = fwd(params, packed, positions, segment_ids)
    alone_a = fwd(params, doc_a, arange_positions(1, 5), jnp.ones((1, 5), jnp.int32))
    alone_b = fwd(params, doc_b, arange_positions(1, 7), jnp.ones((1, 7), jnp.int32))
    np.testing.assert_allclose(logits[:, :5], alone_a, **SAME_MATH_TOL)
    np.testing.assert_allclose(logits[:, 5:12], alone_b, **SAME_MATH_TOL)
    chex.assert_tree_all_finite(logits)


def test_defaults_are_arange_positions_and_one_segment():
    B, T = 2, 12
    tokens = random_tokens(4, (B, T))
    params = params_for(BASE)
    default, hidden = jax.jit(lambda p, x: tm.Transformer(BASE).apply(
        {"params": p}, x, method="logits_and_hidden"))(params, tokens)
    chex.assert_shape(default, (B, T, BASE.vocab_size))
    chex.assert_type(default, jnp.float32)
    chex.assert_shape(hidden, (B, T, BASE.embed_dim))
    explicit = forward(BASE)(params, tokens, arange_positions(B, T), jnp.ones((B, T), jnp.int32))
    np.testing.assert_allclose(default, explicit, **SAME_MATH_TOL)
    # Tied head: the logits are the final hidden states against the embedding table.
    tied = BASE.replace(tie_embeddings=True)
    tied_params = params_for(tied)
    logits, hidden = jax.jit(lambda p, x: tm.Transformer(tied).apply(
        {"params": p}, x, method="logits_and_hidden"))(tied_params, tokens)
    np.testing.assert_allclose(logits, hidden @ tied_params["embed"]["embedding"].T,
                               **SAME_MATH_TOL)
    with pytest.raises(ValueError, match="max_seq_len"):
        tm.Transformer(BASE).apply({"params": params}, random_tokens(5, (1, 33)))


def test_entry_points_are_one_forward_pass_with_one_param_tree():
    """`Transformer(cfg).apply({"params": p}, tokens)` gives float32 logits [B, T, V]
    (DESIGN.md's promise): the LM head applied to `hidden_states`, whose final-normed states
    the scalar heads read; `logits_and_hidden` returns both, and init through either entry
    creates the same params."""
    B, T = 2, 12
    tokens = random_tokens(16, (B, T))
    for tie in (False, True):
        cfg = BASE.replace(tie_embeddings=tie)
        model = tm.Transformer(cfg)
        params = params_for(cfg)
        logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)
        chex.assert_shape(logits, (B, T, cfg.vocab_size))
        chex.assert_type(logits, jnp.float32)
        hidden = jax.jit(lambda p, x: model.apply({"params": p}, x, method="hidden_states"))(
            params, tokens)
        chex.assert_shape(hidden, (B, T, cfg.embed_dim))
        chex.assert_type(hidden, jnp.dtype(cfg.dtype))
        head_VE = params["embed"]["embedding"] if tie else params["lm_head"]["kernel"].T
        np.testing.assert_allclose(logits, hidden @ head_VE.T, **SAME_MATH_TOL)
        both = jax.jit(lambda p, x: model.apply({"params": p}, x, method="logits_and_hidden"))(
            params, tokens)
        np.testing.assert_array_equal(both[0], logits)
        np.testing.assert_array_equal(both[1], hidden)
        init = lambda **kw: jax.eval_shape(
            lambda: model.init(jax.random.key(0), tokens, **kw)["params"])
        chex.assert_trees_all_equal_shapes_and_dtypes(init(method="hidden_states"), init())


# ---------------------------------------------------------------- RoPE

def test_rope_is_the_rotate_half_rotation():
    x = normal(jax.random.key(6), (2, 5, 3, 8))
    positions = random_tokens(7, (2, 5), vocab_size=1000)
    inv_freq = tm.rope_frequencies(8, 500.0)
    out = np.asarray(jax.jit(tm.apply_rope)(x, positions, inv_freq), np.float64)
    # Independent form: features (i, i + D/2) as one complex number, turned by
    # position * theta**(-2i/D).
    xn = np.asarray(x, np.float64)
    z = xn[..., :4] + 1j * xn[..., 4:]
    angle = np.asarray(positions, np.float64)[:, :, None, None] * 500.0 ** (-np.arange(4) * 2 / 8)
    turned = z * np.exp(1j * angle)
    # Angles up to ~1000 rad lose ~6e-5 rad in float32, so 2e-4 on unit-scale features.
    np.testing.assert_allclose(out, np.concatenate([turned.real, turned.imag], -1), atol=2e-4)


def test_rope_scores_depend_only_on_offset():
    kq, kk = jax.random.split(jax.random.key(8))
    q, k = normal(kq, (1, 1, 1, 16)), normal(kk, (1, 1, 1, 16))
    inv_freq = tm.rope_frequencies(16, 10000.0)

    @jax.jit
    def rope_score(i, j):
        qi = tm.apply_rope(q, jnp.full((1, 1), i, jnp.int32), inv_freq)
        kj = tm.apply_rope(k, jnp.full((1, 1), j, jnp.int32), inv_freq)
        return jnp.sum(qi * kj)

    def score(i, j):
        return float(rope_score(i, j))

    for i, j in [(3, 1), (9, 9), (2, 7)]:
        base = score(i, j)
        for shift in (1, 17, 100):
            # Positions up to ~110: float32 angles are off by ~1e-5 rad.
            assert abs(score(i + shift, j + shift) - base) < 1e-4
    assert abs(score(3, 1) - score(1, 3)) > 1e-3  # the offset's sign matters


def test_model_is_shift_invariant_in_positions():
    # RoPE is the only position signal, so shifting every position leaves logits unchanged.
    tokens = random_tokens(9, (2, 12))
    params, fwd = params_for(BASE), forward(BASE)
    ones = jnp.ones((2, 12), jnp.int32)
    base = fwd(params, tokens, arange_positions(2, 12), ones)
    shifted = fwd(params, tokens, arange_positions(2, 12, offset=7), ones)
    # Angles at positions < 20 carry ~2e-6 rad float32 error; through two blocks 1e-4.
    np.testing.assert_allclose(shifted, base, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- layer stacking, remat

def test_scanned_and_unrolled_layers_agree():
    unrolled_cfg = BASE.replace(scan_layers=False)
    tokens = random_tokens(10, (2, 16))
    positions, ones = arange_positions(2, 16), jnp.ones((2, 16), jnp.int32)
    scanned = params_for(BASE)
    unrolled = tm.unstack_layer_params(scanned)
    assert "layers_1" in unrolled and "layers" not in unrolled
    # The converted tree is exactly what the unrolled model initialises, and converting
    # back is lossless.
    unrolled_shapes = jax.eval_shape(lambda: tm.init_params(unrolled_cfg, jax.random.key(0)))
    assert jax.tree.structure(unrolled) == jax.tree.structure(unrolled_shapes)
    chex.assert_trees_all_equal_shapes_and_dtypes(unrolled, unrolled_shapes)
    stacked = tm.stack_layer_params(unrolled)
    chex.assert_trees_all_equal(stacked, scanned)

    scan_logits = forward(BASE)(stacked, tokens, positions, ones)
    loop_logits = forward(unrolled_cfg)(unrolled, tokens, positions, ones)
    np.testing.assert_allclose(scan_logits, loop_logits, **SAME_MATH_TOL)


def test_remat_policies_give_identical_loss_and_grads():
    tokens = random_tokens(11, (2, 16))
    targets = random_tokens(12, (2, 16))
    params = params_for(BASE)

    def loss_fn(cfg):
        def loss(p):
            logits = tm.Transformer(cfg).apply({"params": p}, tokens)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
        return jax.value_and_grad(loss)

    def has_checkpoint(cfg, p):
        jaxpr = str(jax.make_jaxpr(loss_fn(cfg))(p))
        return "checkpoint" in jaxpr or "remat" in jaxpr

    base_loss, base_grads = jax.jit(loss_fn(BASE))(params)
    assert not has_checkpoint(BASE, params)
    for policy in ("full", "save_dots"):
        cfg = BASE.replace(remat_policy=policy)
        # The policy must really be applied: the traced gradient holds a checkpoint.
        assert has_checkpoint(cfg, params), policy
        loss, grads = jax.jit(loss_fn(cfg))(params)
        # Recomputation runs the same ops; only XLA's fusion may reorder sums.
        np.testing.assert_allclose(loss, base_loss, **SAME_MATH_TOL)
        chex.assert_trees_all_close(grads, base_grads, atol=1e-6, rtol=1e-5)
    # The unrolled layers are wrapped too (traced only: the numerics are the block's own).
    unrolled = BASE.replace(remat_policy="full", scan_layers=False)
    assert has_checkpoint(unrolled, tm.unstack_layer_params(params))


# ---------------------------------------------------------------- precision and dispatch

def test_bfloat16_compute_gives_float32_logits():
    cfg = BASE.replace(dtype="bfloat16")
    tokens = random_tokens(13, (2, 16))
    positions, ones = arange_positions(2, 16), jnp.ones((2, 16), jnp.int32)
    params = params_for(BASE)  # float32 params, bf16 compute
    logits = forward(cfg)(params, tokens, positions, ones)
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    reference_logits = forward(BASE)(params, tokens, positions, ones)
    # bf16 keeps 8 mantissa bits (4e-3 relative per rounding); two blocks of unit-scale
    # activations accumulate a few dozen roundings, hence 0.1 on unit-scale logits.
    np.testing.assert_allclose(logits, reference_logits, atol=0.1, rtol=0)
    bf16_params = jax.eval_shape(
        lambda: tm.init_params(BASE.replace(param_dtype="bfloat16"), jax.random.key(0)))
    assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}


def test_cudnn_path_masking_matches_reference():
    # cuDNN itself needs a GPU; the same masking runs through jax's XLA implementation.
    kq, kk, kv = jax.random.split(jax.random.key(14), 3)
    q, k, v = normal(kq, (2, 16, 4, 8)), normal(kk, (2, 16, 2, 8)), normal(kv, (2, 16, 2, 8))
    segment_ids = jnp.array([[1] * 5 + [2] * 8 + [0] * 3, [1] * 16], jnp.int32)
    cudnn_path = jax.jit(functools.partial(attention_lib.cudnn_attention, implementation="xla"))
    for seg in (segment_ids, None):
        ours = cudnn_path(q, k, v, segment_ids=seg)
        np.testing.assert_allclose(ours, jax.jit(reference.attention)(q, k, v, segment_ids=seg),
                                   **SAME_MATH_TOL)
    padded = cudnn_path(q, k, v, segment_ids=segment_ids)
    assert np.all(np.asarray(padded)[0, 13:] == 0.0)


def test_logical_constraints_apply_under_a_mesh():
    # With rules active the constraints become real sharding constraints; on one device
    # the result must be unchanged.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "tensor"))
    rules = (("activation_batch", ("data", "fsdp")), ("activation_heads", "tensor"),
             ("activation_kv_heads", "tensor"), ("activation_mlp", "tensor"),
             ("activation_vocab", "tensor"))
    tokens = random_tokens(15, (2, 8))
    params = params_for(BASE)
    with mesh, nn.logical_axis_rules(rules):
        logits = jax.jit(lambda p, x: tm.Transformer(BASE).apply({"params": p}, x))(params, tokens)
    expected = jax.jit(lambda p, x: tm.Transformer(BASE).apply({"params": p}, x))(params, tokens)
    np.testing.assert_allclose(logits, expected, **SAME_MATH_TOL)
