"""One training step of a nanoGPT-style decoder in PyTorch (eager mode), the reference of `howfar bench train`.

Run by `bench.measure.run_reference('train_torch.py', args)` in a Python that has torch. `args` (one JSON argument):
n_layers, d_model, n_heads, d_ff, max_len, vocab_size, batch_size, repeats. Prints `@@RESULT@@` and one line of JSON:
the median seconds per step (AdamW, gradient clipping, after one warm-up step), tokens/s, the torch version and threads.
"""
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

config = json.loads(sys.argv[1])
torch.manual_seed(0)
D, N, L, T = config['d_model'], config['n_heads'], config['n_layers'], config['max_len']
V, B = config['vocab_size'], config['batch_size']


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, config['d_ff']), nn.Linear(config['d_ff'], D)

    def forward(self, x):
        q, k, v = (t.view(B, T, N, D // N).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(D, dim=2))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, N, T, H)
        x = x + self.proj(attended.transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, V, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


model = GPT()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))


def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x).view(-1, V), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


step()  # warm-up
times = []
for _ in range(config['repeats']):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
seconds = statistics.median(times)
result = {'step_s': seconds, 'tokens_per_s': B * T / seconds, 'torch': torch.__version__, 'threads': torch.get_num_threads()}
print('@@RESULT@@' + json.dumps(result))
