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

Part 2, throughput. The fully jitted particle filter (its_hub's configuration, learned
PRM) as the methods run it (one program per chunk of problems: every step, the
resampling and the KV-cache gathers inside one `lax.scan`), in both layouts (problems
one after another in the program, or problems x particles as one population for the
policy), against the filter driven as its_hub drives it: a Python loop of per-step
jitted calls (one LM step + PRM for the particles), weights brought to the host,
multinomial resampling in numpy, then a jitted gather of the carries (KV caches); and
its_hub's text-state architecture (no cache kept across steps). Tokens per second (after
compilation, best of repeats interleaved in one process: the ratios are from one run),
and the share of the step time spent gathering caches.

Part 3, memory. What a direct `smc.particle_filter` call returns and needs with
`history="traces"` (every step's kernel traces, whose args and return value hold the
LM and PRM KV caches before and after each step) and `history="choices"` (choices and
rewards only): bytes of the history, and XLA's memory analysis of the compiled call; and
of a method's jitted program.

Part 4, reward temperature. Particle filtering at a fixed N against beta (the target
p(steps) r(prefix)^beta), with both PRMs, read by weighted vote and by the best weight.

    python benchmarks/llm_scaling.py --parts throughput,memory    # a subset of the parts
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
from smc.llm import _methods as llm_methods  # noqa: E402
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


def throughput(b, problems, sizes, sink, repeats=3):
    """Tokens per second of four drivers of the same its_hub-style filter (learned PRM), each
    the best of `repeats` timed runs after a compiling one, all in this process: the jitted
    method in its two layouts (problems one after another in a call, the default; problems
    x particles as one population), the per-step host loop, and the text-state host loop.
    (its_hub's filter runs every step in the jitted program; the host loops stop once every
    particle has finished, as its_hub does.)"""
    reward = llm.learned_prm(b.prm.model)
    rows = []
    for n in sizes:
        def jitted(layout):
            t0 = time.perf_counter()
            res = llm.its_hub_particle_filtering(jax.random.key(1), b.step, reward, problems, n, layout=layout)
            return int(res.tokens.sum()), time.perf_counter() - t0

        drivers = {
            "per_problem": lambda: jitted("per_problem"),
            "population": lambda: jitted("population"),
            "host_loop": lambda: host_loop_filter(b, reward, problems, n, seed=1)[:2],
            "its_hub_text": lambda: host_text_filter(b, problems, n, seed=1),
        }
        for layout in llm_methods.LAYOUTS:  # compile
            llm.its_hub_particle_filtering(jax.random.key(0), b.step, reward, problems, n, layout=layout)
        host_loop_filter(b, reward, problems[:1], n)
        host_text_filter(b, problems[:1], n)
        best = {}
        for _ in range(repeats):  # interleaved, so that the machine's load hits every driver alike
            for name, run in drivers.items():
                tokens, seconds = run()
                if name not in best or seconds < best[name][1]:
                    best[name] = (tokens, seconds)
        rate = {name: tokens / seconds for name, (tokens, seconds) in best.items()}
        gather_s = host_loop_filter(b, reward, problems, n, seed=1)[2]
        row = {"case": "throughput", "num_particles": n, "problems": problems.num_problems,
               "population_rows": min(problems.num_problems, max(1, llm_methods.POPULATION_ROWS // n)) * n,
               **{f"{name}_tokens_per_s": round(r, 1) for name, r in rate.items()},
               "ratio_vs_host_loop": round(rate["per_problem"] / rate["host_loop"], 2),
               "ratio_vs_its_hub_text": round(rate["per_problem"] / rate["its_hub_text"], 2),
               "ratio_population_vs_host_loop": round(rate["population"] / rate["host_loop"], 2),
               "ratio_population_vs_per_problem": round(rate["population"] / rate["per_problem"], 2),
               **{f"{name}_seconds": round(seconds, 3) for name, (_, seconds) in best.items()},
               "host_loop_gather_share": round(gather_s / best["host_loop"][1], 3),
               "jitted_gather_share": round(_jitted_gather_share(b, reward, problems, n), 3)}
        emit(row, sink)
        rows.append(row)
    return rows


def _identity_resampler(key, log_weights, n):
    return jnp.arange(n, dtype=jnp.int32)


def _jitted_gather_share(b, reward, problems, n):
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


def history_memory(b, n, sink, num_problems=4):
    """What a run keeps and needs, for one problem with the learned PRM at N particles.

    A direct `smc.particle_filter` call with each `history`: the bytes of the returned
    history, and XLA's memory analysis of the compiled call (output and temporary
    buffers). And a method's jitted program (`particle_filtering`) on `num_problems`
    problems, in each layout."""
    reward = llm.learned_prm(b.prm.model)
    model = llm.reasoning_model(b.step, reward, b.num_steps)
    problems = llm.encode_problems(task.sample_problems(0, num_problems))
    problem = problems[0]
    carry = llm.init_carry(b.step, reward, problem, b.cache_size)
    one_carry = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry))
    rows = []
    for history in ("traces", "choices"):
        def run(c, h=history):
            return smc.particle_filter(jax.random.key(0), model, (c, problem.expected), {}, n,
                                       is_finished=llm.is_finished, history=h)

        kept = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(run, carry)._steps))
        memory = jax.jit(run).lower(carry).compile().memory_analysis()
        row = {"case": "history_memory", "history": history, "num_particles": n, "num_steps": b.num_steps,
               "history_bytes_per_problem": int(kept), "carry_bytes_per_particle": int(one_carry),
               "carries_per_particle_step": round(kept / (n * b.num_steps * one_carry), 3),
               **_memory_fields(memory)}
        emit(row, sink)
        rows.append(row)
    config = llm_methods._Config("filter", b.step, reward, b.num_steps, n, 1.0, "log", "ratio", "systematic", 0.5,
                                 None, b.cache_size, 1, None)
    keys = jax.random.split(jax.random.key(0), num_problems)
    for layout in llm_methods.LAYOUTS:
        memory = llm_methods._run_chunk.lower(keys, problems, config, layout).compile().memory_analysis()
        row = {"case": "method_memory", "method": "particle_filtering", "layout": layout, "num_particles": n,
               "problems_per_call": num_problems, **_memory_fields(memory)}
        emit(row, sink)
        rows.append(row)
    return rows


def _memory_fields(memory):
    if memory is None:  # a backend without memory analysis
        return {}
    return {"compiled_output_bytes": int(memory.output_size_in_bytes),
            "compiled_temp_bytes": int(memory.temp_size_in_bytes),
            "compiled_argument_bytes": int(memory.argument_size_in_bytes)}


# -- part 4 --------------------------------------------------------------------------------------------


def beta_sweep(b, problems, betas, n, sink, seed=0):
    """Accuracy of particle filtering against the reward temperature beta at N particles,
    with both PRMs: the target is p(steps) * r(prefix)^beta ("ratio" weighting, log link),
    so beta = 0 ignores the PRM and a large beta trusts it completely. The same run is
    read with both selections (weighted majority vote and the best final weight)."""
    rewards = {"learned": llm.learned_prm(b.prm.model), "checker": llm.step_checker(fp=0.1, fn=0.05)}
    rows = []
    for prm_name, reward in rewards.items():
        key = jax.random.fold_in(jax.random.key(seed), 7 + len(prm_name))
        for beta in betas:
            t0 = time.perf_counter()
            res = llm.particle_filtering(key, b.step, reward, problems, n, beta=beta, selection="vote")
            seconds = time.perf_counter() - t0
            argmax = res._replace(answer=llm.select_answer(res.answers, res.log_weights, "argmax"))
            for method, r in (("pf_vote", res), ("pf_argmax", argmax)):
                row = {"case": "beta_sweep", "method": method, "prm": prm_name, "beta": beta, "budget": n,
                       "accuracy": round(r.accuracy, 4), "stderr": round(r.stderr, 4),
                       "tokens": int(r.tokens.sum()), "seconds": round(seconds, 2), "problems": len(r.truth)}
                emit(row, sink)
                rows.append(row)
    return rows


PARTS = ("accuracy", "throughput", "memory", "beta")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--problems", type=int, default=None)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--skip-accuracy", action="store_true", help="same as leaving 'accuracy' out of --parts")
    parser.add_argument("--name", default=None, help="output file stem in examples/out (default llm_scaling, "
                                                     "llm_scaling_quick with --quick)")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    if args.skip_accuracy:
        parts.discard("accuracy")
    os.makedirs(OUT, exist_ok=True)
    b = llm.builtin()
    num = args.problems or (40 if args.quick else 200)
    problems = llm.encode_problems(task.sample_problems(0, num))
    budgets = (2, 8) if args.quick else (1, 2, 4, 8, 16, 32, 64)
    t0 = time.perf_counter()
    name = args.name or ("llm_scaling_quick" if args.quick else "llm_scaling")
    with open(os.path.join(OUT, name + ".jsonl"), "w") as sink:
        if "accuracy" in parts:
            rows = accuracy_vs_budget(b, problems, budgets, sink)
            plot(rows, os.path.join(OUT, name + ".png"))
        sizes = (16,) if args.quick else (16, 64)
        if "throughput" in parts:
            throughput(b, problems[: (8 if args.quick else 50)], sizes, sink, repeats=2 if args.quick else 3)
        if "memory" in parts:
            for n in sizes:
                history_memory(b, n, sink)
        if "beta" in parts:
            betas = (1.0, 4.0) if args.quick else (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
            beta_sweep(b, problems, betas, 8 if args.quick else 16, sink)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
