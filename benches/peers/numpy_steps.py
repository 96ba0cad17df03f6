"""Hand-written numpy training steps of the standard workloads (forward, backward, SGD update,
float32), for comparing with `cargo bench --bench steps` on the same machine. Prints median ms.

    python3 benches/peers/numpy_steps.py
"""
import numpy as np
from timing import median_ms

rng = np.random.default_rng(0)


def glorot(a, b):
    s = np.sqrt(6.0 / (a + b))
    return rng.uniform(-s, s, (a, b)).astype(np.float32)


def mlp(batch, sizes, lr=0.01, momentum=0.9):
    ws = [glorot(a, b) for a, b in zip(sizes, sizes[1:])]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    vw = [np.zeros_like(w) for w in ws]
    vb = [np.zeros_like(b) for b in bs]
    x = rng.random((batch, sizes[0]), dtype=np.float32)
    y = (np.arange(batch) * 7) % sizes[-1]

    def step():
        hs = [x]
        for i, (w, b) in enumerate(zip(ws, bs)):
            z = hs[-1] @ w + b
            hs.append(np.maximum(z, 0) if i < len(ws) - 1 else z)
        z = hs[-1]
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        g = p
        g[np.arange(batch), y] -= 1
        g /= batch
        for i in reversed(range(len(ws))):
            gw = hs[i].T @ g
            gb = g.sum(axis=0)
            if i > 0:
                g = (g @ ws[i].T) * (hs[i] > 0)
            vw[i] *= momentum
            vw[i] -= lr * gw
            ws[i] += vw[i]
            vb[i] *= momentum
            vb[i] -= lr * gb
            bs[i] += vb[i]

    return step


def keras_mlp(batch=16, lr=0.01):
    w1, b1 = glorot(20, 64), np.zeros(64, np.float32)
    w2, b2 = glorot(64, 10), np.zeros(10, np.float32)
    x = rng.random((batch, 20), dtype=np.float32)
    t = np.eye(10, dtype=np.float32)[(np.arange(batch) * 7) % 10]

    def step():
        nonlocal w1, b1, w2, b2
        z1 = x @ w1 + b1
        h = np.maximum(z1, 0)
        mask = (rng.random(h.shape, dtype=np.float32) < 0.5).astype(np.float32) * 2.0
        hd = h * mask
        z = hd @ w2 + b2
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - t) / batch
        gw2, gb2 = hd.T @ g, g.sum(axis=0)
        gh = (g @ w2.T) * mask * (z1 > 0)
        gw1, gb1 = x.T @ gh, gh.sum(axis=0)
        w1 -= lr * gw1
        b1 -= lr * gb1
        w2 -= lr * gw2
        b2 -= lr * gb2

    return step


def autoencoder(batch=128, lr=0.1):
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    ws = [glorot(a, b) for a, b in zip(sizes, sizes[1:])]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    x = rng.random((batch, 784), dtype=np.float32)

    def step():
        hs = [x]
        for w, b in zip(ws, bs):
            hs.append(1 / (1 + np.exp(-(hs[-1] @ w + b))))
        g = 2 * (hs[-1] - x) / x.size
        for i in reversed(range(len(ws))):
            g = g * hs[i + 1] * (1 - hs[i + 1])
            gw = hs[i].T @ g
            gb = g.sum(axis=0)
            g = g @ ws[i].T
            ws[i] -= lr * gw
            bs[i] -= lr * gb

    return step


if __name__ == "__main__":
    print(f"numpy {np.__version__}")
    print(f"{'workload':<15} {'median_ms':>10}")
    for name, step in [
        ("keras-mlp", keras_mlp()),
        ("fmnist-mlp", mlp(128, [784, 256, 256, 10])),
        ("fmnist-mlp-4k", mlp(4096, [784, 256, 256, 10])),
        ("autoencoder", autoencoder()),
    ]:
        print(f"{name:<15} {median_ms(step):>10.3f}")
