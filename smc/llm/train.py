"""Train the built-in language model and learned reward model of the arithmetic task.

    python -m smc.llm.train                  # writes smc/llm/builtin/{policy,prm}
    python -m smc.llm.train --out DIR        # elsewhere

Deterministic from `--seed`: the same seed gives the same weights on the same
machine and library versions (XLA's CPU reductions are deterministic). The policy is a
two-layer Llama-style transformer trained by teacher forcing on correct solutions and
deliberately undertrained, so a single sampled solution is right 20-50% of the time and
search has something to find. The reward model (a PRM) is the same architecture,
started from the policy's weights and fine-tuned to answer "Y" or "N" after "?"
appended to a partial solution, on the policy's own samples labelled step by step by
the exact checker; its score is P(Y) / (P(Y) + P(N)).
Both are written in the Hugging Face layout (config.json, model.safetensors,
tokenizer.json) and load with `ppl.lm.load`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ppl
from ppl.lm import Transformer, TransformerConfig, init_state, lm_step
from ppl.lm._checkpoint import _LAYER_WEIGHTS, _wanted

from . import _task as task

TRAIN_SEED_OFFSET = 1000  # problems for training come from seeds seed + 1000 + ..., test from seed
SEQ_LEN = 60  # longest prompt + solution is 56 characters
PROMPT_LEN = 20  # longest prompt is 19 characters
CACHE_SIZE = 80
NUM_STEPS = 6  # four operations and the answer, plus one spare


def config() -> TransformerConfig:
    return TransformerConfig(vocab_size=len(task.VOCAB), hidden_size=64, intermediate_size=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                             tie_word_embeddings=True)


# -- data ----------------------------------------------------------------------------------------


def _pad(ids, n, fill=0):
    out = np.full(n, fill, np.int32)
    out[: len(ids)] = ids
    return out


def policy_batch_data(problems):
    """tokens [n, SEQ_LEN] and a mask [n, SEQ_LEN] of the positions whose next token is
    trained (the solution's tokens, not the prompt's)."""
    tokens, mask = [], []
    for p in problems:
        prompt, solution = task.encode(task.prompt_text(p)), task.encode("".join(task.solution_steps(p)))
        ids = np.concatenate([prompt, solution])
        tokens.append(_pad(ids, SEQ_LEN))
        m = np.zeros(SEQ_LEN, np.float32)
        m[len(prompt) - 1 : len(ids) - 1] = 1.0  # predict solution token i from the position before it
        mask.append(m)
    return np.stack(tokens), np.stack(mask)


# -- training ------------------------------------------------------------------------------------


def _next_token_loss(model, tokens, mask):
    logits = jax.vmap(model)(tokens)  # [B, S, V]
    targets = jnp.roll(tokens, -1, axis=1)
    lp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


def train(key, model, tokens, mask, steps, batch, lr):
    """Adam on the next-token loss at the masked positions, one jitted scan."""
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, 50, steps, lr * 0.1), weight_decay=0.01)
    state = opt.init(model)

    @jax.jit
    def run(model, state, key):
        def body(carry, k):
            model, state = carry
            idx = jax.random.randint(k, (batch,), 0, tokens.shape[0])
            loss, g = jax.value_and_grad(_next_token_loss)(model, tokens[idx], mask[idx])
            updates, state = opt.update(g, state, model)
            return (optax.apply_updates(model, updates), state), loss

        (model, state), losses = jax.lax.scan(body, (model, state), jax.random.split(key, steps))
        return model, losses

    return run(model, state, key)


# -- sampling solutions with the policy ----------------------------------------------------------


def sample_solutions(key, model, problems, temperature=1.0):
    """One sampled solution per problem (text of its steps), by the `ppl.lm` step."""
    step = lm_step(model, task.MAX_STEP_LEN, stop_tokens=(task.VOCAB.index("\n"),),
                   eos_tokens=(task.VOCAB.index("$"),), temperature=temperature)
    prompts = np.stack([_pad(task.encode(task.prompt_text(p)), PROMPT_LEN) for p in problems])
    lengths = np.array([len(task.prompt_text(p)) for p in problems], np.int32)
    scan = ppl.scan(step, NUM_STEPS)

    @jax.jit
    def run(key, prompts, lengths):
        def one(i, prompt, length):
            state = init_state(model, prompt, CACHE_SIZE, prompt_length=length)
            return scan.simulate(ppl.particle_key(key, i), (state, None))[()]

        return jax.vmap(one)(jnp.arange(prompts.shape[0]), prompts, lengths)

    steps = np.asarray(run(key, jnp.asarray(prompts), jnp.asarray(lengths)))  # [n, NUM_STEPS, L]
    return [[task.decode(s) for s in row if (s >= 0).any()] for row in steps]


def accuracy(key, model, problems) -> float:
    sols = sample_solutions(key, model, problems)
    return float(np.mean([task.check_solution(p, "".join(s)) for p, s in zip(problems, sols)]))


# -- the reward model ----------------------------------------------------------------------------


def prm_data(problems, solutions):
    """(tokens [n, SEQ_LEN], position of "?" [n], label [n]) for every prefix of every
    sampled solution: prompt + steps[:k] + "?" -> Y if every step so far is right."""
    tokens, where, labels = [], [], []
    for p, steps in zip(problems, solutions):
        for k, ok in enumerate(task.step_labels(p, steps), start=1):
            text = task.prompt_text(p) + "".join(steps[:k]) + "?"
            if len(text) > SEQ_LEN:
                continue
            tokens.append(_pad(task.encode(text), SEQ_LEN))
            where.append(len(text) - 1)
            labels.append(ok)
    return np.stack(tokens), np.asarray(where, np.int32), np.asarray(labels, bool)


def train_prm(key, model, tokens, where, labels, steps, batch, lr):
    yes, no = task.VOCAB.index("Y"), task.VOCAB.index("N")
    # balance the classes: each batch draws half from each
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, 50, steps, lr * 0.1), weight_decay=0.01)
    state = opt.init(model)

    def loss_fn(model, idx):
        logits = jax.vmap(model)(tokens[idx])  # [B, S, V]
        at = jnp.take_along_axis(logits, where[idx][:, None, None], axis=1)[:, 0]  # [B, V]
        two = jnp.stack([at[:, no], at[:, yes]], axis=-1)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(two), labels[idx].astype(jnp.int32)[:, None], 1))

    tokens, where, labels = jnp.asarray(tokens), jnp.asarray(where), jnp.asarray(labels)

    @jax.jit
    def run(model, state, key):
        def body(carry, k):
            model, state = carry
            k1, k2 = jax.random.split(k)
            idx = jnp.concatenate([jax.random.choice(k1, pos, (batch // 2,)), jax.random.choice(k2, neg, (batch // 2,))])
            loss, g = jax.value_and_grad(loss_fn)(model, idx)
            updates, state = opt.update(g, state, model)
            return (optax.apply_updates(model, updates), state), loss

        (model, state), losses = jax.lax.scan(body, (model, state), jax.random.split(key, steps))
        return model, losses

    return run(model, state, key)


def prm_accuracy(model, tokens, where, labels) -> float:
    yes, no = task.VOCAB.index("Y"), task.VOCAB.index("N")
    logits = jax.jit(jax.vmap(model))(jnp.asarray(tokens))
    at = np.asarray(logits)[np.arange(len(where)), where]
    return float(np.mean((at[:, yes] > at[:, no]) == labels))


# -- writing a checkpoint ------------------------------------------------------------------------

def save(model: Transformer, folder: str, meta: dict) -> None:
    """`model` as a Llama checkpoint folder (config.json, model.safetensors, tokenizer.json)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    c = model.config
    tensors = {"model.embed_tokens.weight": np.asarray(model.embed), "model.norm.weight": np.asarray(model.norm)}
    for ours in _wanted(c):  # the loader's own name map, inverted
        theirs, transpose = _LAYER_WEIGHTS[ours]
        stacked = np.asarray(model.layers[ours])
        for i in range(c.num_layers):
            tensors[f"model.layers.{i}.{theirs}"] = np.ascontiguousarray(stacked[i].T if transpose else stacked[i])
    if model.lm_head is not None:
        tensors["lm_head.weight"] = np.ascontiguousarray(np.asarray(model.lm_head).T)
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings, "hidden_act": "silu",
        "eos_token_id": task.VOCAB.index(task.END_OF_ANSWER), "torch_dtype": "float32", "ppl_task": meta,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    task.make_tokenizer().save(os.path.join(folder, "tokenizer.json"))


def main(argv=None):
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=here)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-steps", type=int, default=1000)
    parser.add_argument("--prm-steps", type=int, default=1200)
    parser.add_argument("--policy-only", action="store_true", help="train and evaluate the policy only")
    args = parser.parse_args(argv)
    key = jax.random.key(args.seed)
    k_init, k_train, k_eval, k_samples, _, k_prm = jax.random.split(key, 6)
    t0 = time.time()
    train_problems = task.sample_problems(args.seed + TRAIN_SEED_OFFSET, 20_000)
    test_problems = task.sample_problems(args.seed, 200)
    tokens, mask = policy_batch_data(train_problems)
    policy = Transformer.random(k_init, config())
    policy, losses = train(k_train, policy, jnp.asarray(tokens), jnp.asarray(mask), args.policy_steps, 64, 3e-3)
    acc = accuracy(k_eval, policy, test_problems)
    print(f"policy: loss {float(losses[-50:].mean()):.3f}, single-sample accuracy {acc:.3f} "
          f"on {len(test_problems)} held-out problems ({time.time() - t0:.0f} s)")

    if args.policy_only:
        return
    sample_from = train_problems[:2000]
    sols = sample_solutions(k_samples, policy, sample_from)
    ptok, pwhere, plabels = prm_data(sample_from, sols)
    # the reward model starts from the policy's weights (it already reads the task's
    # arithmetic) and is fine-tuned to answer Y / N
    prm, plosses = train_prm(k_prm, policy, ptok, pwhere, plabels, args.prm_steps, 64, 1e-3)
    test_sols = sample_solutions(jax.random.fold_in(k_samples, 1), policy, test_problems)
    ttok, twhere, tlabels = prm_data(test_problems, test_sols)
    prm_acc = prm_accuracy(prm, ttok, twhere, tlabels)
    print(f"reward model: {len(plabels)} labelled prefixes ({plabels.mean():.2f} correct), loss "
          f"{float(plosses[-50:].mean()):.3f}, held-out verdict accuracy {prm_acc:.3f} ({time.time() - t0:.0f} s)")
    meta = {"seed": args.seed, "policy_steps": args.policy_steps, "prm_steps": args.prm_steps,
            "single_sample_accuracy": acc, "prm_verdict_accuracy": prm_acc}
    save(policy, os.path.join(args.out, "policy"), {**meta, "role": "policy"})
    save(prm, os.path.join(args.out, "prm"), {**meta, "role": "prm"})
    print(f"wrote {args.out}/policy and {args.out}/prm")


if __name__ == "__main__":
    main()
