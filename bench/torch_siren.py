"""Reference point for bench/train_speed.py: a PyTorch SIREN as in the reference code
(github.com/vsitzmann/siren `modules.py`: nn.Linear layers, sin(w0 * (W x + b)), w0 = 30, the
same init), trained full batch with Adam on MSE. Prints one JSON line: s/step (median of
`--calls` timed steps after warm-up) and the matmul FLOP rate counted as in train_speed.py.

    python bench/torch_siren.py --pixels 65536 --width 256 --hidden-layers 3

Needs only torch and numpy (not a neurimg dependency); train_speed.py runs it in a subprocess
with `--torch-python PYTHON`, so both are timed in the same session on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from torch import nn


class SineLayer(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, w0: float, first: bool):
        super().__init__()
        self.w0 = w0
        self.linear = nn.Linear(fan_in, fan_out)
        bound = 1 / fan_in if first else math.sqrt(6 / fan_in) / w0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x):
        return torch.sin(self.w0 * self.linear(x))


def siren(width: int, hidden_layers: int, w0: float = 30.0) -> nn.Module:
    layers = [SineLayer(2, width, w0, True)] + [SineLayer(width, width, w0, False) for _ in range(hidden_layers)]
    out = nn.Linear(width, 3)
    with torch.no_grad():
        b = math.sqrt(6 / width) / w0
        out.weight.uniform_(-b, b)
    return nn.Sequential(*layers, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pixels", type=int, default=65536)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--hidden-layers", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = siren(a.width, a.hidden_layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    side = int(math.sqrt(a.pixels))
    lin = torch.linspace(-1, 1, side)
    coords = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).reshape(-1, 2)
    target = torch.rand(coords.shape[0], 3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ((model(coords) - target) ** 2).mean()
        loss.backward()
        opt.step()

    step()
    step()
    ts = []
    for _ in range(a.calls):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    s = statistics.median(ts)
    w = a.width
    flops = 3 * 2 * (2 * w + a.hidden_layers * w * w + 3 * w) * coords.shape[0]
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "pixels": int(coords.shape[0]),
                      "s_step": s, "gflops": flops / s / 1e9}))


if __name__ == "__main__":
    main()
