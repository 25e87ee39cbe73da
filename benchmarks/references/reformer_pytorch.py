"""One reformer-pytorch `ReformerLM` Adam training step, the side-by-side reference of `bench.reformer`.

Runs in a Python with torch and reformer-pytorch (not this package's JAX). Argument: one JSON object with
`n_layers`, `length`, `threads` and `warmup`. Prints `@@RESULT@@` and one line of JSON: seconds and CPU seconds of
the timed step, the seconds of the warm-up steps, the loss, the peak resident memory and the library versions.
"""
import json
import resource
import sys
import time

import reformer_pytorch
import torch
from reformer_pytorch import ReformerLM

args = json.loads(sys.argv[1])
n_layers, length, threads, warmup = args['n_layers'], args['length'], args['threads'], args.get('warmup', 1)
torch.set_num_threads(threads)
torch.manual_seed(0)
model = ReformerLM(num_tokens=256, dim=256, depth=n_layers, max_seq_len=length, heads=4, dim_head=64, bucket_size=64,
                   n_hashes=4, causal=True, axial_position_emb=True).train()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
tokens = torch.randint(0, 256, (1, length + 1))


def step() -> float:
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


start = time.perf_counter()
for _ in range(warmup): step()
first = time.perf_counter() - start
start, cpu = time.perf_counter(), time.process_time()
loss = step()
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print('@@RESULT@@' + json.dumps({
    'seconds': seconds, 'cpu_seconds': cpu, 'first_step_s': first, 'loss': loss, 'threads': threads,
    'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    'versions': {'torch': torch.__version__, 'reformer_pytorch': getattr(reformer_pytorch, '__version__', None)}}))
