"""PyTorch (eager) training steps of the standard workloads (forward, backward, SGD update,
float32), for comparing with `cargo bench --bench steps` on the same machine. Each step is
zero_grad, forward, backward and an optimizer step on tensors already in place; the loss is read
back. Prints median ms.

    pip install torch; python3 benches/peers/torch_steps.py
"""
import numpy as np
import torch
from torch import nn
from timing import median_ms

torch.manual_seed(0)


def glorot(model):
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def trainer(model, loss_fn, x, y, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def mlp(batch):
    model = glorot(nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)))
    x = torch.rand(batch, 784)
    y = torch.tensor((np.arange(batch) * 7) % 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return trainer(model, nn.functional.cross_entropy, x, y, opt)


def keras_mlp(batch=16):
    model = glorot(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10), nn.Softmax(-1)))
    x = torch.rand(batch, 20)
    t = torch.eye(10)[(np.arange(batch) * 7) % 10]

    def cce(p, t):
        return -(t * torch.log(p)).sum(-1).mean()

    return trainer(model, cce, x, t, torch.optim.SGD(model.parameters(), lr=0.01))


def autoencoder(batch=128):
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    model = glorot(nn.Sequential(*layers))
    x = torch.rand(batch, 784)
    return trainer(model, nn.functional.mse_loss, x, x, torch.optim.SGD(model.parameters(), lr=0.1))


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'workload':<15} {'median_ms':>10}")
    for name, step in [
        ("keras-mlp", keras_mlp()),
        ("fmnist-mlp", mlp(128)),
        ("fmnist-mlp-4k", mlp(4096)),
        ("autoencoder", autoencoder()),
    ]:
        print(f"{name:<15} {median_ms(step):>10.3f}", flush=True)
