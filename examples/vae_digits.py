"""Variational autoencoders on scikit-learn's digits, trained with `vi` objectives.

Data: the 1,797 8x8 digits bundled with scikit-learn, binarized at half intensity
(pixel >= 8 of 16), split once into 1,500 training and 297 test images.

Models (decoder and encoder are equinox MLPs, 128 hidden units, tanh). The model has
parameters too (the decoder), so the objectives take `learn_model=True` and the params
are the pair `(decoder, encoder)`: two `eqx.nn.MLP` modules as they are, activation
functions and all (`vi.grad` and `vi.fit` differentiate and optimize their
floating-point arrays only).

- Gaussian latents: z ~ Normal(0, 1)^8 per image, x ~ Bernoulli(logits=decoder(z));
  guide z ~ Normal(encoder(x)), reparameterized. Trained with the ELBO over a
  minibatch (`vi.elbo`, the model a `ppl.vmap` over images) and with the IWAE bound
  (`vi.iwae`, K = 5 per image).
- Binary latents: z ~ Bernoulli(1/2)^8 per image, same decoder on z; guide
  z ~ Bernoulli(logits=encoder(x)). Trained with the ELBO under reinforce with a
  leave-one-out baseline, VIMCO (K = 5), mvd, and exact enumeration.

Why the discrete objectives are per image: `vi.enum` sums over the joint values of all
enumerated sites of one objective evaluation (at most 4,096). Eight binary latents of
one image have 2^8 = 256 joint values; a minibatch of 64 images would have 256^64. So
the objective scores one random image (`key` picks it), and `vi.grad(objective,
num_samples=64)` - `vi.fit(..., num_samples=64)` - averages 64 independent runs, which
is the minibatch. The same per-image form gives reinforce a leave-one-out baseline made
of the other images' ELBOs, and gives VIMCO and IWAE a bound per image, as they should
be (a bound over a whole minibatch's joint weight would be far looser).

The minibatch is drawn inside the objective from the key, so `vi.fit` drives
everything. Printed: a table of test ELBO and test log-likelihood (IWAE with K = 1,000
for Gaussian latents; exact, by summing the 256 codes, for binary latents) and seconds
per training step. Saved: examples/out/vae_digits.png (test reconstructions and prior
samples of each model).

    python examples/vae_digits.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from jax.scipy.special import logsumexp

import ppl
import vi

PIXELS, LATENT, HIDDEN = 64, 8, 128
BATCH = 64
OUT = Path(__file__).resolve().parent / "out"


def load_digits(num_test=297, seed=0):
    """(train [1500, 64], test [297, 64], test labels [297]): binary float32 images, a
    fixed split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    binary = (digits.data >= 8).astype(np.float32)  # intensities are 0..16
    order = np.random.default_rng(seed).permutation(len(binary))
    train, test = order[num_test:], order[:num_test]
    return jnp.asarray(binary[train]), jnp.asarray(binary[test]), digits.target[test]


def init_params(key, encoder_out):
    """(decoder, encoder): the model's and the guide's parameters."""
    k_enc, k_dec = jax.random.split(key)
    return (eqx.nn.MLP(LATENT, PIXELS, HIDDEN, 1, activation=jax.nn.tanh, key=k_dec),
            eqx.nn.MLP(PIXELS, encoder_out, HIDDEN, 1, activation=jax.nn.tanh, key=k_enc))


# -- Gaussian latents ---------------------------------------------------------------------
@ppl.gen
def image(decoder, x):
    z = ppl.sample("z", dist.Normal(jnp.zeros(LATENT), 1.0).to_event(1))
    return ppl.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)


@ppl.gen
def code(encoder, x):  # a guide's args: (guide params, *model_args)
    out = encoder(x)
    return ppl.sample("z", dist.Normal(out[:LATENT], jax.nn.softplus(out[LATENT:])).to_event(1))


images = ppl.vmap(image, in_axes=(None, 0))  # a minibatch: the decoder shared, x mapped
codes = ppl.vmap(code, in_axes=(None, 0))


# -- binary latents -----------------------------------------------------------------------
@ppl.gen
def binary_image(decoder, x):
    z = ppl.sample("z", dist.Bernoulli(probs=jnp.full(LATENT, 0.5)))
    return ppl.sample("x", dist.Bernoulli(logits=decoder(z.astype(jnp.float32))).to_event(1), obs=x)


def binary_code(estimator):
    """A guide whose 8 Bernoulli sites carry `estimator` (vi.enum and vi.mvd take scalar
    events, so the 8 latents are a batch of Bernoullis, not one event)."""

    @ppl.gen
    def guide(encoder, x):
        return ppl.sample("z", estimator(dist.Bernoulli(logits=encoder(x))))

    return guide


# -- objectives ---------------------------------------------------------------------------
def minibatch_elbo(train, batch=BATCH):
    """The ELBO of a random minibatch per image: indices drawn from the key."""

    def objective(key, params):
        k_batch, k = jax.random.split(key)
        xs = train[jax.random.choice(k_batch, train.shape[0], (batch,), replace=False)]
        return vi.elbo(images, codes, (xs,), None, learn_model=True)(k, params) / batch

    return objective


def per_image(bound, model, guide, train):
    """`bound(model, guide, model_args, observations, learn_model=True)` on one random
    training image; run it with `num_samples=BATCH` for a minibatch."""

    def objective(key, params):
        k_image, k = jax.random.split(key)
        x = train[jax.random.randint(k_image, (), 0, train.shape[0])]
        return bound(model, guide, (x,), None, learn_model=True)(k, params)

    return objective


def variants(train):
    """name -> (objective, num_samples, latent kind, encoder outputs)."""
    iwae5 = lambda *a, **kw: vi.iwae(*a, 5, **kw)  # noqa: E731
    vimco5 = lambda *a, **kw: vi.vimco(*a, 5, **kw)  # noqa: E731
    loo = lambda d: vi.reinforce(d, baseline="leave_one_out")  # noqa: E731
    return {
        "gaussian, ELBO (reparam)": (minibatch_elbo(train), 1, "gaussian", 2 * LATENT),
        "gaussian, IWAE K=5 (reparam)": (per_image(iwae5, image, code, train), BATCH, "gaussian", 2 * LATENT),
        "binary, ELBO (reinforce + LOO)": (per_image(vi.elbo, binary_image, binary_code(loo), train),
                                           BATCH, "binary", LATENT),
        "binary, VIMCO K=5": (per_image(vimco5, binary_image, binary_code(vi.reinforce), train),
                              BATCH, "binary", LATENT),
        "binary, ELBO (mvd)": (per_image(vi.elbo, binary_image, binary_code(vi.mvd), train),
                               BATCH, "binary", LATENT),
        "binary, ELBO (enum, 256 codes)": (per_image(vi.elbo, binary_image, binary_code(vi.enum), train),
                                           BATCH, "binary", LATENT),
    }


# -- evaluation on the test set -----------------------------------------------------------
def gaussian_bounds(key, params, test, num_particles=1000):
    """Per test image: (ELBO, IWAE-K) from the same K guide draws, averaged over images.
    Plain GFI calls: guide.simulate and model.assess, vmapped over particles and images."""

    decoder, encoder = params

    def one(k, x):
        tr = jax.vmap(lambda kk: code.simulate(kk, (encoder, x)))(jax.random.split(k, num_particles))
        log_p = jax.vmap(lambda c: image.assess(c, (decoder, x))[0])(tr.choices)
        log_w = log_p - tr.score
        return jnp.mean(log_w), logsumexp(log_w) - math.log(num_particles)

    elbo, iwae = jax.lax.map(lambda a: one(*a), (jax.random.split(key, test.shape[0]), test), batch_size=32)
    return float(elbo.mean()), float(iwae.mean())


ALL_CODES = jnp.asarray(np.array(np.unravel_index(np.arange(2**LATENT), (2,) * LATENT)).T, dtype=jnp.int32)


def binary_bounds(params, test):
    """Exact per-image ELBO and log p(x), summing the 256 codes, averaged over images."""
    guide = binary_code(lambda d: d)
    decoder, encoder = params

    def one(x):
        log_p = jax.vmap(lambda z: binary_image.assess({"z": z}, (decoder, x))[0])(ALL_CODES)
        log_q = jax.vmap(lambda z: guide.assess({"z": z}, (encoder, x))[0])(ALL_CODES)
        return jnp.sum(jnp.exp(log_q) * (log_p - log_q)), logsumexp(log_p)

    elbo, log_px = jax.lax.map(one, test, batch_size=32)
    return float(elbo.mean()), float(log_px.mean())


def reconstruct(params, kind, xs):
    """Pixel probabilities of the decoder at the guide's mean code (Gaussian: the mean;
    binary: the most probable code)."""
    decoder, encoder = params
    out = jax.vmap(encoder)(xs)
    z = out[:, :LATENT] if kind == "gaussian" else (out > 0).astype(jnp.float32)
    return jax.nn.sigmoid(jax.vmap(decoder)(z))


def prior_samples(key, params, kind, n):
    z = (jax.random.normal(key, (n, LATENT)) if kind == "gaussian"
         else jax.random.bernoulli(key, 0.5, (n, LATENT)).astype(jnp.float32))
    return jax.nn.sigmoid(jax.vmap(params[0])(z))


# -- training -----------------------------------------------------------------------------
def train_variant(key, objective, num_samples, params, steps, learning_rate):
    """(params, history, seconds per step): a warm-up fit of one chunk compiles the step
    (vi.fit reuses it for every chunk of that length), then the timed fit."""
    chunk = max(1, steps // 20)
    optimizer = optax.adam(learning_rate)
    fit = lambda n: vi.fit(key, objective, params, optimizer, n, num_samples=num_samples,  # noqa: E731
                           chunk_size=chunk, progress_bar=False)
    jax.block_until_ready(fit(chunk))
    start = time.perf_counter()
    params, history = jax.block_until_ready(fit(steps))
    return params, history, (time.perf_counter() - start) / steps


def plot(results, shown, test, labels, key, path):
    """One test image of each digit and its reconstructions by the `shown` variants, then
    10 prior samples of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 10
    xs = test[np.array([np.flatnonzero(labels == d)[0] for d in range(n)])]
    rows = [("test images", np.asarray(xs))]
    for name in shown:
        r = results[name]
        rows.append((f"{name}: reconstructions", np.asarray(reconstruct(r["params"], r["kind"], xs))))
    for name in shown:
        r = results[name]
        rows.append((f"{name}: prior samples", np.asarray(prior_samples(key, r["params"], r["kind"], n))))
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.7, len(rows) * 0.85))
    fig.subplots_adjust(left=0.02, right=0.98, top=0.97, bottom=0.01, wspace=0.08, hspace=0.45)
    for (title, pictures), row in zip(rows, axes):
        for picture, ax in zip(pictures, row):
            ax.imshow(picture.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_title(title, loc="left", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 steps per variant, smaller test bounds")
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default 3000)")
    args = parser.parse_args(argv)
    steps = args.steps or (200 if args.quick else 3000)
    train, test, labels = load_digits()
    print(f"digits: {train.shape[0]} training and {test.shape[0]} test images of {PIXELS} binary pixels; "
          f"{LATENT} latents, minibatch {BATCH}, {steps} Adam steps per variant")
    key = jax.random.key(0)
    k_init, k_fit, k_eval, k_plot = jax.random.split(key, 4)
    results = {}
    for name, (objective, num_samples, kind, encoder_out) in variants(train).items():
        params = init_params(k_init, encoder_out)
        params, history, seconds = train_variant(k_fit, objective, num_samples, params, steps, 3e-3)
        if kind == "gaussian":
            elbo, log_px = gaussian_bounds(k_eval, params, test, 100 if args.quick else 1000)
        else:
            elbo, log_px = binary_bounds(params, test)
        results[name] = dict(params=params, kind=kind, elbo=elbo, log_px=log_px, seconds=seconds,
                             train=float(history[-max(1, steps // 10):].mean()))
        print(f"  trained {name}: {seconds * 1e3:.2f} ms/step", flush=True)

    print(f"\n{'variant':34s} {'train obj':>10s} {'test ELBO':>10s} {'test log p(x)':>14s} {'ms/step':>8s}")
    for name, r in results.items():
        print(f"{name:34s} {r['train']:10.2f} {r['elbo']:10.2f} {r['log_px']:14.2f} {r['seconds'] * 1e3:8.2f}")
    k_iwae = 100 if args.quick else 1000
    print(f"(nats per image; test log p(x): IWAE with K = {k_iwae} for Gaussian latents, exact for binary; "
          "train obj: the objective's estimate over the last 10% of steps)")
    shown = [n for n in results if n.startswith("gaussian")] + ["binary, VIMCO K=5", "binary, ELBO (enum, 256 codes)"]
    path = OUT / "vae_digits.png"
    plot(results, shown, test, labels, k_plot, path)
    print(f"saved {path.relative_to(OUT.parent.parent)}")


if __name__ == "__main__":
    main()
