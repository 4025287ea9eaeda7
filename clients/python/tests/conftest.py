"""Fixtures of the client's tests.

The tests in test_cluster.py talk to a real cluster whose address and TLS
dir come from RINGTRAIN_TEST_COORDINATOR and RINGTRAIN_TEST_TLS_DIR (set by
tests/deploy/python-client.sh, which starts it). Without them those tests
are skipped, except under CI, where that is a failure.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DATA = os.environ.get("RINGTRAIN_DATA") or "/usr/share/datasets/fashion-mnist"


def under_ci():
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


@pytest.fixture(autouse=True)
def no_ringtrain_env(monkeypatch):
    """The tests say what they connect to: no RINGTRAIN_* defaults leak in."""
    for name in ("RINGTRAIN_COORDINATOR", "RINGTRAIN_TLS_DIR", "RINGTRAIN_TOKEN", "RINGTRAIN_INSECURE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def cluster():
    """(address, TLS dir) of the test cluster."""
    addr = os.environ.get("RINGTRAIN_TEST_COORDINATOR")
    tls_dir = os.environ.get("RINGTRAIN_TEST_TLS_DIR")
    if not addr or not tls_dir:
        why = "no cluster: RINGTRAIN_TEST_COORDINATOR and RINGTRAIN_TEST_TLS_DIR are unset (tests/deploy/python-client.sh sets them)"
        if under_ci():
            pytest.fail(why)
        pytest.skip(why)
    return addr, tls_dir


@pytest.fixture
def client(cluster):
    from ringtrain_client import Client

    addr, tls_dir = cluster
    with Client(addr, tls_dir=tls_dir) as c:
        yield c


def small_spec(**overrides):
    """A job of a few seconds: the MLP on Fashion-MNIST, 2 workers."""
    spec = {
        "name": "py-client-test",
        "model": "mlp",
        "workers": 2,
        "batch_size": 32,
        "max_steps": 20,
        "seed": 0,
        "eval_every_steps": 0,
        "dataset": {"format": "idx", "path": DATA},
        "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9},
    }
    spec.update(overrides)
    return spec
