"""PyTorch's fused CPU `scaled_dot_product_attention`, forward + backward, for `bench.attention`.

Runs in a Python that has torch (never this package). Argument: one JSON object with `length`, `batch`,
`heads`, `d_head`, `repeats`, `causal`. Prints `@@RESULT@@` and one line of JSON: seconds, median_s, torch,
threads, peak_rss_gb, baseline_rss_gb.
"""
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(length: int, batch: int = 1, heads: int = 4, d_head: int = 64, repeats: int = 3, causal: bool = True) -> dict:
    torch.manual_seed(0)

    def make(t):
        return [torch.randn(batch, heads, t, d_head, requires_grad=True) for _ in range(3)]

    def step(q, k, v):
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

    step(*make(length if length <= 16384 else 256))  # warm-up, at the same size unless it is long (as for JAX)
    baseline = peak_rss_gb()
    q, k, v = make(length)
    times = []
    for _ in range(repeats):
        for x in (q, k, v):
            x.grad = None
        start = time.perf_counter()
        step(q, k, v)
        times.append(time.perf_counter() - start)
    return {'seconds': min(times), 'median_s': sorted(times)[len(times) // 2], 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'peak_rss_gb': peak_rss_gb(), 'baseline_rss_gb': baseline}


if __name__ == '__main__':
    print('@@RESULT@@' + json.dumps(main(**json.loads(sys.argv[1]))))
