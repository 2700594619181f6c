"""MCMC kernels, runners, Samples and predictive, against exact conjugate posteriors.

Tolerances come from the Monte Carlo standard error. For draws with bulk effective
sample size ESS (numpyro's `effective_sample_size` over the chains), the error of the
posterior mean estimate has sd ~ sd_exact / sqrt(ESS); for the posterior sd, the
delta method on the variance of a Gaussian gives sd(sd_hat) ~ sd_exact / sqrt(2 ESS2),
with ESS2 the ESS of the squared centered draws. Checks use 5 standard errors (a
two-sided normal false alarm rate of ~6e-7 per check; the seeds are fixed anyway).
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.diagnostics import effective_sample_size

import inference
import ppl

# Small runs give split r_hat a little above 1.01 now and then; the warning itself is
# tested below on constructed draws.
pytestmark = pytest.mark.filterwarnings("ignore::inference.ConvergenceWarning")

RUN = dict(num_warmup=300, num_samples=500, num_chains=2, progress_bar=False)


def ess(x) -> float:
    """Bulk ESS of draws [chains, draws] (scalar site)."""
    return float(effective_sample_size(np.asarray(x, dtype=np.float64)))


def assert_mean_sd(draws, mean, sd):
    draws = np.asarray(draws, dtype=np.float64)
    n_eff = ess(draws)
    n_eff2 = ess((draws - mean) ** 2)
    assert abs(draws.mean() - mean) < 5 * sd / np.sqrt(n_eff), (draws.mean(), mean, n_eff)
    assert abs(draws.std() - sd) < 5 * sd / np.sqrt(2 * n_eff2), (draws.std(), sd, n_eff2)


# -- conjugate normal-normal: mu ~ N(0, 1), y_i ~ N(mu, 1) -> N(sum y / (n + 1), 1 / (n + 1))
Y = jnp.array([0.8, 1.3, 0.2, 1.9, 1.1])
TRACES = {"normal": 0}


@ppl.gen
def normal_normal(n):
    TRACES["normal"] += 1  # counts traces of the body: compilations would trace it
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ppl.deterministic("twice", 2.0 * mu)
    return ppl.sample("y", dist.Normal(mu, 1.0).expand((n,)))


def exact_normal(y):
    var = 1.0 / (1.0 + y.shape[0])
    return float(var * y.sum()), float(np.sqrt(var))


@pytest.fixture(scope="module")
def normal_samples():
    return inference.run_nuts(jax.random.key(1), normal_normal, (5,), {"y": Y}, **RUN)


def test_nuts_normal_normal_matches_exact_posterior(normal_samples):
    assert_mean_sd(normal_samples["mu"], *exact_normal(Y))
    assert int(normal_samples.divergences.sum()) == 0


def test_samples_shapes_deterministic_thin_flatten(normal_samples):
    s = normal_samples
    assert s["mu"].shape == (2, 500) and s[("mu",)].shape == (2, 500)
    np.testing.assert_allclose(s["twice"], 2 * s["mu"], rtol=1e-6)
    assert s.keys() == ["mu", "twice"] and "twice" in s and "y" not in s
    assert s.divergences.shape == (2,)
    assert s.thin(5)["mu"].shape == (2, 100)
    np.testing.assert_array_equal(s.thin(5)["mu"], s["mu"][:, ::5])
    flat = s.flatten()
    assert flat["mu"].shape == (1000,)
    np.testing.assert_array_equal(flat["mu"][500:], s["mu"][1])
    assert s.info.accept_prob.shape == (2, 500)
    assert "Samples(num_chains=2, num_draws=500" in repr(s)
    leaves = jax.tree.leaves(s)  # a pytree: draws and info are its leaves
    assert any(leaf is s["mu"] for leaf in leaves)
    doubled = jax.tree.map(lambda x: x * 2 if x.dtype == jnp.float32 else x, s)
    np.testing.assert_allclose(doubled["mu"], 2 * s["mu"])


def test_summary_table(normal_samples):
    table = normal_samples.summary()
    assert set(table) == {"mu", "twice"}
    assert set(table["mu"]) == {"mean", "sd", "median", "5%", "95%", "n_eff", "r_hat"}
    mean, sd = exact_normal(Y)
    assert abs(table["mu"]["mean"] - mean) < 0.1
    assert table["mu"]["5%"] < table["mu"]["median"] < table["mu"]["95%"]
    assert 50 < table["mu"]["n_eff"] <= 2000 and abs(table["mu"]["r_hat"] - 1) < 0.05
    text = str(table)
    assert "n_eff" in text and "r_hat" in text and "twice" in text


def test_predictive_shapes(normal_samples):
    post = inference.predictive(jax.random.key(2), normal_normal, (5,), normal_samples)
    assert post["y"].shape == (2, 500, 5) and post["mu"].shape == (2, 500)
    np.testing.assert_array_equal(post["mu"], normal_samples["mu"])  # latent fixed to the draws
    np.testing.assert_allclose(post["twice"], 2 * normal_samples["mu"], rtol=1e-6)
    # y is re-drawn around each mu: its spread is the noise sd 1 (5 s.e. of the sd of 5000 values)
    assert abs(float(jnp.std(post["y"] - post["mu"][..., None])) - 1.0) < 5 / np.sqrt(2 * 5000)
    prior = inference.predictive(jax.random.key(3), normal_normal, (5,), num_samples=1000)
    assert prior["y"].shape == (1000, 5) and prior["mu"].shape == (1000,) and prior["twice"].shape == (1000,)
    assert abs(float(prior["mu"].std()) - 1.0) < 5 / np.sqrt(2000)
    from_dict = inference.predictive(jax.random.key(4), normal_normal, (5,), {"mu": jnp.zeros((3, 4))})
    assert from_dict["y"].shape == (3, 4, 5)


def test_second_run_with_new_data_compiles_nothing(normal_samples):
    from inference._runner import _CHUNK_PROGRAMS, _run_chunk, _start_for

    _start = _start_for(jax.default_backend())
    first = inference.run_nuts(jax.random.key(5), normal_normal, (5,), {"y": Y + 1.0}, **RUN)
    traces, init_cache = TRACES["normal"], _start._cache_size()
    chunks = (len(_CHUNK_PROGRAMS), _run_chunk._cache_size())  # compiled ahead of time / jitted (devices > 1)
    second = inference.run_nuts(jax.random.key(5), normal_normal, (5,), {"y": Y - 1.0}, **RUN)
    assert TRACES["normal"] == traces, "the model was traced again"
    assert (len(_CHUNK_PROGRAMS), _run_chunk._cache_size()) == chunks and _start._cache_size() == init_cache
    assert len(_CHUNK_PROGRAMS) + _run_chunk._cache_size() > 0
    # same key, data shifted by 2: the posterior mean moves by 2 * 5/6
    assert abs(float(first["mu"].mean() - second["mu"].mean()) - 2 * 5 / 6) < 0.2


def test_same_key_same_draws():
    a = inference.run_mcmc(jax.random.key(7), inference.mh("mu"), normal_normal, (5,), {"y": Y},
                           num_warmup=10, num_samples=20, num_chains=2, progress_bar=False)
    b = inference.run_mcmc(jax.random.key(7), inference.mh("mu"), normal_normal, (5,), {"y": Y},
                           num_warmup=10, num_samples=20, num_chains=2, progress_bar=False)
    np.testing.assert_array_equal(a["mu"], b["mu"])


# -- a constrained site: rate ~ Gamma(2, 1), counts ~ Poisson(rate) -> Gamma(2 + sum, 1 + n).
# A missing log-Jacobian of rate = exp(u) would give Gamma(1 + sum, 1 + n): the mean
# would move by 1 / (1 + n) = 0.25, about 10 standard errors here.
COUNTS = jnp.array([1.0, 0.0, 2.0])


@ppl.gen
def gamma_poisson(n):
    rate = ppl.sample("rate", dist.Gamma(2.0, 1.0))
    return ppl.sample("counts", dist.Poisson(rate).expand((n,)))


def test_nuts_gamma_poisson_needs_the_log_jacobian():
    samples = inference.run_nuts(jax.random.key(11), gamma_poisson, (3,), {"counts": COUNTS}, **RUN)
    shape, rate = 2.0 + float(COUNTS.sum()), 1.0 + COUNTS.shape[0]
    assert bool(jnp.all(samples["rate"] > 0))
    assert_mean_sd(samples["rate"], shape / rate, np.sqrt(shape) / rate)


# -- every kind of site: latent, obs=, factor, deterministic, nested call, vmap, scan.
# mu ~ N(0, 1) times factor exp(-mu^2 / 2) is N(0, 1/2); the vmap'd points y_i ~ N(mu, 1)
# are observed: mu | y ~ N(sum y / (2 + n), 1 / (2 + n)). The nested call and the scan
# do not inform mu.
XS = jnp.array([0.5, 1.5, 1.0, 2.0])


@ppl.gen
def point(mu):
    return ppl.sample("y", dist.Normal(mu, 1.0))


@ppl.gen
def nested(mu):
    w = ppl.sample("w", dist.Normal(mu, 1.0))
    ppl.deterministic("w2", w * 2.0)
    return w


@ppl.gen
def walk(carry, x):
    z = ppl.sample("z", dist.Normal(carry, 1.0))
    ppl.deterministic("dz", z - carry)
    return z, z


@ppl.gen
def every_site(n):
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ppl.factor("shrink", -0.5 * mu**2)
    ppl.sample("sub", nested, mu)
    ppl.sample("pts", ppl.vmap(point, in_axes=(0,)), jnp.full((n,), mu))
    ppl.sample("walk", ppl.scan(walk, 3), 0.0, None)
    scale = ppl.sample("scale", dist.HalfNormal(1.0))
    ppl.sample("o", dist.Normal(0.0, scale), obs=0.3)
    ppl.deterministic("mu_sq", mu**2)
    return mu


def test_nuts_with_every_kind_of_site():
    samples = inference.run_nuts(jax.random.key(12), every_site, (4,), {("pts", "y"): XS}, **RUN)
    assert set(samples.keys()) == {"mu", "scale", ("sub", "w"), ("walk", "z"), "mu_sq", ("sub", "w2"),
                                   ("walk", "dz")}
    assert samples[("walk", "z")].shape == (2, 500, 3) and samples[("walk", "dz")].shape == (2, 500, 3)
    np.testing.assert_allclose(samples[("sub", "w2")], 2 * samples["sub", "w"], rtol=1e-5)
    var = 1.0 / (2.0 + XS.shape[0])
    assert_mean_sd(samples["mu"], var * float(XS.sum()), np.sqrt(var))
    pred = inference.predictive(jax.random.key(13), every_site, (4,), samples)
    assert pred[("pts", "y")].shape == (2, 500, 4)
    assert pred["o"].shape == (2, 500) and bool(jnp.all(pred["o"] == 0.3))  # obs= keeps its value


@ppl.gen
def shaped():
    w = ppl.sample("w", dist.Dirichlet(jnp.ones(3)))  # a simplex: 2 reals
    m = ppl.sample("m", dist.Normal(jnp.zeros((2, 2)), 1.0))
    s = ppl.sample("s", dist.HalfNormal(1.0))
    return ppl.sample("y", dist.Normal(w[0] + m.sum() * s, 1.0))


def test_hmc_moves_one_vector_and_gives_it_back_per_site():
    """NUTS holds the moved sites on the real line as one vector (2 + 4 + 1 reals here);
    `position()` splits it per site into what `to_unconstrained` gives, and
    `position(grad=True)` is the gradient of -log density computed on the per-site form
    (float32: rtol 1e-5). A block-structured mass matrix keeps numpyro's dict."""
    kernel = inference.nuts()
    trace, _ = shaped.generate(jax.random.key(0), {"y": 0.4}, ())
    density = inference.unconstrained(shaped, ("y",))
    for state in (kernel.init(trace, observed={"y": 0.4}),
                  jax.jit(kernel.step)(jax.random.key(1), kernel.init(trace, observed={"y": 0.4}))[0]):
        assert state.hmc.z.shape == (7,) and state.hmc.z_grad.shape == (7,)
        u = inference.to_unconstrained(shaped, (), state.trace.choices, ("y",))
        position = state.position()
        assert set(position) == {("w",), ("m",), ("s",)}
        for address, value in position.items():
            np.testing.assert_allclose(value, u[address], rtol=1e-5, atol=1e-6)
        grad = jax.grad(lambda p: -density.assess(ppl.ChoiceMap(p).merge({"y": 0.4}), ())[0])(position)
        for address, value in state.position(grad=True).items():
            np.testing.assert_allclose(value, grad[address], rtol=1e-5, atol=1e-6)
    batched = jax.vmap(lambda k: kernel.init(shaped.generate(k, {"y": 0.4}, ())[0], observed={"y": 0.4}))(
        jax.random.split(jax.random.key(2), 3))
    assert batched.position()[("m",)].shape == (3, 2, 2) and batched.position()[("w",)].shape == (3, 2)
    blocks = inference.nuts(dense_mass=[("w", "s")]).init(trace, observed={"y": 0.4})
    assert isinstance(blocks.hmc.z, dict) and blocks.position()[("m",)].shape == (2, 2)


# -- Metropolis-Hastings


def test_mh_prior_proposal_normal_normal():
    samples = inference.run_mcmc(jax.random.key(21), inference.mh("mu"), normal_normal, (5,), {"y": Y},
                                 num_warmup=200, num_samples=3000, num_chains=2, progress_bar=False)
    assert_mean_sd(samples["mu"], *exact_normal(Y))
    assert 0.05 < float(samples.info.accept_prob.mean()) < 0.95


@ppl.gen
def random_walk(trace):
    return ppl.sample("mu", dist.Normal(trace["mu"], 0.5))


def test_mh_random_walk_proposal():
    kernel = inference.mh_proposal(random_walk)
    samples = inference.run_mcmc(jax.random.key(22), kernel, normal_normal, (5,), {"y": Y},
                                 num_warmup=200, num_samples=3000, num_chains=2, progress_bar=False)
    assert_mean_sd(samples["mu"], *exact_normal(Y))


# -- cycle: k ~ Bernoulli(0.3), mu ~ N(2k, 1), y ~ N(mu, 1), y = 1.6 observed.
# p(k | y) ∝ p(k) N(y; 2k, sqrt 2); mu | k, y ~ N((2k + y) / 2, 1/2).
@ppl.gen
def switchpoint():
    k = ppl.sample("k", dist.Bernoulli(0.3))
    mu = ppl.sample("mu", dist.Normal(2.0 * k, 1.0))
    return ppl.sample("y", dist.Normal(mu, 1.0))


def test_cycle_mh_and_hmc_on_discrete_and_continuous_sites():
    y = 1.6
    kernel = inference.cycle(inference.mh("k"), inference.hmc(step_size=0.5, num_steps=4, selection="mu"))
    samples = inference.run_mcmc(jax.random.key(31), kernel, switchpoint, (), {"y": y},
                                 num_warmup=200, num_samples=2000, num_chains=2, progress_bar=False)
    lik = np.array([0.7 * np.exp(-(y - 0.0) ** 2 / 4), 0.3 * np.exp(-(y - 2.0) ** 2 / 4)])
    p1 = lik[1] / lik.sum()
    k = np.asarray(samples["k"], dtype=np.float64)
    assert abs(k.mean() - p1) < 5 * np.sqrt(p1 * (1 - p1) / ess(k))
    mu_mean = p1 * (2.0 + y) / 2 + (1 - p1) * y / 2
    mu = np.asarray(samples["mu"])
    assert abs(mu.mean() - mu_mean) < 5 * mu.std() / np.sqrt(ess(mu))
    assert isinstance(samples.info, tuple) and samples.info[1].accept_prob.shape == (2, 2000)


def test_kernels_jit_and_vmap_over_chains(key):
    trace, _ = normal_normal.generate(key, {"y": Y}, (5,))
    traces = jax.tree.map(lambda x: jnp.stack([x] * 3), trace)
    for kernel in (inference.mh("mu"), inference.cycle(inference.mh("mu"), inference.hmc(0.1, 3))):
        states = jax.jit(jax.vmap(lambda t: kernel.init(t, observed={"y": Y}, num_warmup=5)))(traces)
        states, info = jax.jit(jax.vmap(kernel.step))(jax.random.split(key, 3), states)
        assert states.trace["mu"].shape == (3,)
        np.testing.assert_array_equal(states.trace["y"], jnp.broadcast_to(Y, (3, 5)))


# -- errors


@ppl.gen
def no_latent():
    return ppl.sample("y", dist.Normal(0.0, 1.0), obs=0.5)


@ppl.gen
def discrete_latent():
    k = ppl.sample("k", dist.Poisson(3.0))
    return ppl.sample("y", dist.Normal(k, 1.0))


@ppl.gen
def walled(n):
    x = ppl.sample("x", dist.Normal(0.0, 1.0))
    ppl.factor("wall", jnp.where(x > 50.0, 0.0, -jnp.inf))
    return x


def test_model_without_latent_sites_is_an_error():
    with pytest.raises(ppl.ArgumentError, match="no latent random choice"):
        inference.run_nuts(jax.random.key(0), no_latent, (), num_warmup=5, num_samples=5, progress_bar=False)
    with pytest.raises(ppl.ArgumentError, match="no latent random choice"):
        inference.run_nuts(jax.random.key(0), normal_normal, (2,), {"mu": 0.0, "y": Y[:2]},
                           num_warmup=5, num_samples=5, progress_bar=False)


def test_discrete_latent_under_nuts_names_the_site():
    with pytest.raises(ppl.ArgumentError, match="'k'.*discrete"):
        inference.run_nuts(jax.random.key(0), discrete_latent, (), {"y": 1.0}, num_warmup=5, num_samples=5,
                           progress_bar=False)


def test_non_finite_initial_density_names_the_site():
    with pytest.raises(ppl.InferenceError, match="after 100 random starts.*'wall'"):
        inference.run_nuts(jax.random.key(0), walled, (1,), num_warmup=5, num_samples=5, progress_bar=False)
    with pytest.raises(ppl.InferenceError, match="starts where the log density is -inf: site.*'wall'"):
        inference.run_nuts(jax.random.key(0), walled, (1,), init={"x": 0.0}, num_warmup=5, num_samples=5,
                           progress_bar=False)  # a given start is not redrawn



def test_a_first_run_compiles_two_programs_and_no_eager_op():
    """The chains' start and the chunk of steps: no key split, support check, transfer to
    the devices or divergence count compiles a program of its own (each is 0.03-0.15 s of
    a first call). Shapes no other test uses (7 observations, 3 chains), so nothing is
    cached from before."""
    import concurrent.futures

    from inference._runner import _CHUNK_PROGRAMS

    # an earlier test's chunk may still compile in the background (a run that raised
    # after submitting it): let it finish before listening
    concurrent.futures.wait(list(_CHUNK_PROGRAMS.values()))
    compiled, y = [], np.linspace(0.0, 1.0, 7, dtype=np.float32)

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        samples = inference.run_nuts(jax.random.key(11), normal_normal, (7,), {"y": y},
                                     num_warmup=50, num_samples=50, num_chains=3, progress_bar=False)
        samples.divergences, samples.summary()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert sorted(compiled) == ["jit(_run_chunk)", "jit(_start_chains)"], compiled


def test_the_cpu_start_compiled_without_llvm_optimizations_gives_the_optimized_starts(monkeypatch):
    """On CPU the start program is compiled with LLVM's optimizations and XLA's fusion
    emitters off (it runs once; its compile overlaps the chunk's). Its starts must be the
    ones the default compile gives, on a model with every kind of site and a constrained
    one: the same key bits, and float leaves equal up to rounding (float32: rtol 1e-5,
    where reordered sums differ by a few ulps)."""
    import inference._runner as runner

    if jax.default_backend() != "cpu":
        pytest.skip("the start is compiled with these options on CPU only")
    calls = []
    original = runner._start

    def spying(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "_start", spying)
    inference.run_nuts(jax.random.key(12), every_site, (4,), {("pts", "y"): XS}, num_warmup=2, num_samples=2,
                       num_chains=2, progress_bar=False)
    args, kwargs = calls[0]
    unoptimized = runner._start_for("cpu")
    optimized = jax.jit(runner._start_chains, static_argnames=("program", "stepper", "num_chains"))
    a, b = unoptimized(*args, **kwargs), optimized(*args, **kwargs)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@ppl.gen
def truncated():
    x = ppl.sample("x", dist.Normal(0.0, 1.0))
    ppl.factor("wall", jnp.where(x > 1.0, 0.0, -jnp.inf))
    return x


@pytest.mark.slow  # heavy for the 15-minute CI budget: pytest -m slow runs it
def test_chains_that_start_outside_the_support_draw_a_new_start(monkeypatch):
    """uniform(-2, 2) starts land left of the wall 3 times in 4: those chains redraw,
    and the draws are the truncated normal's (mean phi(1) / (1 - Phi(1)) = 1.5251,
    sd 0.4597; 5 s.e. from the bulk ESS)."""
    import inference._runner as runner

    calls = []
    original = runner._start

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "_start", counting)
    samples = inference.run_nuts(jax.random.key(3), truncated, (), None, num_warmup=300, num_samples=500,
                                 num_chains=4, progress_bar=False)
    assert len(calls) > 1  # some chain had to redraw
    x = np.asarray(samples["x"])
    assert x.min() > 1.0
    assert_mean_sd(x, 1.5251, 0.4597)


def test_bad_arguments():
    with pytest.raises(ppl.ArgumentError, match="num_samples"):
        inference.run_nuts(jax.random.key(0), normal_normal, (5,), {"y": Y}, num_samples=0)
    with pytest.raises(ppl.ArgumentError, match="Kernel"):
        inference.run_mcmc(jax.random.key(0), "nuts", normal_normal, (5,), {"y": Y})
    with pytest.raises(ppl.ArgumentError, match="observe"):
        inference.mh("y").init(normal_normal.generate(jax.random.key(0), {"y": Y}, (5,))[0], observed={"y": Y})
    with pytest.raises(ppl.ArgumentError, match="num_samples"):
        inference.predictive(jax.random.key(0), normal_normal, (5,))


# -- Samples diagnostics on constructed draws (no sampler)


def test_convergence_warnings_name_the_sites():
    rng = np.random.default_rng(0)
    apart = np.stack([rng.normal(0, 1, 200), rng.normal(3, 1, 200)])  # two chains that disagree
    is_divergent = np.zeros((2, 200), bool)
    is_divergent[0, 3] = True
    info = inference.HMCInfo(*(np.zeros((2, 200)),) * 5)._replace(is_divergent=is_divergent)
    samples = inference.Samples({("a",): jnp.asarray(apart), ("b",): jnp.asarray(rng.normal(size=(2, 200)))}, info)
    with pytest.warns(inference.ConvergenceWarning) as record:
        samples._warn_if_suspect()
    messages = " ".join(str(w.message) for w in record)
    assert "'a'" in messages and "'b'" not in messages and "1 divergent" in messages
    assert samples.divergences.tolist() == [1, 0]


def test_to_arviz_or_a_clear_import_error(normal_samples):
    try:
        import arviz  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install arviz"):
            normal_samples.to_arviz()
    else:
        data = normal_samples.to_arviz()
        assert data.posterior["mu"].shape == (2, 500)


@ppl.gen
def flat_prior_model():
    """Stan's implicit flat priors: mu on the real line, s on (0, inf)."""
    mu = ppl.sample("mu", dist.ImproperUniform(dist.constraints.real, (), ()))
    s = ppl.sample("s", dist.ImproperUniform(dist.constraints.positive, (), ()))
    return ppl.sample("y", dist.Normal(mu, s).expand((20,)))


@pytest.mark.slow  # heavy for the 15-minute CI budget: pytest -m slow runs it
def test_improper_flat_priors_sample_from_a_uniform_start(key):
    """With flat priors on mu and s, p(mu | y) is proportional to S(mu)^{-(n-1)/2}
    (S = sum of squares about mu): a Student-t centred at the sample mean with n - 2 dof
    and scale sqrt(S(ybar) / (n (n - 2))). The chain mean is within 5 s.e. (sd / sqrt(ESS))."""
    y = jnp.linspace(-1.0, 3.0, 20)
    samples = inference.run_nuts(key, flat_prior_model, (), {"y": y}, num_warmup=300, num_samples=500,
                                 num_chains=2, progress_bar=False)
    n = y.shape[0]
    scale = float(jnp.sqrt(jnp.sum((y - y.mean()) ** 2) / (n * (n - 2))))
    sd = scale * np.sqrt((n - 2) / (n - 4))
    mu = np.asarray(samples["mu"])
    ess = float(effective_sample_size(mu))
    assert abs(mu.mean() - float(y.mean())) < 5 * sd / np.sqrt(ess)
    assert abs(mu.std() - sd) < 0.2 * sd
    # an improper prior has no sampler: drawing it is an error that says what to do
    with pytest.raises(ppl.ArgumentError, match="'mu' has an improper prior.*init_strategy='uniform'"):
        flat_prior_model.simulate(key, ())
    with pytest.raises(ppl.ArgumentError, match="improper prior"):
        inference.run_mcmc(key, inference.nuts(), flat_prior_model, (), {"y": y}, num_warmup=5, num_samples=5,
                           num_chains=1, progress_bar=False)


X64_SCRIPT = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpyro.distributions as dist, ppl, inference
@ppl.gen
def model():
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    return ppl.sample("y", dist.Normal(mu, 1.0))
s = inference.run_nuts(jax.random.key(0), model, (), {"y": 1.0}, num_warmup=50, num_samples=50, num_chains=2,
                       progress_bar=False)
assert s["mu"].dtype == jnp.float64, s["mu"].dtype
print("x64 ok")
"""


@pytest.mark.slow  # heavy for the 15-minute CI budget: pytest -m slow runs it
def test_nuts_runs_in_float64():
    out = subprocess.run([sys.executable, "-c", X64_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x64 ok" in out.stdout


# -- block-structured mass matrix: (a, b) strongly correlated, c independent and wide
RHO = 0.95


@ppl.gen
def correlated():
    a = ppl.sample("a", dist.Normal(0.0, 1.0))
    b = ppl.sample("b", dist.Normal(RHO * a, np.sqrt(1 - RHO**2)))
    c = ppl.sample("c", dist.Normal(jnp.zeros(3), 10.0))
    return a + b + c.sum()


@pytest.mark.slow  # heavy for the 15-minute CI budget: pytest -m slow runs it
def test_block_dense_mass_adapts_one_block_and_a_diagonal():
    """dense_mass=[("a", "b")]: a dense 2x2 block for (a, b), a diagonal for c. The
    adapted block's correlation is the target's 0.95 (Welford over the last window of
    ~250 well-mixed warmup draws: sd of a correlation estimate (1 - rho^2) / sqrt(n)
    ~ 0.006; 0.05 allows an ESS 6x below n); the draws match the exact moments."""
    kernel = inference.nuts(dense_mass=[("a", "b")])
    trace, _ = correlated.generate(jax.random.key(0), {}, ())
    state = kernel.init(trace, num_warmup=500)
    inv_mm = state.hmc.adapt_state.inverse_mass_matrix
    assert set(inv_mm) == {(("a",), ("b",)), (("c",),)}
    assert inv_mm[(("a",), ("b",))].shape == (2, 2) and inv_mm[(("c",),)].shape == (3,)

    def body(state, k):
        return kernel.step(k, state)

    state, info = jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.key(1), 500)))(state)
    block = np.asarray(state.hmc.adapt_state.inverse_mass_matrix[(("a",), ("b",))])
    corr = block[0, 1] / np.sqrt(block[0, 0] * block[1, 1])
    assert abs(corr - RHO) < 0.05, block
    np.testing.assert_allclose(np.asarray(state.hmc.adapt_state.inverse_mass_matrix[(("c",),)]), 100.0, rtol=0.5)

    samples = inference.run_nuts(jax.random.key(2), correlated, (), None, dense_mass=[("a", "b")], **RUN)
    assert_mean_sd(samples["a"], 0.0, 1.0)
    assert_mean_sd(samples["b"], 0.0, 1.0)
    assert_mean_sd(samples["c"][..., 0], 0.0, 10.0)


def test_bad_dense_mass_blocks():
    with pytest.raises(ppl.ArgumentError, match="list of blocks"):
        inference.nuts(dense_mass="a")
    with pytest.raises(ppl.ArgumentError, match="more than one block"):
        inference.nuts(dense_mass=[("a", "b"), ("b",)])
    trace, _ = correlated.generate(jax.random.key(0), {}, ())
    with pytest.raises(ppl.ArgumentError, match="'d'.*not move"):
        inference.nuts(dense_mass=[("a", "d")]).init(trace, num_warmup=10)
