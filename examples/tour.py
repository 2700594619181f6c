"""A tour of ppl-jax on built-in (simulated) data; prints every result.

Run `python examples/tour.py` (about half a minute on a laptop CPU; `--quick` is smaller):

  (a) a Bayesian linear regression `@ppl.gen` model: simulate, the trace, assess == score
  (b) generate: condition on observations, the importance weight
  (c) inference.importance: posterior mean/sd, log marginal, ESS, SIR resampling; the
      slope posterior against its exact conjugate answer when the noise is known
  (d) combinators: ppl.vmap over data points; a ppl.scan random-walk state-space model,
      its importance-sampling evidence against an exact Kalman filter
  (e) update / regenerate: one Metropolis-Hastings move written by hand, then a chain
  (f) a friendly error: a misspelled constraint address
  (g) reinterpreting a model with site handlers: a deterministic site, tempering the
      likelihood, and the unconstrained density HMC samples (checked by hand)
  (h) MCMC: NUTS chains on the regression (summary table with r_hat and ESS), the slope
      posterior against its exact answer, posterior predictive draws
  (i) SMC: a particle filter on the random walk of (d), its evidence against the Kalman
      filter where importance sampling failed, and whole trajectories from the genealogy
  (j) VI: an automatic Gaussian guide fitted by the ELBO (against the exact posterior),
      then an objective written by hand (IWAE) and its unbiased gradient
  (k) LLM inference-time scaling: one arithmetic problem solved by particle filtering
      with the built-in language model and its learned process reward model

Every section is a function `section(key, data, cfg)`; add new ones to SECTIONS.
"""

import argparse

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import optax
from jax.scipy.special import logsumexp

import inference
import ppl
import smc
import vi

TRUE_SLOPE, TRUE_NOISE, KNOWN_NOISE = 1.5, 0.5, 0.5
Q, R = 0.3, 1.0  # random walk: step sd and observation-noise sd


# --------------------------------------------------------------------------- models
@ppl.gen
def regression(xs):
    slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
    noise = ppl.sample("noise", dist.HalfNormal(1.0))
    return ppl.sample("ys", dist.Normal(slope * xs, noise))


@ppl.gen
def regression_known_noise(xs):
    slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
    return ppl.sample("ys", dist.Normal(slope * xs, KNOWN_NOISE))


@ppl.gen
def point(x, slope, noise):  # one data point: the sub-model that ppl.vmap repeats
    return ppl.sample("y", dist.Normal(slope * x, noise))


@ppl.gen
def regression_vmap(xs):
    slope = ppl.sample("slope", dist.Normal(0.0, 1.0))
    noise = ppl.sample("noise", dist.HalfNormal(1.0))
    return ppl.sample("points", ppl.vmap(point, in_axes=(0, None, None)), xs, slope, noise)


@ppl.gen
def walk_step(z_prev, _):  # z_t ~ N(z_{t-1}, Q), y_t ~ N(z_t, R)
    z = ppl.sample("z", dist.Normal(z_prev, Q))
    y = ppl.sample("y", dist.Normal(z, R))
    return z, y


# ------------------------------------------------------------------- exact answers
def conjugate_slope_posterior(xs, ys, noise, prior_sd=1.0):
    """slope ~ N(0, prior_sd^2), ys ~ N(slope xs, noise^2): the posterior is Normal."""
    precision = 1.0 / prior_sd**2 + jnp.sum(xs**2) / noise**2
    return jnp.sum(xs * ys) / noise**2 / precision, 1.0 / jnp.sqrt(precision)


@jax.jit
def kalman_log_likelihood(ys, z0=0.0):
    """log p(y_1..T) of the random walk, by the Kalman filter."""

    def step(carry, y):
        m, p, ll = carry
        p = p + Q**2  # predict
        s = p + R**2
        ll = ll + dist.Normal(m, jnp.sqrt(s)).log_prob(y)
        k = p / s  # update
        return (m + k * (y - m), (1.0 - k) * p, ll), None

    (_, _, ll), _ = jax.lax.scan(step, (jnp.asarray(z0), jnp.asarray(0.0), jnp.asarray(0.0)), ys)
    return ll


def weighted_mean_sd(values, weights):
    mean = jnp.sum(weights * values)
    return mean, jnp.sqrt(jnp.sum(weights * (values - mean) ** 2))


# ------------------------------------------------------------------------ sections
def section_simulate(key, data, cfg):
    trace = jax.jit(regression.simulate)(key, (data["xs"],))
    print("trace.choices:", trace.choices)
    print(f"slope = {float(trace['slope']):.3f}, noise = {float(trace['noise']):.3f}, ys[:3] = {trace['ys'][:3]}")
    log_density, _ = regression.assess(trace.choices, (data["xs"],))
    print(f"score = {float(trace.score):.4f}   assess = {float(log_density):.4f}")
    print("assess equals score:", bool(jnp.allclose(trace.score, log_density)))


def section_generate(key, data, cfg):
    trace, log_w = regression.generate(key, {"ys": data["ys"]}, (data["xs"],))
    print(f"slope = {float(trace['slope']):.3f}, noise = {float(trace['noise']):.3f} (drawn from the prior)")
    print(f"log weight = log p(ys | slope, noise) = {float(log_w):.3f}")


def section_importance(key, data, cfg):
    xs, ys, n = data["xs"], data["ys"], cfg["particles"]
    k1, k2, k3 = jax.random.split(key, 3)
    res = inference.importance(k1, regression, (xs,), {"ys": ys}, n)
    w = res.normalized_weights()
    for site, truth in (("slope", TRUE_SLOPE), ("noise", TRUE_NOISE)):
        mean, sd = weighted_mean_sd(res.traces[site], w)
        print(f"{site:5s}: posterior mean {float(mean):.3f} sd {float(sd):.3f}   (true {truth})")
    print(f"log marginal = {float(res.log_marginal):.3f}   ESS = {float(res.ess):.1f} of {n}")
    draws = res.resample(k2, 1000)
    print(f"SIR: 1000 resampled traces, slope mean {float(draws['slope'].mean()):.3f}")
    # Known noise: the slope posterior is Normal in closed form.
    res = inference.importance(k3, regression_known_noise, (xs,), {"ys": ys}, n)
    est_mean, est_sd = weighted_mean_sd(res.traces["slope"], res.normalized_weights())
    exact_mean, exact_sd = conjugate_slope_posterior(xs, ys, KNOWN_NOISE)
    print(f"known noise, slope posterior: estimate {float(est_mean):.4f} +- {float(est_sd):.4f}"
          f"   exact {float(exact_mean):.4f} +- {float(exact_sd):.4f}   ESS = {float(res.ess):.1f}")


def section_combinators(key, data, cfg):
    xs, ys, n = data["xs"], data["ys"], cfg["particles"]
    k1, k2, k3 = jax.random.split(key, 3)
    # ppl.vmap: the per-point choices sit under "points", stacked: ("points", "y") has shape [N].
    flat = inference.importance(k1, regression, (xs,), {"ys": ys}, n)
    nested = inference.importance(k1, regression_vmap, (xs,), {("points", "y"): ys}, n)
    print(f"vmap model: log marginal {float(nested.log_marginal):.3f}"
          f" (flat model, same key: {float(flat.log_marginal):.3f})")
    # ppl.scan: a Gaussian random walk observed with noise, T steps.
    walk = ppl.scan(walk_step, length=cfg["T"])
    sim = walk.simulate(k2, (0.0, None))
    obs = {"y": sim["y"]}
    print(f"scan model: T = {cfg['T']}, choices z, y of shape {sim['z'].shape}")
    res = inference.importance(k3, walk, (0.0, None), obs, n)
    exact = kalman_log_likelihood(sim["y"])
    print(f"log marginal: importance {float(res.log_marginal):.3f}   Kalman filter (exact) {float(exact):.3f}"
          f"   ESS = {float(res.ess):.1f} of {n}")
    print("(the prior proposes all T latent steps at once, so the estimate is noisy; SMC walks the scan step by step)")
    # Over a few steps the prior is a good enough proposal for a sharp check.
    short = ppl.scan(walk_step, length=5)
    res = inference.importance(k3, short, (0.0, None), {"y": sim["y"][:5]}, n)
    print(f"first 5 steps: importance {float(res.log_marginal):.3f}   Kalman filter (exact) "
          f"{float(kalman_log_likelihood(sim['y'][:5])):.3f}   ESS = {float(res.ess):.1f} of {n}")


def section_update_regenerate(key, data, cfg):
    xs, ys = data["xs"], data["ys"]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    trace, _ = regression.generate(k1, {"ys": ys}, (xs,))
    new, log_w, discard = regression.update(k2, trace, {"slope": 1.0}, (xs,))
    print(f"update slope -> 1.0: log weight {float(log_w):.3f} = new score - old score "
          f"{float(new.score - trace.score):.3f}; discard holds the old slope {float(discard['slope']):.3f}")
    # One MH step by hand: propose slope from its prior, accept with the log weight.
    proposal, log_w = regression.regenerate(k3, trace, ppl.select("slope"))
    accept = jnp.log(jax.random.uniform(k4)) < log_w
    print(f"MH step: proposed slope {float(proposal['slope']):.3f}, log weight {float(log_w):.3f},"
          f" accepted = {bool(accept)}")

    def mh(trace, k):  # the same move, jit-compiled, as a chain with lax.scan
        k_prop, k_acc = jax.random.split(k)
        prop, log_w = regression.regenerate(k_prop, trace, ppl.select("slope", "noise"))
        accept = jnp.log(jax.random.uniform(k_acc)) < log_w
        trace = jax.tree.map(lambda a, b: jnp.where(accept, a, b), prop, trace)
        return trace, (trace["slope"], accept)

    steps = cfg["mh_steps"]
    _, (slopes, accepts) = jax.jit(lambda t, ks: jax.lax.scan(mh, t, ks))(trace, jax.random.split(k4, steps))
    kept = slopes[steps // 5 :]
    print(f"MH chain ({steps} steps): acceptance {float(accepts.mean()):.2f},"
          f" slope posterior mean {float(kept.mean()):.3f} sd {float(kept.std()):.3f}")


def section_errors(key, data, cfg):
    try:
        regression.generate(key, {"ys": data["ys"], "slop": 1.0}, (data["xs"],))
    except ppl.PPLError as err:
        print(f"{type(err).__name__}: {err}")


@ppl.gen
def scale_model(ys):
    log_noise = ppl.sample("log_noise", dist.Normal(0.0, 1.0))
    noise = ppl.deterministic("noise", jnp.exp(log_noise))  # a named derived value
    rate = ppl.sample("rate", dist.Exponential(1.0))
    return ppl.sample("ys", dist.Normal(0.0, noise * rate).expand(ys.shape), obs=ys)


class Temper(ppl.SiteHandler):
    """Scale every observed site's log likelihood by beta (a tempered posterior)."""

    def __init__(self, beta):
        self.beta = beta

    def process(self, site):
        return site._replace(scale=site.scale * self.beta) if site.kind == "observed" else site


def section_handlers(key, data, cfg):
    ys = data["ys"][:5]
    trace = scale_model.simulate(key, (ys,))
    print(f"choices {sorted(a[0] for a in trace.choices.addresses())}; deterministic noise = "
          f"{float(trace['noise']):.4f} = exp(log_noise) = {float(jnp.exp(trace['log_noise'])):.4f}")
    tempered = ppl.handle(scale_model, Temper(0.5)).assess(trace.choices, (ys,))[0]
    prior = dist.Normal(0.0, 1.0).log_prob(trace["log_noise"]) + dist.Exponential(1.0).log_prob(trace["rate"])
    lik = dist.Normal(0.0, trace["noise"] * trace["rate"]).log_prob(ys).sum()
    print(f"tempered (beta = 0.5) log density {float(tempered):.4f} = prior + 0.5 * likelihood "
          f"{float(prior + 0.5 * lik):.4f}")
    # HMC's density: rate = exp(u) on the real line, plus the log-Jacobian u.
    u = inference.to_unconstrained(scale_model, (ys,), trace.choices)
    lp = inference.unconstrained(scale_model).assess(u, (ys,))[0]
    print(f"unconstrained log density {float(lp):.4f} = log density + log|d rate/du| "
          f"{float(trace.score + u['rate']):.4f}")


def section_nuts(key, data, cfg):
    xs, ys = data["xs"], data["ys"]
    k1, k2, k3 = jax.random.split(key, 3)
    # Four chains, vmapped; warmup adapts the step size and a diagonal mass matrix.
    samples = inference.run_nuts(k1, regression, (xs,), {"ys": ys}, num_warmup=cfg["nuts_draws"],
                                 num_samples=cfg["nuts_draws"], num_chains=4, progress_bar=False)
    print(samples.summary())
    print(f"samples['slope'].shape = {samples['slope'].shape} (chains, draws); divergences per chain "
          f"{[int(d) for d in samples.divergences]}")
    # With the noise known the slope posterior is Gaussian: NUTS against the exact answer.
    # The Monte Carlo standard error of the mean is sd / sqrt(bulk ESS).
    known = inference.run_nuts(k2, regression_known_noise, (xs,), {"ys": ys}, num_warmup=cfg["nuts_draws"],
                               num_samples=cfg["nuts_draws"], num_chains=4, progress_bar=False)
    slope = known["slope"]
    ess = float(known.summary()["slope"]["n_eff"])
    exact_mean, exact_sd = conjugate_slope_posterior(xs, ys, KNOWN_NOISE)
    print(f"NUTS, known noise: slope {float(slope.mean()):.4f} +- {float(slope.std()):.4f}   exact "
          f"{float(exact_mean):.4f} +- {float(exact_sd):.4f}   bulk ESS = {ess:.0f}")
    # Posterior predictive: the model run forward at each draw; ys is redrawn.
    pred = inference.predictive(k3, regression, (xs,), samples)
    print(f"posterior predictive ys: shape {pred['ys'].shape}, mean at x = {float(xs[-1]):.1f}: "
          f"{float(pred['ys'][..., -1].mean()):.3f} (observed {float(ys[-1]):.3f})")


def section_smc(key, data, cfg):
    k1, k2, k3 = jax.random.split(key, 3)
    walk = ppl.scan(walk_step, length=cfg["T"])
    sim = walk.simulate(k1, (0.0, None))
    ys = sim["y"]
    # The filter walks the scan step by step: propose z_t from the prior, weight by
    # p(y_t | z_t), resample when the ESS falls below half the particles.
    n = cfg["particles"] // 4
    res = smc.particle_filter(k2, walk, (0.0, None), {"y": ys}, n)
    exact = kalman_log_likelihood(ys)
    print(f"particle filter, {n} particles: log marginal {float(res.log_marginal):.3f}   "
          f"Kalman filter (exact) {float(exact):.3f}   resampled at {int(res.resampled.sum())} of {cfg['T']} steps")
    # Its spread over seeds, to read the difference against (log Z is biased low by
    # about Var / 2, so the check allows that too).
    runs = jax.vmap(lambda k: smc.particle_filter(k, walk, (0.0, None), {"y": ys}, n).log_marginal)(
        jax.random.split(k3, 10))
    print(f"over 10 seeds: mean {float(runs.mean()):.3f}, sd {float(runs.std()):.3f}")
    paths = res.paths()
    print(f"paths(): z of shape {paths['z'].shape} (particles, steps), traced back through the ancestors")


def section_vi(key, data, cfg):
    k1, k2, k3 = jax.random.split(key, 3)
    xs, ys = data["xs"], data["ys"]
    obs = {"ys": ys}
    # A mean-field Gaussian guide at the model's addresses, on the unconstrained space,
    # fitted by the ELBO: the known-noise posterior is Gaussian, so the fit is exact.
    guide, params = vi.auto_normal(regression_known_noise, (xs,), obs)
    objective = vi.elbo(regression_known_noise, guide, (xs,), obs)
    steps = cfg["vi_steps"]
    params, history = vi.fit(k1, objective, params, optax.adam(optax.cosine_decay_schedule(0.05, steps)), steps,
                             num_samples=16)
    loc, sd = float(params["slope"]["loc"][0]), float(jax.nn.softplus(params["slope"]["scale"][0]))
    exact_mean, exact_sd = conjugate_slope_posterior(xs, ys, KNOWN_NOISE)
    print(f"VI, known noise: slope {loc:.4f} +- {sd:.4f}   exact {float(exact_mean):.4f} +- {float(exact_sd):.4f}   "
          f"(ELBO {float(history[-50:].mean()):.3f} after {steps} steps)")

    # An objective is a function (key, params) -> scalar; vi.grad makes its unbiased
    # gradient. The IWAE bound, written by hand on the unknown-noise model:
    guide2, params2 = vi.auto_normal(regression, (xs,), obs)
    o = ppl.ChoiceMap.of(obs)

    def iwae(key, params, k=16):
        q = vi.simulate(guide2, key, (params, xs), num_particles=k)
        log_p = jax.vmap(lambda c: regression.assess(c.merge(o), (xs,))[0])(q.choices)
        return logsumexp(log_p - q.score) - jnp.log(k)

    value, grads = jax.jit(vi.grad(iwae))(k2, params2)
    print(f"hand-written IWAE (K = 16) at the initial guide: {float(value):.3f}; "
          f"gradient for the slope's location {float(grads['slope']['loc'][0]):.3f}")
    params2, history2 = vi.fit(k3, iwae, params2, optax.adam(0.05), steps)
    print(f"after {steps} steps: IWAE {float(history2[-50:].mean()):.3f}, slope "
          f"{float(params2['slope']['loc'][0]):.3f}, noise "
          f"{float(jnp.exp(params2['noise']['loc'][0])):.3f} (the guide's median; true noise {TRUE_NOISE})")


def section_llm(key, data, cfg):
    import smc.llm as llm

    # The built-in task: a tiny character-level policy (right about a third of the time
    # from one sample) and a learned PRM. The reasoning process is a ppl.scan model whose
    # step samples one line from the LM and weights it by ppl.reward of the PRM's score of
    # the whole prefix; smc.particle_filter resamples the lines (and their KV caches).
    b = llm.builtin()
    problem = b.task.sample_problems(0, 2)[1]
    problems = llm.encode_problems([problem])
    n = 8
    res = llm.particle_filtering(key, b.step, llm.learned_prm(b.prm.model), problems, n)
    print(b.task.prompt_text(problem).strip(), f"  (true answer {problem.answer})")
    weights = jnp.exp(res.log_weights[0])
    for i in range(n):
        steps = res.text(0, i).replace("\n", " | ")
        print(f"  particle {i}: weight {float(weights[i]):.3f}  PRM {float(res.final_rewards[0, i]):.2f}  {steps}")
    print(f"chosen answer (weighted vote) {int(res.answer[0])}, best final weight "
          f"{int(llm.select_answer(res.answers, res.log_weights, 'argmax')[0])}, truth {problem.answer}; "
          f"budget: {int(res.lm_calls[0])} step calls, {int(res.tokens[0])} tokens")


SECTIONS = [
    ("(a) a model: simulate, trace, assess", section_simulate),
    ("(b) generate: conditioning on observations", section_generate),
    ("(c) importance sampling", section_importance),
    ("(d) combinators: vmap and scan", section_combinators),
    ("(e) update and regenerate: Metropolis-Hastings by hand", section_update_regenerate),
    ("(f) friendly errors", section_errors),
    ("(g) site handlers: deterministic, tempering, the unconstrained density", section_handlers),
    ("(h) MCMC: NUTS", section_nuts),
    ("(i) SMC: a particle filter", section_smc),
    ("(j) VI: objectives as programs", section_vi),
    ("(k) LLM inference-time scaling: particle filtering over reasoning steps", section_llm),
]


def make_data(key, n_points):
    xs = jnp.linspace(-2.0, 2.0, n_points)
    ys = TRUE_SLOPE * xs + TRUE_NOISE * jax.random.normal(key, (n_points,))
    return {"xs": xs, "ys": ys}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for tests)")
    args = parser.parse_args(argv)
    cfg = (dict(particles=2_000, T=50, mh_steps=500, nuts_draws=300, vi_steps=300) if args.quick
           else dict(particles=20_000, T=50, mh_steps=5_000, nuts_draws=1_000, vi_steps=1_000))
    data_key, *keys = jax.random.split(jax.random.key(2024), len(SECTIONS) + 1)
    data = make_data(data_key, n_points=10)
    print(f"data: {data['xs'].shape[0]} points, true slope {TRUE_SLOPE}, true noise {TRUE_NOISE}")
    for (title, section), key in zip(SECTIONS, keys):
        print(f"\n=== {title} ===")
        section(key, data, cfg)
    print("\ntour finished")


if __name__ == "__main__":
    main()
