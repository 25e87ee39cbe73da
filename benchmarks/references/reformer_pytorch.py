"""One Adam training step of reformer-pytorch's `ReformerLM`: seconds and peak memory.

Run by `transformers_howfar.bench.reformer.torch_lm_step` under a Python with torch and reformer-pytorch (not JAX).
Argument: one JSON object {"n_layers", "length", "threads", "warmup"}. Output: the line `@@RESULT@@` + one line of JSON.
The caller pins the process to its CPU cores before this script starts.
"""
import json
import os
import resource
import sys
import time

args = json.loads(sys.argv[1])
n_layers, length, threads, warmup = int(args['n_layers']), int(args['length']), int(args['threads']), int(args['warmup'])
os.environ['OMP_NUM_THREADS'] = str(threads)  # before torch starts its OpenMP threads

import torch  # noqa: E402
import reformer_pytorch  # noqa: E402
from reformer_pytorch import ReformerLM  # noqa: E402

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
for _ in range(warmup):
    step()
first = time.perf_counter() - start
start, cpu = time.perf_counter(), time.process_time()
loss = step()
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
result = {'seconds': seconds, 'cpu_seconds': cpu, 'first_step_s': first, 'loss': loss, 'threads': threads,
          'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          'versions': {'torch': torch.__version__, 'reformer_pytorch': getattr(reformer_pytorch, '__version__', None)}}
print('\n@@RESULT@@' + json.dumps(result), flush=True)
