"""Adapter training on a tiny random Llama: frozen backbone, adapter-only gradients, merging."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from ckt_jax import lora
from ckt_jax.model import Llama, LlamaConfig, LoraConfig
from ckt_jax.objective import ObjectiveConfig, build_objective
from ckt_jax.train import make_train_step, train_loop

TINY = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o"))


def tiny_setup(seed=0):
    student = Llama(TINY, lora=LORA)
    full = student.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    adapters, backbone = lora.split_params(full)
    # Non-zero lora_b so that merging is a real test.
    adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)
    teacher_params = Llama(TINY).init(jax.random.PRNGKey(seed + 1),
                                      jnp.zeros((1, 8), jnp.int32))["params"]
    return student, adapters, backbone, teacher_params


def tiny_batch(seed=0, batch=4, length=16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY.vocab_size, size=(batch, length)).astype(np.int32)
    attention = np.ones((batch, length), np.int32)
    attention[0, 12:] = 0   # a right-padded row
    loss_mask = np.zeros((batch, length), np.int32)
    loss_mask[:, 6:12] = 1
    is_harmful = np.asarray([1, 0] * (batch // 2) + [1] * (batch % 2), np.int32)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask,
            "is_harmful": is_harmful}


def full_objective():
    return ObjectiveConfig(ce_weight=0.5, kd_weight=1.0, consistency_weight=0.5, l2_weight=1e-3,
                           temperature=2.0, noise_alpha=5.0)


def test_gradients_only_for_adapters():
    student, adapters, backbone, teacher_params = tiny_setup()
    loss_fn = build_objective(student, Llama(TINY), full_objective())
    frozen = {"backbone": backbone, "teacher": teacher_params}
    batch = tiny_batch()

    def loss_of_everything(adapter_params, frozen_params):
        return loss_fn(adapter_params, frozen_params, batch, jax.random.PRNGKey(0))[0]

    adapter_grads, frozen_grads = jax.grad(loss_of_everything, argnums=(0, 1))(adapters, frozen)
    for path, g in traverse_util.flatten_dict(frozen_grads).items():
        assert np.all(np.asarray(g) == 0), f"frozen leaf {'/'.join(path)} received a gradient"
    nonzero = [np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(adapter_grads)]
    assert all(nonzero)
    flat = traverse_util.flatten_dict(adapter_grads)
    assert all(lora.is_adapter_path(p) for p in flat)


def test_backbone_bit_identical_after_training():
    student, adapters, backbone, teacher_params = tiny_setup()
    before = jax.tree_util.tree_map(np.array, backbone)
    adapters_before = jax.tree_util.tree_map(np.array, adapters)
    optimizer = lora.make_adapter_optimizer(1e-2)
    step = make_train_step(build_objective(student, Llama(TINY), full_objective()), optimizer)
    frozen = {"backbone": backbone, "teacher": teacher_params}

    def batches():
        seed = 0
        while True:
            seed += 1
            yield tiny_batch(seed)

    new_adapters, _, history = train_loop(
        step_fn=step, adapter_params=adapters, opt_state=optimizer.init(adapters),
        frozen_params=frozen, batches=batches(), num_steps=3, rng=jax.random.PRNGKey(1),
        log_every=1, name="test")
    for path, value in traverse_util.flatten_dict(before).items():
        after = np.asarray(traverse_util.flatten_dict(backbone)[path])
        assert np.array_equal(value, after), f"backbone leaf {'/'.join(path)} changed"
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(adapters_before), jax.tree_util.tree_leaves(new_adapters))]
    assert all(changed)
    assert len(history) == 3
    for key in ("loss/ce", "loss/kd", "loss/consistency", "loss/l2", "grad_norm"):
        assert np.isfinite(history[-1][key]), key


def test_optimizer_freezes_stray_backbone_leaf():
    # A frozen leaf passed in the trainable tree still gets a zero update and no Adam state.
    params = {"attn": {"q": {"kernel": jnp.ones((3, 3)), "lora_a": jnp.ones((3, 2))}}}
    optimizer = lora.make_adapter_optimizer(0.1, max_grad_norm=None)
    state = optimizer.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, state, params)
    assert np.all(np.asarray(updates["attn"]["q"]["kernel"]) == 0)
    assert np.all(np.asarray(updates["attn"]["q"]["lora_a"]) != 0)


def test_merge_lora_matches_adapter_forward():
    student, adapters, backbone, _ = tiny_setup()
    ids = jnp.asarray(tiny_batch()["input_ids"])
    with_adapters = student.apply({"params": lora.combine_params(adapters, backbone)}, ids)
    merged = lora.merge_lora(lora.combine_params(adapters, backbone), LORA.alpha / LORA.rank)
    plain = Llama(TINY).apply({"params": merged}, ids)
    np.testing.assert_allclose(plain.logits_BxLxV, with_adapters.logits_BxLxV, atol=1e-5)


def test_objective_switches_terms_off():
    student, adapters, backbone, teacher_params = tiny_setup()
    loss_fn = build_objective(student, None, ObjectiveConfig(ce_weight=1.0))
    _, aux = loss_fn(adapters, {"backbone": backbone}, tiny_batch(), jax.random.PRNGKey(0))
    assert set(k for k in aux if k.startswith("loss/")) == {"loss/ce"}
    with pytest.raises(ValueError, match="divergence"):
        ObjectiveConfig(kd_weight=1.0, divergence="kl_typo")


def test_gathered_ce_equals_full_ce():
    # The reply-position gather must give the same loss as full logits masked afterwards.
    from ckt_jax import losses
    student, adapters, backbone, _ = tiny_setup()
    batch = tiny_batch()
    loss_fn = build_objective(student, None, ObjectiveConfig(ce_weight=1.0))
    gathered, _ = loss_fn(adapters, {"backbone": backbone}, batch, jax.random.PRNGKey(0))
    logits = student.apply({"params": lora.combine_params(adapters, backbone)},
                           jnp.asarray(batch["input_ids"]),
                           attention_mask_BxL=jnp.asarray(batch["attention_mask"])).logits_BxLxV
    nll = losses.next_token_cross_entropy(logits, jnp.asarray(batch["input_ids"]))
    full = losses.per_token_mean(nll, losses.next_token_mask(jnp.asarray(batch["loss_mask"])))
    np.testing.assert_allclose(float(gathered), float(full), rtol=1e-5)


def test_sequence_reduction_weighs_rows_equally():
    # "sequence" averages within each row first: a row with 2 reply tokens weighs as much as one
    # with 6, unlike "token", where the 6-token row contributes three times as much.
    from ckt_jax import losses
    student, adapters, backbone, _ = tiny_setup()
    batch = tiny_batch()
    batch["loss_mask"][1, 8:12] = 0
    params = lora.combine_params(adapters, backbone)
    logits = student.apply({"params": params}, jnp.asarray(batch["input_ids"]),
                           attention_mask_BxL=jnp.asarray(batch["attention_mask"])).logits_BxLxV
    nll = np.asarray(losses.next_token_cross_entropy(logits, jnp.asarray(batch["input_ids"])))
    mask = np.asarray(losses.next_token_mask(jnp.asarray(batch["loss_mask"])))
    row_means = (nll * mask).sum(1) / mask.sum(1)
    by_token = (nll * mask).sum() / mask.sum()
    for reduction, expected in (("sequence", row_means.mean()), ("token", by_token)):
        loss_fn = build_objective(student, None, ObjectiveConfig(ce_weight=1.0,
                                                                 reduction=reduction))
        loss, _ = loss_fn(adapters, {"backbone": backbone}, batch, jax.random.PRNGKey(0))
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert abs(row_means.mean() - by_token) > 1e-4
    with pytest.raises(ValueError, match="reduction"):
        ObjectiveConfig(ce_weight=1.0, reduction="row")


def test_opening_tokens_weigh_more():
    # tiny_batch scores positions 5..10 (predicting tokens 6..11); the first 2 weigh 3 each.
    from ckt_jax import losses
    student, adapters, backbone, _ = tiny_setup()
    batch = tiny_batch()
    params = lora.combine_params(adapters, backbone)
    logits = student.apply({"params": params}, jnp.asarray(batch["input_ids"]),
                           attention_mask_BxL=jnp.asarray(batch["attention_mask"])).logits_BxLxV
    nll = np.asarray(losses.next_token_cross_entropy(logits, jnp.asarray(batch["input_ids"])))
    weights = np.zeros_like(nll)
    weights[:, 5:11] = 1.0
    weights[:, 5:7] = 3.0
    expected = (nll * weights).sum() / weights.sum()
    loss_fn = build_objective(student, None, ObjectiveConfig(ce_weight=1.0, opening_tokens=2,
                                                             opening_weight=3.0))
    loss, aux = loss_fn(adapters, {"backbone": backbone}, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(aux["target_tokens"]) == 4 * 6
    with pytest.raises(ValueError, match="opening_weight"):
        ObjectiveConfig(ce_weight=1.0, opening_weight=0.0)


def test_consistency_row_stride_uses_every_other_row():
    # With stride 2 the consistency term equals the full-batch term computed on rows 0 and 2.
    student, adapters, backbone, _ = tiny_setup()
    batch = tiny_batch()
    objective = dict(consistency_weight=1.0, ce_weight=1e-9, noise_alpha=5.0)
    strided_fn = build_objective(student, None, ObjectiveConfig(consistency_row_stride=2,
                                                                **objective))
    _, strided = strided_fn(adapters, {"backbone": backbone}, batch, jax.random.PRNGKey(3))
    half = {name: value[::2] for name, value in batch.items()}
    full_fn = build_objective(student, None, ObjectiveConfig(**objective))
    _, reference = full_fn(adapters, {"backbone": backbone}, half, jax.random.PRNGKey(3))
    np.testing.assert_allclose(float(strided["loss/consistency"]),
                               float(reference["loss/consistency"]), rtol=1e-5)
    _, every_row = full_fn(adapters, {"backbone": backbone}, batch, jax.random.PRNGKey(3))
    assert abs(float(every_row["loss/consistency"]) - float(reference["loss/consistency"])) > 1e-7


def every_term_objective(**overrides):
    settings = dict(ce_weight=0.1, kd_weight=1.0, contrastive_weight=0.2, relation_weight=0.2,
                    consistency_weight=0.5, adversarial_weight=0.5, base_kl_weight=0.1,
                    l2_weight=1e-3, temperature=2.0, contrastive_projection=True)
    settings.update(overrides)
    return ObjectiveConfig(**settings)


@pytest.mark.parametrize("overrides", [
    {},
    {"relation_method": "supcon", "adversarial_mode": "freelb", "adversarial_steps": 2,
     "consistency_target": "teacher", "adversarial_norm": "linf", "divergence": "jsd",
     "consistency_row_stride": 2, "reduction": "sequence", "opening_tokens": 2},
])
def test_every_term_trains_adapters_only(overrides):
    from ckt_jax import losses

    student, adapters, backbone, teacher_params = tiny_setup()
    head = losses.ProjectionHead(features=TINY.hidden_size, hidden_features=16)
    adapters = {**adapters, **losses.init_projection_head(head, jax.random.PRNGKey(5),
                                                          TINY.hidden_size)}
    cfg = every_term_objective(**overrides)
    loss_fn = build_objective(student, Llama(TINY), cfg, head=head)
    frozen = {"backbone": backbone, "teacher": teacher_params}
    batch = tiny_batch()

    def total(adapter_params, frozen_params):
        return loss_fn(adapter_params, frozen_params, batch, jax.random.PRNGKey(0))

    (loss, aux), (adapter_grads, frozen_grads) = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True)(adapters, frozen)
    expected = {"ce", "kd", "contrastive", "relation", "consistency", "adversarial", "base_kl",
                "l2"}
    assert {k.split("/", 1)[1] for k in aux if k.startswith("loss/")} == expected
    for name in expected:
        assert np.isfinite(float(aux[f"loss/{name}"])), name
        assert float(aux[f"weight/{name}"]) == pytest.approx(getattr(cfg, f"{name}_weight"))
    weighted = sum(float(aux[f"loss/{n}"]) * float(aux[f"weight/{n}"]) for n in expected)
    assert float(loss) == pytest.approx(weighted, rel=1e-5)
    for path, g in traverse_util.flatten_dict(frozen_grads).items():
        assert np.all(np.asarray(g) == 0), "/".join(path)
    head_grads = jax.tree_util.tree_leaves(adapter_grads["contrastive_head"])
    assert head_grads and all(np.any(np.asarray(g) != 0) for g in head_grads)
    for g in jax.tree_util.tree_leaves(adapter_grads):
        assert np.all(np.isfinite(np.asarray(g)))


def quadratic_loss(adapter_params, frozen_params, batch, rng):
    """Per-example squared error of a linear map: a mean over rows, like the objective's terms."""
    del frozen_params, rng
    w = adapter_params["layers"]["attn"]["q"]["lora_a"][0]
    error = batch["x"] @ w - batch["y"]
    loss = jnp.mean(jnp.square(error))
    return loss, {"loss/mse": loss, "target_tokens": jnp.sum(batch["attention_mask"][:, 0])}


def test_accumulation_matches_full_batch():
    from ckt_jax import sharding
    from ckt_jax.train import StepShardings, opt_state_shardings

    rng = np.random.default_rng(0)
    # One layer of the scanned layout: lora_a is [layers, in, rank].
    params = {"layers": {"attn": {"q": {"lora_a": rng.normal(size=(1, 3, 2)).astype(np.float32)}}}}
    batch = {"x": rng.normal(size=(8, 3)).astype(np.float32),
             "y": rng.normal(size=(8, 2)).astype(np.float32),
             "attention_mask": np.ones((8, 5), np.int32)}
    optimizer = optax.sgd(0.1)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    adapter_shardings = sharding.param_shardings(params, mesh)
    shardings = StepShardings(mesh=mesh, adapter=adapter_shardings, frozen={},
                              opt_state=opt_state_shardings(optimizer, params, adapter_shardings,
                                                            mesh))
    results = {}
    for steps in (1, 2, 4):
        step = make_train_step(quadratic_loss, optimizer, accumulation_steps=steps,
                               shardings=shardings)
        adapters = jax.device_put(params, adapter_shardings)
        new, _, metrics = step(adapters, optimizer.init(adapters), {}, batch,
                               jax.random.PRNGKey(0))
        results[steps] = (np.asarray(new["layers"]["attn"]["q"]["lora_a"]), metrics)
    for steps in (2, 4):
        np.testing.assert_allclose(results[steps][0], results[1][0], rtol=1e-6, atol=1e-7)
        assert float(results[steps][1]["loss"]) == pytest.approx(float(results[1][1]["loss"]),
                                                                 rel=1e-6)
        # Counts add up over micro-batches; the token count covers the whole batch.
        assert float(results[steps][1]["target_tokens"]) == 8
        assert float(results[steps][1]["tokens"]) == 40
    with pytest.raises(ValueError, match="grad_accum_steps=0 must be >= 1"):
        make_train_step(quadratic_loss, optimizer, accumulation_steps=0)


@pytest.fixture(scope="module")
def shared_setup():
    """One tiny_setup for the tests below, which never donate its arrays."""
    return tiny_setup()


def test_bfloat16_compute_keeps_losses_float32(shared_setup):
    _, adapters, backbone, teacher_params = shared_setup
    half = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, output_dtype=jnp.bfloat16)
    student = Llama(TINY, lora=LORA, **half)
    logits = jax.eval_shape(lambda p, ids: student.apply({"params": p}, ids).logits_BxLxV,
                            lora.combine_params(adapters, backbone),
                            jnp.asarray(tiny_batch()["input_ids"]))
    assert logits.dtype == jnp.bfloat16

    objective = ObjectiveConfig(ce_weight=1.0, kd_weight=1.0)
    half_loss = build_objective(student, Llama(TINY, **half), objective)
    full_loss = build_objective(Llama(TINY, lora=LORA), Llama(TINY), objective)
    frozen = {"backbone": backbone, "teacher": teacher_params}
    frozen_half = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), frozen)

    @jax.jit
    def both(batch):
        key = jax.random.PRNGKey(0)
        return half_loss(adapters, frozen_half, batch, key), full_loss(adapters, frozen, batch, key)

    (loss, aux), (full, _) = both(tiny_batch())
    assert loss.dtype == jnp.float32
    assert aux["loss/ce"].dtype == jnp.float32
    assert aux["loss/kd"].dtype == jnp.float32
    assert float(loss) == pytest.approx(float(full), rel=2e-2)


def test_remat_policies_keep_gradients(shared_setup):
    _, adapters, backbone, _ = shared_setup
    objective = ObjectiveConfig(ce_weight=1.0)
    models = {"none": Llama(TINY, lora=LORA)}
    for policy in ("full", "dots"):
        models[policy] = Llama(TINY, lora=LORA, remat=True, remat_policy=policy)
    losses = {name: build_objective(model, None, objective) for name, model in models.items()}

    @jax.jit
    def gradients(batch):
        return {name: jax.grad(lambda a, f=fn: f(a, {"backbone": backbone}, batch, None)[0])(
            adapters) for name, fn in losses.items()}

    grads = gradients(tiny_batch())
    for policy in ("full", "dots"):
        pairs = zip(jax.tree_util.tree_leaves(grads["none"]),
                    jax.tree_util.tree_leaves(grads[policy]))
        for plain, remat in pairs:
            np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), rtol=1e-5,
                                       atol=1e-7)
    with pytest.raises(ValueError, match="remat_policy='some' is unknown"):
        jax.eval_shape(Llama(TINY, remat=True, remat_policy="some").init,
                       jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
