"""Greedy decoding with the KV cache against full recomputation without a cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax.generate import greedy_generate
from ckt_jax.model import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)


def recompute_greedy(model, params, prompts, max_new_tokens, eos_id):
    """Greedy decoding that reruns the whole sequence each step, with no cache.

    Rows are right-padded into one fixed-size buffer, so a single jitted forward serves all
    steps. The causal mask keeps the padding after a row's last token from affecting it.
    """
    lengths = np.asarray([len(p) for p in prompts])
    total = int(lengths.max()) + max_new_tokens
    ids_BxL = np.zeros((len(prompts), total), np.int32)
    for row, prompt in enumerate(prompts):
        ids_BxL[row, :len(prompt)] = prompt

    @jax.jit
    def next_tokens(ids_BxL, last_B):
        logits_BxLxV = model.apply({"params": params}, ids_BxL).logits_BxLxV
        return jnp.argmax(logits_BxLxV[jnp.arange(ids_BxL.shape[0]), last_B], axis=-1)

    outputs = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        chosen = np.asarray(next_tokens(ids_BxL, lengths + step - 1))
        for row in range(len(prompts)):
            if done[row]:
                continue
            if chosen[row] == eos_id:
                done[row] = True
            else:
                outputs[row].append(int(chosen[row]))
            ids_BxL[row, lengths[row] + step] = chosen[row]
        if done.all():
            break
    return outputs


@functools.lru_cache(maxsize=1)
def tiny_model():
    model = Llama(TINY)
    params = model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


def test_tiny_cache_matches_recompute():
    model, params = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, TINY.vocab_size, size=n).tolist() for n in (5, 12, 1, 30, 7)]
    # eos_id outside the vocabulary, so every row runs all 32 steps.
    expected = recompute_greedy(model, params, prompts, 32, eos_id=-1)
    generated = greedy_generate(model, params, prompts, max_new_tokens=32, eos_id=-1, pad_id=0,
                                batch_size=4)
    assert [len(g) for g in generated] == [32] * len(prompts)
    assert generated == expected


def test_tiny_stops_at_eos():
    model, params = tiny_model()
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    free_run = greedy_generate(model, params, prompts, max_new_tokens=16, eos_id=-1, pad_id=0,
                               batch_size=2)
    eos_id = free_run[0][3]  # pretend the 4th token of row 0 is the end-of-sequence token
    stopped = greedy_generate(model, params, prompts, max_new_tokens=16, eos_id=eos_id,
                              pad_id=0, batch_size=2)
    assert stopped[0] == free_run[0][:free_run[0].index(eos_id)]
    assert eos_id not in stopped[1]
    assert stopped == recompute_greedy(model, params, prompts, 16, eos_id)


def test_progress_and_input_order():
    model, params = tiny_model()
    prompts = [[4] * n for n in (9, 2, 5)]
    calls = []
    generated = greedy_generate(model, params, prompts, max_new_tokens=3, eos_id=-1, pad_id=0,
                                batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 3), (3, 3)]
    single = [greedy_generate(model, params, [p], max_new_tokens=3, eos_id=-1, pad_id=0,
                              batch_size=2)[0] for p in prompts]
    assert generated == single


def test_rejects_empty_prompt():
    model, params = tiny_model()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy_generate(model, params, [[3], []], max_new_tokens=2, eos_id=2, pad_id=2)


def test_rejects_too_long_request():
    model, params = tiny_model()
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=256"):
        greedy_generate(model, params, [[3] * 250], max_new_tokens=10, eos_id=2, pad_id=2)


@pytest.mark.real
def test_smollm2_cache_matches_recompute(smollm2_flax, smollm2_tokenizer):
    config, params = smollm2_flax
    model = Llama(config)
    tokenizer = smollm2_tokenizer
    prompts = [tokenizer.encode("The capital of France is"),
               tokenizer.encode("Here is a recipe for pancakes:")]
    expected = recompute_greedy(model, params, prompts, 32, eos_id=tokenizer.eos_id)
    generated = greedy_generate(model, params, prompts, max_new_tokens=32,
                                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, batch_size=2)
    assert generated == expected
    assert all(len(g) > 0 for g in generated)


def test_opening_scores_match_full_forward():
    # Scores from the generation's prefill equal log-softmax sums of a full forward pass over
    # prompt + opening, and the replies are the same as without scoring.
    model = Llama(TINY)
    params = model.init(jax.random.key(5), jnp.zeros((1, 4), jnp.int32))["params"]
    prompts = [[3, 9, 27, 81], [5, 6], [7, 8, 9, 10, 11, 12, 13]]
    openings = [[17], [40, 41, 42], [90, 91]]
    plain = greedy_generate(model, params, prompts, max_new_tokens=2, eos_id=-1, pad_id=0,
                            batch_size=2)
    replies, scores = greedy_generate(model, params, prompts, max_new_tokens=2, eos_id=-1,
                                      pad_id=0, batch_size=2, openings_ids=openings)
    assert replies == plain
    assert scores.shape == (3, 3)
    for i, prompt in enumerate(prompts):
        for o, opening in enumerate(openings):
            ids = np.asarray([prompt + opening], np.int32)
            logits = model.apply({"params": params}, ids).logits_BxLxV[0]
            log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
            expected = sum(log_probs[len(prompt) - 1 + j, token]
                           for j, token in enumerate(opening))
            np.testing.assert_allclose(scores[i, o], expected, atol=1e-4)
