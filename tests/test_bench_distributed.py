"""`howfar bench distributed` in its quick version: both layouts train, and the estimates follow the ring all-reduce."""
import pytest

from transformers_howfar.bench.distributed import allreduce_bytes, distributed_benchmark


def test_allreduce_estimate_grows_towards_twice_the_gradient():
    assert allreduce_bytes(10, 1) == 0 and allreduce_bytes(10, 2) == 40
    assert allreduce_bytes(10, 64) < allreduce_bytes(10, 1024) < 2 * 10 * 4


@pytest.mark.slow
def test_quick_benchmark_records_both_layouts():
    records = distributed_benchmark(quick=True)
    tps = {r['config']['processes']: r['value'] for r in records if r['metric'] == 'tokens_per_s'}
    assert set(tps) == {1, 2} and all(v > 0 for v in tps.values())
    assert any(r['metric'] == 'allreduce_seconds' and r['config']['estimate'] for r in records)
