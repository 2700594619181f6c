"""ppl.lm: the transformer, its KV cache, the reasoning step as a generative function, checkpoints.

Truths: the uncached forward pass (every position recomputed from the tokens) for the
cache; per-token log-softmax of those logits for a step's density; a row run alone for a
batch of rows; `transformers` (torch, CPU) for the checkpoint loader, where installed
(the `lmcheck` extra). Float32 throughout; tolerances are stated per test.
"""

import doctest
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import ppl
import smc
from ppl.lm import (
    PAD,
    LMState,
    Sampler,
    Transformer,
    TransformerConfig,
    init_state,
    lm_step,
    next_token_logits,
    sample_steps,
)

CFG = TransformerConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, rope_theta=500.0, qkv_bias=True, qk_norm=True)
STOP, EOS = 1, 2
PROMPT = jnp.array([5, 9, 3, 17, 4], jnp.int32)
SIZE = 32  # cache size
L = 6  # max step length
LOGIT_TOL = 2e-5  # float32 logits of O(1): cached and uncached passes sum in different orders


@pytest.fixture(scope="module")
def model():
    # scale 0.3: peaked next-token distributions and attention that depends on position
    return Transformer.random(jax.random.key(0), CFG, scale=0.3)


@pytest.fixture(scope="module")
def step(model):
    return lm_step(model, L, stop_tokens=(STOP,), eos_tokens=(EOS,))


@pytest.fixture(scope="module")
def state(model):
    return init_state(model, PROMPT, SIZE)


def row(states, i):
    return jax.tree.map(lambda x: x[i], states)


def generated(state):
    return np.asarray(state.tokens[: int(state.length)])


PADDED = 16  # uncached passes run on sequences padded to this length: one compiled program


def uncached_logits(model, sequence):
    """Logits [len(sequence), V] recomputed from the tokens alone (causal, so padding after
    the sequence changes nothing before it)."""
    sequence = np.asarray(sequence)
    padded = np.zeros(PADDED, np.int32)
    padded[: len(sequence)] = sequence
    return np.asarray(model(jnp.asarray(padded)))[: len(sequence)]


def uncached_log_probs(model, sequence, start, sampler=Sampler()):
    """log p(sequence[t] | sequence[:t]) for t >= start, from one uncached pass."""
    log_probs = np.asarray(sampler.log_probs(uncached_logits(model, sequence)))
    return np.array([log_probs[t - 1, sequence[t]] for t in range(start, len(sequence))])


# -- the cache ---------------------------------------------------------------------------------------


def test_cached_decoding_equals_uncached_logits(model, state):
    decode = jax.jit(next_token_logits)
    st, tokens = state, list(np.asarray(PROMPT))
    cached = []
    for t in [7, 11, 2, 30, 8, 8, 21]:  # a fixed continuation, token by token through the cache
        logits, st = decode(model, st)
        cached.append(logits)
        tokens.append(t)
        st = LMState(st.tokens.at[st.length].set(t), st.length + 1, st.cache, st.prompt_length, st.is_finished)
    uncached = uncached_logits(model, tokens)[len(PROMPT) - 1: -1]
    np.testing.assert_allclose(np.stack(cached), uncached, atol=LOGIT_TOL, rtol=0)
    assert float(np.std(uncached)) > 0.3  # the check is not vacuous: logits vary


def test_rows_at_different_lengths_match_each_row_alone(model, step):
    # two prompts padded to one shape, each row at its own length, decoded as a batch
    prompts = jnp.array([[5, 9, 3, 17, 4, 0, 0], [8, 6, 13, 22, 25, 31, 7]], jnp.int32)
    lengths = jnp.array([5, 7], jnp.int32)
    states = jax.vmap(lambda p, n: init_state(model, p, SIZE, n))(prompts, lengths)
    batch_logits, _ = jax.vmap(next_token_logits, in_axes=(None, 0))(model, states)
    given = jnp.array([[7, 11, STOP, PAD, PAD, PAD], [30, 8, 8, 21, 3, 4]], jnp.int32)
    batch_lp, batch_next = jax.vmap(step.score)(states, given)
    for i in range(2):
        alone = init_state(model, prompts[i, : int(lengths[i])], SIZE)
        logits, _ = next_token_logits(model, alone)
        np.testing.assert_allclose(batch_logits[i], logits, atol=LOGIT_TOL, rtol=0)
        lp, nxt = step.score(alone, given[i])
        np.testing.assert_allclose(batch_lp[i], lp, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(generated(row(batch_next, i)), generated(nxt))
        np.testing.assert_allclose(next_token_logits(model, row(batch_next, i))[0], next_token_logits(model, nxt)[0],
                                   atol=LOGIT_TOL, rtol=0)


def test_gathered_rows_continue_exactly_as_the_original(model, step):
    prompts = jnp.array([[5, 9, 3, 17, 4], [8, 6, 13, 22, 25], [31, 30, 29, 28, 27]], jnp.int32)
    states = jax.vmap(lambda p: init_state(model, p, SIZE))(prompts)
    states, _, _ = sample_steps(jax.random.key(3), step, states)
    ancestors = jnp.array([2, 0, 0])
    gathered = jax.tree.map(lambda x: x[ancestors], states)  # what a particle filter's resampling does
    key = jax.random.key(4)
    after, tokens, log_probs = sample_steps(key, step, gathered)
    for j, a in enumerate(np.asarray(ancestors)):
        new, toks, lp = step.sample(ppl.particle_key(key, j), row(states, a))
        np.testing.assert_array_equal(tokens[j], toks)
        np.testing.assert_allclose(log_probs[j], lp, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(generated(row(after, j)), generated(new))
        np.testing.assert_allclose(next_token_logits(model, row(after, j))[0], next_token_logits(model, new)[0],
                                   atol=LOGIT_TOL, rtol=0)


# -- the step's density --------------------------------------------------------------------------------


SETTINGS = {"temperature": 2.0, "top_k": 8, "top_p": 0.95}


@pytest.mark.parametrize("settings", [{}, SETTINGS])
def test_assess_of_a_sampled_step_is_its_token_log_probs(model, state, settings):
    step = lm_step(model, L, stop_tokens=(STOP,), eos_tokens=(EOS,), **settings)
    tr = step.simulate(jax.random.key(1), (state,))
    new_state, tokens = tr.retval
    tokens = np.asarray(tokens)
    count = int(np.sum(tokens != PAD))
    assert count >= 1 and np.all(tokens[count:] == PAD)
    sequence = np.concatenate([np.asarray(PROMPT), tokens[:count]])
    np.testing.assert_array_equal(generated(new_state), sequence)
    expected = uncached_log_probs(model, sequence, len(PROMPT), Sampler(**settings)).sum()
    assert np.isfinite(expected)
    np.testing.assert_allclose(tr.score, expected, atol=1e-4, rtol=0)
    lp, _ = step.assess(tr.choices, (state,))
    np.testing.assert_allclose(lp, expected, atol=1e-4, rtol=0)
    traced, weight = step.generate(jax.random.key(9), tr.choices, (state,))
    np.testing.assert_allclose(weight, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(generated(traced.retval[0]), sequence)


def test_gfi_laws_update_and_regenerate(model, step, state):
    tr = step.simulate(jax.random.key(2), (state,))
    other = jnp.array([7, 11, STOP, PAD, PAD, PAD], jnp.int32)
    moved, w, discard = step.update(jax.random.key(3), tr, ppl.ChoiceMap.leaf(other), (state,))
    np.testing.assert_allclose(w, moved.score - tr.score, atol=1e-5)
    np.testing.assert_array_equal(discard[()], tr[()])
    expected = uncached_log_probs(model, np.concatenate([np.asarray(PROMPT), [7, 11, STOP]]), len(PROMPT)).sum()
    np.testing.assert_allclose(moved.score, expected, atol=1e-4)
    kept, w = step.regenerate(jax.random.key(4), tr, ppl.Selection.none())
    np.testing.assert_allclose(w, 0.0, atol=1e-5)
    np.testing.assert_array_equal(kept[()], tr[()])
    fresh, w = step.regenerate(jax.random.key(5), tr, ppl.select(()))
    assert float(w) == 0.0 and fresh[()].shape == (L,)


def test_step_ends_at_delimiter_and_end_of_answer_masks_the_row(model, state):
    step = lm_step(model, L, stop_tokens=(STOP,), eos_tokens=(EOS,))
    lp, after = step.score(state, jnp.array([7, EOS, PAD, PAD, PAD, PAD]))
    assert bool(after.is_finished) and int(after.length) == len(PROMPT) + 2 and np.isfinite(lp)
    # a finished row takes empty steps of log probability 0, and its state stays
    tr = step.simulate(jax.random.key(0), (after,))
    assert np.all(np.asarray(tr[()]) == PAD) and float(tr.score) == 0.0
    np.testing.assert_array_equal(generated(tr.retval[0]), generated(after))
    assert float(step.assess(ppl.ChoiceMap.leaf(jnp.full((L,), PAD)), (after,))[0]) == 0.0
    assert float(step.assess(ppl.ChoiceMap.leaf(jnp.array([7, PAD, PAD, PAD, PAD, PAD])), (after,))[0]) == -np.inf
    # tokens after the delimiter, or padding before the step ended, have density 0
    assert float(step.score(state, jnp.array([7, STOP, 9, PAD, PAD, PAD]))[0]) == -np.inf
    assert float(step.score(state, jnp.array([7, PAD, 9, PAD, PAD, PAD]))[0]) == -np.inf
    # a step with no delimiter runs max_step_len tokens and does not finish the row
    lp, after = step.score(state, jnp.array([7, 8, 9, 10, 11, 12]))
    assert np.isfinite(lp) and int(after.length) == len(PROMPT) + L and not bool(after.is_finished)


def test_a_full_context_finishes_the_row(model, step):
    state = init_state(model, PROMPT, len(PROMPT) + 3)  # room for 3 more tokens
    tr = step.simulate(jax.random.key(0), (state,))
    tokens = np.asarray(tr[()])
    assert STOP not in tokens and EOS not in tokens  # this key's draw reaches the end of the context
    assert np.all(tokens[:3] != PAD) and np.all(tokens[3:] == PAD)
    assert bool(tr.retval[0].is_finished) and int(tr.retval[0].length) == len(PROMPT) + 3
    np.testing.assert_allclose(step.assess(tr.choices, (state,))[0], tr.score, atol=1e-4)
    lp, after = step.score(state, jnp.array([7, 8, 9, 10, PAD, PAD]))  # one token too many
    assert float(lp) == -np.inf


# -- sampling settings -----------------------------------------------------------------------------------


def test_top_k_one_is_greedy(model, state):
    step = lm_step(model, L, top_k=1)
    tr = step.simulate(jax.random.key(0), (state,))
    sequence = list(np.asarray(PROMPT))
    for _ in range(L):  # greedy decoding from uncached logits
        sequence.append(int(np.argmax(uncached_logits(model, sequence)[-1])))
    np.testing.assert_array_equal(tr[()], sequence[len(PROMPT):])
    assert float(tr.score) == 0.0
    greedy = lm_step(model, L, temperature=0.0).simulate(jax.random.key(1), (state,))
    np.testing.assert_array_equal(greedy[()], tr[()])


def test_sampler_truncation_sets():
    logits = jnp.log(jnp.array([0.05, 0.5, 0.15, 0.3]))
    kept = lambda s: set(np.flatnonzero(np.isfinite(np.asarray(s.log_probs(logits)))))  # noqa: E731
    assert kept(Sampler(top_k=2)) == {1, 3}
    assert kept(Sampler(top_p=0.7)) == {1, 3}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert kept(Sampler(top_p=0.85)) == {1, 2, 3}
    assert kept(Sampler(top_p=0.1)) == {1}
    assert kept(Sampler(top_k=3, top_p=0.7)) == {1, 3}
    np.testing.assert_allclose(np.exp(Sampler(top_k=2).log_probs(logits))[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], rtol=1e-5)
    np.testing.assert_allclose(Sampler(temperature=0.5).log_probs(logits), jax.nn.log_softmax(2 * logits), atol=1e-5)
    with pytest.raises(ppl.ArgumentError, match="top_p"):
        Sampler(top_p=0.0)


def test_first_token_frequencies_match_the_sampler(model, state):
    # 2000 rows' first tokens; chi-square of their counts against the sampler's
    # probabilities (temperature 2, top-8, top-0.95): false alarm 1e-3 per run.
    step = lm_step(model, 1, **SETTINGS)
    n = 2000
    states = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), state)
    _, draws, _ = sample_steps(jax.random.key(7), step, states)
    probs = np.exp(np.asarray(Sampler(**SETTINGS).log_probs(next_token_logits(model, state)[0]), np.float64))
    support = np.flatnonzero(probs > 0)
    counts = np.bincount(np.asarray(draws)[:, 0], minlength=CFG.vocab_size)
    assert counts[probs == 0].sum() == 0 and 3 <= len(support) < 8  # top-p cut some of the top-8
    expected = n * probs[support] / probs[support].sum()
    chi2 = float(np.sum((counts[support] - expected) ** 2 / expected))
    assert scipy.stats.chi2.sf(chi2, len(support) - 1) > 1e-3


# -- composition ------------------------------------------------------------------------------------------


def test_jit_and_vmap_agree_with_eager(step, state):
    eager = step.simulate(jax.random.key(5), (state,))
    jitted = jax.jit(step.simulate)(jax.random.key(5), (state,))
    np.testing.assert_array_equal(eager[()], jitted[()])
    np.testing.assert_allclose(eager.score, jitted.score, atol=1e-5)
    keys = jax.random.split(jax.random.key(6), 3)
    batch = jax.vmap(step.simulate, in_axes=(0, None))(keys, (state,))
    assert batch[()].shape == (3, L) and batch.retval[0].cache.keys.shape[0] == 3
    np.testing.assert_array_equal(batch[()][1], step.simulate(keys[1], (state,))[()])
    # ppl.vmap over a batch of states (rows at their own lengths after one step each)
    rows = ppl.vmap(step, in_axes=(0,)).simulate(jax.random.key(7), (batch.retval[0],))
    assert rows[()].shape == (3, L)
    np.testing.assert_array_equal(rows.retval[0].length, batch.retval[0].length + np.sum(rows[()] != PAD, axis=1))


def test_step_in_a_scan_model_under_the_particle_filter(step, state):
    @ppl.gen
    def reasoning(state, _):
        state, tokens = ppl.sample("step", step, state)
        # a stand-in reward: prefer steps that end with the delimiter
        ppl.factor("reward", jnp.where(jnp.any(tokens == STOP), 0.0, -1.0))
        return state, tokens

    model = ppl.scan(reasoning, length=3)
    result = smc.particle_filter(jax.random.key(1), model, (state, None), {}, 4, ess_threshold=1.0)
    assert np.isfinite(float(result.log_marginal)) and result.particles["step"].shape == (4, L)
    paths = result.paths()
    assert paths["step"].shape == (4, 3, L)
    # each final particle's text is its path's steps, whatever resampling did
    final = result.particles.retval[0]
    for j in range(4):
        steps = np.asarray(paths["step"][j]).reshape(-1)
        np.testing.assert_array_equal(generated(row(final, j)), np.concatenate([np.asarray(PROMPT), steps[steps != PAD]]))


# -- errors -------------------------------------------------------------------------------------------------


def test_errors(model, step, state):
    with pytest.raises(ppl.ArgumentError, match="prompt has 40 tokens.*context holds 32"):
        init_state(model, jnp.zeros(40, jnp.int32), 32)
    with pytest.raises(ppl.ArgumentError, match="4096"):
        init_state(model, PROMPT, 5000)
    with pytest.raises(ppl.ObservationError, match=r"shape \(6,\)"):
        step.assess(ppl.ChoiceMap.leaf(jnp.zeros(4, jnp.int32)), (state,))
    with pytest.raises(ppl.ObservationError, match="token 99 at index 1"):
        step.assess(ppl.ChoiceMap.leaf(jnp.array([3, 99, PAD, PAD, PAD, PAD])), (state,))
    with pytest.raises(ppl.ArgumentError, match="LMState"):
        step.simulate(jax.random.key(0), (PROMPT,))
    with pytest.raises(ppl.ArgumentError, match="stop_tokens"):
        lm_step(model, 4, stop_tokens=(40,))


# -- checkpoints ----------------------------------------------------------------------------------------------

WORDS = ["<unk>", "<eos>", "\n\n", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "+", "=", "1", "2", "3"]
ARCHS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False,
                  rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False),
    "llama3-rope-tied": dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=True,
                             mlp_bias=True, tie_word_embeddings=True,
                             rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=16)),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                  use_sliding_window=False, tie_word_embeddings=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", rope_theta=1000000.0, head_dim=16,
                  attention_bias=False, tie_word_embeddings=False, use_sliding_window=False),
}


def write_checkpoint(folder, arch, seed=0, vocab_size=24, dtype="float32"):
    """A tiny random checkpoint in the Hugging Face layout: config.json, model.safetensors, tokenizer.json."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    extra = dict(ARCHS[arch])
    config = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
                  hidden_act="silu", eos_token_id=1, bos_token_id=0, **extra)
    kind = extra["model_type"]
    rng = np.random.default_rng(seed)
    d, inner = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    normal = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    weights = {"model.embed_tokens.weight": normal(vocab_size, d),
               "model.norm.weight": 1 + normal(d)}
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = normal(vocab_size, d)
    bias = kind == "qwen2" or config.get("attention_bias")
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({p + "input_layernorm.weight": 1 + normal(d), p + "post_attention_layernorm.weight": 1 + normal(d),
                        p + "self_attn.q_proj.weight": normal(q_out, d), p + "self_attn.k_proj.weight": normal(kv_out, d),
                        p + "self_attn.v_proj.weight": normal(kv_out, d), p + "self_attn.o_proj.weight": normal(d, q_out),
                        p + "mlp.gate_proj.weight": normal(inner, d), p + "mlp.up_proj.weight": normal(inner, d),
                        p + "mlp.down_proj.weight": normal(d, inner)})
        if bias:
            weights.update({p + "self_attn.q_proj.bias": normal(q_out), p + "self_attn.k_proj.bias": normal(kv_out),
                            p + "self_attn.v_proj.bias": normal(kv_out)})
        if bias and kind != "qwen2":
            weights[p + "self_attn.o_proj.bias"] = normal(d)
        if config.get("mlp_bias"):
            weights.update({p + "mlp.gate_proj.bias": normal(inner), p + "mlp.up_proj.bias": normal(inner),
                            p + "mlp.down_proj.bias": normal(d)})
        if kind == "qwen3":
            weights.update({p + "self_attn.q_norm.weight": 1 + normal(hd), p + "self_attn.k_norm.weight": 1 + normal(hd)})
    folder.mkdir(parents=True, exist_ok=True)
    if dtype == "bfloat16":
        write_bf16_safetensors(folder / "model.safetensors", weights)
    else:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return weights


def write_bf16_safetensors(path, weights):
    """The safetensors layout by hand (numpy has no bfloat16): header size, JSON header, raw data."""
    import ml_dtypes

    header, chunks, offset = {}, [], 0
    for name, array in weights.items():
        data = np.ascontiguousarray(array.astype(ml_dtypes.bfloat16)).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(chunks))


TEXT = "the cat sat on the mat \n\n a dog ran 1 + 2 = 3"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_checkpoint_round_trip(tmp_path, arch):
    weights = write_checkpoint(tmp_path, arch)
    lm = ppl.lm.load(str(tmp_path))
    assert lm.model.config.model_type == ARCHS[arch]["model_type"] and lm.eos_tokens == (1,)
    np.testing.assert_array_equal(lm.model.layers["q"][1], weights["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(lm.model.embed, weights["model.embed_tokens.weight"])
    ids = lm.encode(TEXT)
    assert lm.decode(ids).split() == TEXT.split() and ids.dtype == np.int32
    assert np.all(np.isfinite(np.asarray(lm.model(jnp.asarray(ids)))))
    step = lm.step(8, delimiter="\n\n")
    assert step.stop_tokens == (2,) and step.eos_tokens == (1,)
    if arch == "qwen3":  # the step on a loaded checkpoint (compiles are per architecture: one is enough)
        state = lm.prompt("the cat", cache_size=32)
        tr = step.simulate(jax.random.key(0), (state,))
        np.testing.assert_allclose(step.assess(tr.choices, (state,))[0], tr.score, atol=1e-4)


def test_bfloat16_checkpoint(tmp_path):
    import ml_dtypes

    weights = write_checkpoint(tmp_path, "qwen2", dtype="bfloat16")
    model = ppl.lm.load_checkpoint(str(tmp_path), dtype=jnp.bfloat16)
    assert model.embed.dtype == jnp.bfloat16
    expected = weights["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(model.embed), expected)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_match_transformers(tmp_path, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    write_checkpoint(tmp_path, arch, seed=1)
    ours = ppl.lm.load(str(tmp_path))
    ids = ours.encode(TEXT)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(torch.tensor(ids[None].astype(np.int64))).logits[0].numpy()
    got = np.asarray(ours.model(jnp.asarray(ids)))
    diff = float(np.max(np.abs(got - expected)))
    print(f"\n{arch}: max |logit difference| vs transformers {transformers.__version__} = {diff:.2e} "
          f"(logits up to {np.max(np.abs(expected)):.1f})")
    assert diff < 1e-4
    if arch not in ("qwen3", "llama3-rope-tied"):  # the cached pass on the two with the most options
        return
    state = init_state(ours.model, jnp.asarray(ids[:4]), 32)
    for t in range(4, len(ids)):
        logits, state = next_token_logits(ours.model, state)
        np.testing.assert_allclose(logits, expected[t - 1], atol=1e-4, rtol=0)
        state = LMState(state.tokens.at[t].set(ids[t]), state.length + 1, state.cache, state.prompt_length,
                        state.is_finished)


def test_checkpoint_errors(tmp_path):
    write_checkpoint(tmp_path / "ok", "llama")
    folder = tmp_path / "ok"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ppl.ArgumentError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        ppl.lm.load(str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 12}))
    with pytest.raises(ppl.ArgumentError, match="embedding"):
        ppl.lm.load_checkpoint(str(folder))
    with pytest.raises(ppl.ArgumentError, match="16 tokens.*vocabulary has 12"):
        ppl.lm.load_tokenizer(str(folder), vocab_size=12)
    (folder / "config.json").write_text(json.dumps(config))
    lm = ppl.lm.load(str(folder))
    with pytest.raises(ppl.ArgumentError, match="prompt has 12 tokens.*context holds 8"):
        lm.prompt("the cat sat on the mat the cat sat on the mat", cache_size=8)
    write_checkpoint(tmp_path / "qwen3", "qwen3")
    (tmp_path / "qwen3" / "model.safetensors").unlink()
    with pytest.raises(ppl.ArgumentError, match="safetensors"):
        ppl.lm.load_checkpoint(str(tmp_path / "qwen3"))
    with pytest.raises(ppl.ArgumentError, match="no config.json"):
        ppl.lm.load_checkpoint(str(tmp_path))


# -- docstring examples -------------------------------------------------------------------------------------------


# ppl.lm's own docstring runs in tests/test_doctests.py with the other top-level modules.
@pytest.mark.parametrize("name", ["ppl.lm._config", "ppl.lm._transformer", "ppl.lm._sampling",
                                  "ppl.lm._state", "ppl.lm._step"])
def test_docstring_examples_run(name):
    globs = {"jax": jax, "jnp": jnp, "ppl": ppl}
    failures, attempted = doctest.testmod(importlib.import_module(name), extraglobs=globs, verbose=False)
    assert attempted > 0 and failures == 0
