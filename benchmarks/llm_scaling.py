"""Inference-time scaling on the built-in arithmetic task: accuracy vs budget, and throughput.

    python benchmarks/llm_scaling.py            # 200 held-out problems, N = 1..64 (tens of minutes)
    python benchmarks/llm_scaling.py --quick    # 40 problems, N = 2, 8; throughput at N = 16 (< 3 min)

Part 1, accuracy vs budget. Every method of `smc.llm` on the held-out problems
(`task.sample_problems(seed=0, ...)`; training used seeds >= 1000), with two process
reward models: the learned PRM shipped with the package, and the programmatic step
checker with a deterministic noise (false positives 10%, false negatives 5%). Budget N
is the number of particles (x sweeps for particle Gibbs, N / 2 particles x 2 sweeps).
Best-of-N, weighted majority vote and self-consistency read the first N of one run of 64
independent solutions. One JSON line per (method, prm, budget): accuracy, binomial
stderr, LM step calls, generated tokens, seconds (the run, compile included once per
shape), to stdout and examples/out/llm_scaling.jsonl; curves to
examples/out/llm_scaling.png (llm_scaling_quick.* with --quick).

Part 2, throughput. The fully jitted particle filter (one program: every step, the
resampling and the KV-cache gathers inside one `lax.scan`, problems vmapped) against
the same filter driven as its_hub drives it: a Python loop of per-step jitted calls
(one LM step + PRM for the particles), weights brought to the host, multinomial
resampling in numpy, then a jitted gather of the carries (KV caches). Tokens per second
(after compilation), and the share of the step time spent gathering caches.

Part 3, memory of the stored history: the filter keeps every step's kernel traces
([T, N, ...]), whose args and return value hold the particle's carry: LM and PRM KV
caches before and after each step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import smc  # noqa: E402
import smc.llm as llm  # noqa: E402
from smc.llm import task  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "out")  # ignored by git


def emit(row, sink):
    line = json.dumps(row)
    print(line, flush=True)
    sink.write(line + "\n")
    sink.flush()


# -- part 1 --------------------------------------------------------------------------------------------


def methods(b):
    """(name, function(key, reward, problems, n) -> SearchResult, minimum budget)."""
    step = b.step
    return [
        ("pf_vote", lambda k, r, p, n: llm.particle_filtering(k, step, r, p, n, selection="vote"), 1),
        ("pf_argmax", None, 1),  # same run as pf_vote, other selection
        ("its_hub_pf", lambda k, r, p, n: llm.its_hub_particle_filtering(k, step, r, p, n), 1),
        ("beam", lambda k, r, p, n: llm.beam_search(k, step, r, p, n), 1),
        ("particle_gibbs", lambda k, r, p, n: llm.particle_gibbs(k, step, r, p, n // 2, num_iterations=2), 4),
    ]


def accuracy_vs_budget(b, problems, budgets, sink, seed=0):
    rewards = {"learned": llm.learned_prm(b.prm.model), "checker": llm.step_checker(fp=0.1, fn=0.05)}
    rows = []
    for prm_name, reward in rewards.items():
        key = jax.random.fold_in(jax.random.key(seed), len(prm_name))
        # one run of max(budgets) independent solutions; each budget reads its first N
        t0 = time.perf_counter()
        bon = llm.best_of_n(key, b.step, reward, problems, max(budgets), aggregate="last")
        bon_min = bon._replace(log_weights=_aggregate_from(bon, "min"))
        bon_seconds = time.perf_counter() - t0
        for n in budgets:
            share = bon_seconds * n / max(budgets)
            for name, res in (("best_of_n", bon.first(n, "argmax")), ("best_of_n_min", bon_min.first(n, "argmax")),
                              ("weighted_vote", bon.first(n, "vote")), ("self_consistency", bon.first(n, "majority"))):
                rows.append(_row(name, prm_name, n, res, share, sink))
        for n in budgets:
            for name, fn, least in methods(b):
                if fn is None or n < least:
                    continue
                t0 = time.perf_counter()
                res = fn(jax.random.fold_in(key, n), reward, problems, n)
                seconds = time.perf_counter() - t0
                rows.append(_row(name, prm_name, n, res, seconds, sink))
                if name == "pf_vote":
                    argmax = res._replace(answer=llm.select_answer(res.answers, res.log_weights, "argmax"))
                    rows.append(_row("pf_argmax", prm_name, n, argmax, seconds, sink))
    return rows


def _aggregate_from(res, how):
    from smc.llm._methods import _aggregate

    running = np.zeros(res.step_rewards.shape, bool)
    calls = res.slot_calls  # steps each particle ran: the first `calls` steps
    running[:] = np.arange(res.step_rewards.shape[1])[None, :, None] < calls[:, None, :]
    return _aggregate(res.step_rewards, running, how)


def _row(method, prm, budget, res, seconds, sink):
    row = {"method": method, "prm": prm, "budget": budget, "accuracy": round(res.accuracy, 4),
           "stderr": round(res.stderr, 4), "lm_calls": int(res.lm_calls.sum()), "tokens": int(res.tokens.sum()),
           "seconds": round(seconds, 2), "problems": len(res.truth)}
    emit(row, sink)
    return row


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    prms = sorted({r["prm"] for r in rows})
    fig, axes = plt.subplots(1, len(prms), figsize=(6 * len(prms), 4.2), sharey=True)
    for ax, prm in zip(np.atleast_1d(axes), prms):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["budget"], r["accuracy"], r["stderr"]) for r in rows
                         if r["prm"] == prm and r["method"] == method)
            if pts:
                x, y, e = map(np.array, zip(*pts))
                ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget N (particles x sweeps)")
        ax.set_title(f"PRM: {prm}")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


# -- part 2 --------------------------------------------------------------------------------------------


def host_loop_filter(b, reward, problems, n, seed=0, num_steps=None):
    """its_hub's architecture: per step one jitted call for the particles' LM step and PRM,
    the weights to the host, multinomial resampling in numpy, a jitted gather of the carries.
    The same model and weighting as `its_hub_particle_filtering`. Returns (tokens, seconds,
    gather seconds)."""
    num_steps = num_steps or b.num_steps
    model = llm.reasoning_model(b.step, reward, num_steps, 1.0, "logit", "current")
    kernel = model.kernel
    rng = np.random.default_rng(seed)
    step_fn, gather_fn, init_fn = _host_programs(kernel, reward, b, n)
    tokens = 0
    total = gather_total = 0.0
    for i in range(problems.num_problems):
        problem = problems[i]
        t0 = time.perf_counter()
        carry = jax.block_until_ready(init_fn(problem))
        total += time.perf_counter() - t0
        for t in range(num_steps):
            t0 = time.perf_counter()
            keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), i * 100 + t), n)
            carry, step_tokens, log_w = step_fn(keys, carry, problem.expected[t])
            log_w = np.asarray(log_w, np.float64)  # to the host
            done = np.asarray(carry.lm.is_finished)
            tokens += int(np.sum(np.asarray(step_tokens) >= 0))
            if done.all():
                total += time.perf_counter() - t0
                break
            p = np.exp(log_w - log_w.max())
            ancestors = rng.choice(n, size=n, p=p / p.sum())
            g0 = time.perf_counter()
            carry = jax.block_until_ready(gather_fn(carry, jnp.asarray(ancestors, jnp.int32)))
            gather_total += time.perf_counter() - g0
            total += time.perf_counter() - t0
    return tokens, total, gather_total


def host_text_filter(b, problems, n, seed=0, num_steps=None):
    """its_hub's architecture in full: the particles' state is their text on the host.
    Each step the LM gets prompt + steps so far (re-encoded and prefilled, no KV cache kept
    across steps, as a stateless generation API), draws one step; the PRM scores prompt +
    steps + "?" from scratch; weights to the host, multinomial resampling by copying the
    particles' lists of steps. Same policy, PRM, weighting (logit of the current prefix)
    and stopping as `its_hub_particle_filtering`. Returns (tokens, seconds)."""
    num_steps = num_steps or b.num_steps
    width = PREFIX_LEN
    prefill_step, prm_score = _text_programs(b, n, width)
    rng = np.random.default_rng(seed)
    tokens = 0
    t0 = time.perf_counter()
    for i in range(problems.num_problems):
        prompt = task.decode(np.asarray(problems.prompt[i])[: int(problems.prompt_length[i])])
        steps = [[] for _ in range(n)]
        stopped = [False] * n
        for t in range(num_steps):
            texts = [prompt + "".join(s) for s in steps]
            ids = np.full((n, width), -1, np.int32)
            lengths = np.zeros(n, np.int32)
            for j, text in enumerate(texts):
                e = task.encode(text)
                ids[j, : len(e)], lengths[j] = e, len(e)
            keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), i * 100 + t), n)
            new = np.asarray(prefill_step(keys, jnp.asarray(ids), jnp.asarray(lengths)))
            for j in range(n):
                if stopped[j]:
                    continue
                step_text = task.decode(new[j][new[j] >= 0])
                tokens += int(np.sum(new[j] >= 0))
                steps[j] = steps[j] + [step_text]
                stopped[j] = task.END_OF_ANSWER in step_text
            ids = np.full((n, width), -1, np.int32)
            for j, s in enumerate(steps):
                e = task.encode(prompt + "".join(s) + "?")[:width]
                ids[j, : len(e)], lengths[j] = e, len(e)
            r = np.asarray(prm_score(jnp.asarray(ids), jnp.asarray(lengths)), np.float64)
            r = np.clip(r, 1.1920929e-07, 1 - 1.1920929e-07)
            log_w = np.log(r) - np.log1p(-r)
            if all(stopped):
                break
            p = np.exp(log_w - log_w.max())
            picks = rng.choice(n, size=n, p=p / p.sum())
            steps = [list(steps[a]) for a in picks]
            stopped = [stopped[a] for a in picks]
    return tokens, time.perf_counter() - t0


PREFIX_LEN = 72  # longest prompt (19) + five steps of at most 10 tokens + "?"
_TEXT = {}


def _text_programs(b, n, width):
    if (n, width) not in _TEXT:
        from ppl.lm import init_state

        step, prm = b.step, b.prm.model
        yes, no = task.VOCAB.index("Y"), task.VOCAB.index("N")

        @jax.jit
        def prefill_step(keys, ids, lengths):
            def one(k, row, length):
                state = init_state(step.model, row, b.cache_size, prompt_length=length)
                return step.sample(k, state)[1]
            return jax.vmap(one)(keys, ids, lengths)

        @jax.jit
        def prm_score(ids, lengths):
            def one(row, length):
                hidden, _ = prm.forward(row, jnp.arange(width, dtype=jnp.int32), None)
                logits = prm.logits(hidden[length - 1])
                return jax.nn.sigmoid(logits[yes] - logits[no])
            return jax.vmap(one)(ids, lengths)

        _TEXT[(n, width)] = prefill_step, prm_score
    return _TEXT[(n, width)]


_HOST = {}


def _host_programs(kernel, reward, b, n):
    key = (kernel, reward, n)
    if key not in _HOST:
        @jax.jit
        def step_fn(keys, carry, x):
            def one(k, c):
                tr = kernel.simulate(k, (c, x))
                new_carry, tokens = tr.retval
                return new_carry, tokens, tr["prm"]
            new_carry, tokens, r = jax.vmap(one)(keys, carry)
            eps = jnp.finfo(jnp.float32).eps
            r = jnp.clip(r, eps, 1 - eps)
            return new_carry, tokens, jnp.log(r) - jnp.log1p(-r)

        @jax.jit
        def gather_fn(carry, ancestors):
            return jax.tree.map(lambda c: c[ancestors], carry)

        @jax.jit
        def init_fn(problem):
            carry = llm.init_carry(b.step, reward, problem, b.cache_size, "logit")
            return jax.tree.map(lambda c: jnp.broadcast_to(c, (n,) + jnp.shape(c)), carry)

        _HOST[key] = step_fn, gather_fn, init_fn
    return _HOST[key]


def throughput(b, problems, sizes, sink):
    reward = llm.learned_prm(b.prm.model)
    rows = []
    for n in sizes:
        # warm up (compile) on one problem, then time
        llm.its_hub_particle_filtering(jax.random.key(0), b.step, reward, problems, n)
        host_loop_filter(b, reward, problems[:1], n)
        t0 = time.perf_counter()
        res = llm.its_hub_particle_filtering(jax.random.key(1), b.step, reward, problems, n)
        jitted_s = time.perf_counter() - t0
        jitted_tokens = int(res.tokens.sum())
        host_tokens, host_s, gather_s = host_loop_filter(b, reward, problems, n, seed=1)
        host_text_filter(b, problems[:1], n)
        text_tokens, text_s = host_text_filter(b, problems, n, seed=1)
        jit_gather_share = _jitted_gather_share(b, reward, problems, n, jitted_s)
        row = {"case": "throughput", "num_particles": n, "problems": problems.num_problems,
               "jitted_tokens_per_s": round(jitted_tokens / jitted_s, 1),
               "host_loop_tokens_per_s": round(host_tokens / host_s, 1),
               "ratio": round((jitted_tokens / jitted_s) / (host_tokens / host_s), 2),
               "its_hub_text_tokens_per_s": round(text_tokens / text_s, 1),
               "ratio_vs_its_hub_text": round((jitted_tokens / jitted_s) / (text_tokens / text_s), 2),
               "jitted_seconds": round(jitted_s, 3), "host_loop_seconds": round(host_s, 3),
               "host_loop_gather_share": round(gather_s / host_s, 3),
               "jitted_gather_share": round(jit_gather_share, 3)}
        emit(row, sink)
        rows.append(row)
    return rows


def _identity_resampler(key, log_weights, n):
    return jnp.arange(n, dtype=jnp.int32)


def _jitted_gather_share(b, reward, problems, n, jitted_s):
    """Share of the jitted run spent resampling and gathering the carries: the its_hub
    configuration with a resampler that keeps every particle (the filter still gathers
    every carry before every step) against the same run that never resamples (no gather);
    same particles, same steps, so the difference is the gathers (and the resampler call)."""
    kw = dict(link="logit", weighting="current", selection="argmax")

    def run(ess):
        t0 = time.perf_counter()
        llm.particle_filtering(jax.random.key(1), b.step, reward, problems, n, resampling=_identity_resampler,
                               ess_threshold=ess, **kw)
        return time.perf_counter() - t0

    run(1.0), run(0.0)  # compile
    with_gather = min(run(1.0) for _ in range(2))
    without = min(run(0.0) for _ in range(2))
    return max(with_gather - without, 0.0) / with_gather


# -- part 3 --------------------------------------------------------------------------------------------


def history_memory(b, n, sink):
    reward = llm.learned_prm(b.prm.model)
    model = llm.reasoning_model(b.step, reward, b.num_steps)
    problem = llm.encode_problems(task.sample_problems(0, 1))[0]
    carry = llm.init_carry(b.step, reward, problem, b.cache_size)
    shapes = jax.eval_shape(lambda c: smc.particle_filter(jax.random.key(0), model, (c, problem.expected), {}, n,
                                                          is_finished=llm.is_finished)._steps, carry)
    history = sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
    one_carry = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry))
    row = {"case": "history_memory", "num_particles": n, "num_steps": b.num_steps,
           "history_bytes_per_problem": int(history), "carry_bytes_per_particle": int(one_carry),
           "carries_per_particle_step": round(history / (n * b.num_steps * one_carry), 2)}
    emit(row, sink)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--problems", type=int, default=None)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    b = llm.builtin()
    num = args.problems or (40 if args.quick else 200)
    problems = llm.encode_problems(task.sample_problems(0, num))
    budgets = (2, 8) if args.quick else (1, 2, 4, 8, 16, 32, 64)
    t0 = time.perf_counter()
    name = "llm_scaling_quick" if args.quick else "llm_scaling"
    with open(os.path.join(OUT, name + ".jsonl"), "w") as sink:
        if not args.skip_accuracy:
            rows = accuracy_vs_budget(b, problems, budgets, sink)
            plot(rows, os.path.join(OUT, name + ".png"))
        sizes = (16,) if args.quick else (16, 64)
        throughput(b, problems[: (8 if args.quick else 50)], sizes, sink)
        for n in sizes:
            history_memory(b, n, sink)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
