"""HF transformers' GPT-2 `generate` with random weights, the reference of `howfar bench generate`.

Run by `bench.measure.run_reference('generate_hf.py', args)` in a Python that has torch and transformers. `args` (one
JSON argument): vocab_size, d_model, n_layers, n_heads, d_ff, prompt_len, threads (0 = torch's default) and runs, a
list of [new_tokens, use_cache, repeats]. Greedy decoding of exactly new_tokens tokens after an 8-token warm-up run;
a logits processor notes the clock at every step. Prints `@@RESULT@@` and one line of JSON: per run the median seconds
and the milliseconds of each step (of the last repeat), with the torch and transformers versions and threads.
"""
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList

args = json.loads(sys.argv[1])
torch.manual_seed(0)
if args.get('threads'):
    torch.set_num_threads(args['threads'])
model = GPT2LMHeadModel(GPT2Config(vocab_size=args['vocab_size'], n_positions=1024, n_embd=args['d_model'],
                                   n_layer=args['n_layers'], n_head=args['n_heads'], n_inner=args['d_ff'])).eval()


class Clock(LogitsProcessor):
    "Notes the time whenever generate asks for the next token's scores."
    def __init__(self):
        self.times = []

    def __call__(self, ids, scores):
        self.times.append(time.perf_counter())
        return scores


prompt = torch.randint(7, args['vocab_size'], (1, args['prompt_len']))


def run(new_tokens, use_cache, processors=None):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=0,
                          logits_processor=processors)


out = {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'transformers': transformers.__version__,
       'runs': []}
with torch.no_grad():
    for new_tokens, use_cache, repeats in args['runs']:
        run(8, use_cache)  # warm-up
        times, steps = [], None
        for _ in range(repeats):
            clock = Clock()
            start = time.perf_counter()
            run(new_tokens, use_cache, LogitsProcessorList([clock]))
            times.append(time.perf_counter() - start)
            steps = [1000 * (later - earlier) for earlier, later in zip(clock.times, clock.times[1:])]
        out['runs'].append({'new_tokens': new_tokens, 'cache': use_cache, 'seconds': statistics.median(times),
                            'step_ms': steps})
print('@@RESULT@@' + json.dumps(out))
