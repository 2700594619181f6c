"""Parameters travel as arguments: a neural decoder (an equinox module) in a model's
`args` is data for jit, grad and scan (its weights) and structure (its functions).

Truth: the decoder's log likelihood written directly with jax.numpy.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from conftest import assert_close, tree_allclose

import inference
import ppl


@ppl.gen
def decoder_model(decoder, n_pixels):
    z = ppl.sample("z", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    logits = decoder(z)
    return ppl.sample("x", dist.Bernoulli(logits=logits).to_event(1))


def _decoder(key):
    return eqx.nn.MLP(2, 6, width_size=8, depth=1, activation=jax.nn.tanh, key=key)


def _log_joint(decoder, z, x):
    logits = decoder(z)
    return dist.Normal(0.0, 1.0).log_prob(z).sum() + jnp.sum(x * logits - jnp.logaddexp(0.0, logits))


def test_gradient_with_respect_to_network_weights_equals_direct_jax(key):
    decoder = _decoder(key)
    tr = decoder_model.simulate(key, (decoder, 6))
    assert tr.args[1] == 6  # the int stays a Python int
    choices = tr.choices

    @eqx.filter_jit
    @eqx.filter_grad
    def grad_model(dec):
        return decoder_model.assess(choices, (dec, 6))[0]

    @eqx.filter_grad
    def grad_direct(dec):
        return _log_joint(dec, choices["z"], choices["x"])

    tree_allclose(eqx.filter(grad_model(decoder), eqx.is_array), eqx.filter(grad_direct(decoder), eqx.is_array),
                  rtol=1e-5, atol=1e-6)


def test_a_trace_with_a_network_argument_goes_through_scan_and_importance(key):
    decoder = _decoder(key)
    tr = decoder_model.simulate(key, (decoder, 6))

    def step(trace, k):
        new, w = decoder_model.regenerate(k, trace, ppl.select("z"))
        return new, w

    final, ws = jax.lax.scan(step, tr, jax.random.split(key, 3))
    assert ws.shape == (3,) and final.args[0].layers[0].weight.shape == (8, 2)
    res = inference.importance(key, decoder_model, (decoder, 6), {"x": tr["x"]}, 256)
    assert res.log_weights.shape == (256,)
    assert_close(res.traces.score[0], _log_joint(decoder, res.traces["z"][0], tr["x"]), rtol=1e-5)
