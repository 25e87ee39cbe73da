"""Two tiers: `make test` runs every test not marked `slow`; `make test-slow` runs the slow ones (end-to-end runs of the
command line in fresh processes, simulated multi-device runs, long property sweeps). CI runs both."""


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end or long; left to `make test-slow`, which CI also runs')
