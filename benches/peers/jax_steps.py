"""JAX (jit) training steps of the standard workloads (forward, backward, SGD update, float32),
for comparing with `cargo bench --bench steps` on the same machine. Each step is one jitted
function with the parameters donated, the batch already on the device, and the returned loss
waited for. Prints median ms.

    pip install "jax[cpu]"; python3 benches/peers/jax_steps.py
"""
import time
import numpy as np
import jax
import jax.numpy as jnp

rng = np.random.default_rng(0)


def glorot(a, b):
    s = np.sqrt(6.0 / (a + b))
    return jnp.asarray(rng.uniform(-s, s, (a, b)).astype(np.float32))


def median_ms(step, state, seconds=2.0):
    for _ in range(3):
        state, loss = step(*state)
    loss.block_until_ready()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t = time.perf_counter()
        state, loss = step(*state)
        loss.block_until_ready()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def dense_params(sizes):
    return [(glorot(a, b), jnp.zeros(b, jnp.float32)) for a, b in zip(sizes, sizes[1:])]


def mlp(batch, sizes=(784, 256, 256, 10), lr=0.01, momentum=0.9):
    params = dense_params(sizes)
    velocity = jax.tree.map(jnp.zeros_like, params)
    x = jnp.asarray(rng.random((batch, sizes[0]), dtype=np.float32))
    y = jnp.asarray((np.arange(batch) * 7) % sizes[-1])

    def loss(params, x, y):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    @jax.jit
    def train(params, velocity, x, y):
        cost, grads = jax.value_and_grad(loss)(params, x, y)
        velocity = jax.tree.map(lambda v, g: momentum * v - lr * g, velocity, grads)
        params = jax.tree.map(lambda p, v: p + v, params, velocity)
        return (params, velocity), cost

    step = jax.jit(lambda p, v: train(p, v, x, y), donate_argnums=(0, 1))
    return step, (params, velocity)


def keras_mlp(batch=16, lr=0.01):
    params = dense_params((20, 64, 10))
    x = jnp.asarray(rng.random((batch, 20), dtype=np.float32))
    t = jnp.asarray(np.eye(10, dtype=np.float32)[(np.arange(batch) * 7) % 10])

    def loss(params, key):
        (w1, b1), (w2, b2) = params
        h = jax.nn.relu(x @ w1 + b1)
        keep = jax.random.bernoulli(key, 0.5, h.shape)
        h = jnp.where(keep, h * 2.0, 0.0)
        p = jax.nn.softmax(h @ w2 + b2)
        return jnp.mean(-jnp.sum(t * jnp.log(p), axis=1))

    def train(params, key):
        key, sub = jax.random.split(key)
        cost, grads = jax.value_and_grad(loss)(params, sub)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return (params, key), cost

    return jax.jit(train, donate_argnums=(0,)), (params, jax.random.key(1))


def autoencoder(batch=128, lr=0.1):
    params = dense_params((784, 1000, 500, 250, 30, 250, 500, 1000, 784))
    x = jnp.asarray(rng.random((batch, 784), dtype=np.float32))

    def loss(params):
        h = x
        for w, b in params:
            h = jax.nn.sigmoid(h @ w + b)
        return jnp.mean((h - x) ** 2)

    def train(params):
        cost, grads = jax.value_and_grad(loss)(params)
        return (jax.tree.map(lambda p, g: p - lr * g, params, grads),), cost

    return jax.jit(train, donate_argnums=(0,)), (params,)


if __name__ == "__main__":
    print(f"jax {jax.__version__} on {jax.devices()[0]}")
    print(f"{'workload':<15} {'median_ms':>10}")
    for name, (step, state) in [
        ("keras-mlp", keras_mlp()),
        ("fmnist-mlp", mlp(128)),
        ("fmnist-mlp-4k", mlp(4096)),
        ("autoencoder", autoencoder()),
    ]:
        print(f"{name:<15} {median_ms(step, state):>10.3f}", flush=True)
