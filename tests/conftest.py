"""Two tiers: `make test` runs every test not marked `slow`; `make test-slow` runs the slow ones (end-to-end runs of the
command line in fresh processes, simulated multi-device runs, and the longer cases of parametrized sweeps). CI runs
both."""
import pytest

# Parametrized sweeps whose first N cases run in the fast tier; the rest of each sweep runs with the slow tier.
SWEEPS = {
    'test_attention.py::test_memory_efficient_equals_dense_values_and_gradients': 2,
    'test_attention_variants.py::test_cached_decoding_equals_full_forward': 2,
    'test_attention_variants.py::test_causal_variants_do_not_leak': 2,
    'test_attention_variants.py::test_local_equals_dense_with_mask': 1,
    'test_attention_variants.py::test_memory_compressed_equals_dense_on_summaries': 1,
    'test_attention_variants.py::test_sparse_equals_dense_with_mask': 1,
    'test_decoding.py::test_beam_size_one_is_greedy': 1,
    'test_distributed.py::test_bad_settings_give_one_line': 2,
    'test_lsh.py::test_causal_no_gradient_from_future': 1,
    'test_lsh.py::test_equals_reference_sweep': 1,
    'test_lsh.py::test_fully_masked_rows_finite': 1,
    'test_lsh.py::test_lengths_chunks_blocks': 1,
    'test_models.py::test_encoder_decoder_cached_equals_full': 2,
    'test_models.py::test_lm_cached_equals_full': 2,
    'test_models.py::test_rnn_cached_equals_full': 1,
    'test_models.py::test_save_load_round_trip': 2,
    'test_reversible.py::test_chunked_loss_equals_cross_entropy': 1,
    'test_scratchpad.py::test_cached_steps_equal_a_full_pass': 1,
}


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end or long; left to `make test-slow`, which CI also runs')


def pytest_collection_modifyitems(config, items):
    seen = {}
    for item in items:
        name = f'{item.path.name}::{item.originalname}'
        if name in SWEEPS:
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > SWEEPS[name]: item.add_marker(pytest.mark.slow)
    files = {item.path.name for item in items}
    for name in sorted(set(SWEEPS) - set(seen)):  # a renamed test must not silently leave the table
        if name.split('::')[0] in files and not config.getoption('keyword'):
            raise pytest.UsageError(f'tests/conftest.py SWEEPS names {name}, which no longer exists')
