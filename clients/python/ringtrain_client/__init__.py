"""Python client of a ringtrain cluster.

    from ringtrain_client import Client
    client = Client("127.0.0.1:50051", tls_dir="tls/")   # token: tls/token
    job = client.submit("examples/fashion-mlp.toml")
    for event in client.watch(job):
        print(event.kind, event.status.state, event.status.step, event.status.loss)
"""
from ._export import export_module
from .client import (
    Client,
    JobEvent,
    JobStatus,
    RingtrainError,
    WorkerStatus,
)

__all__ = ["Client", "JobEvent", "JobStatus", "RingtrainError", "WorkerStatus", "export_module"]
__version__ = "0.1.0"
