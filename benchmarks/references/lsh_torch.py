"""HF transformers' or reformer-pytorch's LSH self-attention layer, forward + backward, for `bench.lsh`.

Runs in a Python that has torch, transformers and reformer-pytorch (never this package). Argument: one JSON
object with `implementation` ('hf' or 'reformer_pytorch'), `length` and `threads`. The layer is the one
`bench.lsh.lsh_layer_step` times: width 256, 4 heads of 64, chunks of 64, 4 hash rounds, causal, batch 1.
Prints `@@RESULT@@` and one line of JSON: seconds (best of 2 after a warm-up), peak_rss_gb, versions.
"""
import json
import resource
import sys
import time

import torch

D, N, H, C, R = 256, 4, 64, 64, 4  # width, heads, head width, chunk length, hash rounds


def make_layer(implementation: str, length: int):
    "The layer and a function that runs it on `x (1, T, D)`."
    if implementation == 'hf':
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import ReformerAttention
        config = ReformerConfig(hidden_size=D, num_attention_heads=N, attention_head_size=H, lsh_attn_chunk_length=C,
                                num_hashes=R, num_buckets=None, is_decoder=True, attn_layers=['lsh'],
                                lsh_num_chunks_before=1, lsh_num_chunks_after=0, max_position_embeddings=length,
                                hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, axial_pos_embds=False)
        layer = ReformerAttention(config, layer_id=0).train()
        return layer, lambda x: layer(x).hidden_states
    from reformer_pytorch import LSHSelfAttention
    layer = LSHSelfAttention(dim=D, heads=N, dim_head=H, bucket_size=C, n_hashes=R, causal=True).train()
    return layer, layer


def main(implementation: str, length: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer, run = make_layer(implementation, length)
    x = torch.randn(1, length, D, requires_grad=True)
    cotangent = torch.randn(1, length, D)

    def step():
        run(x).backward(cotangent)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    step()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    versions = {'torch': torch.__version__}
    try:
        import transformers
        versions['transformers'] = transformers.__version__
    except ImportError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {'seconds': min(times), 'peak_rss_gb': peak, 'versions': versions}


if __name__ == '__main__':
    print('@@RESULT@@' + json.dumps(main(**json.loads(sys.argv[1]))))
