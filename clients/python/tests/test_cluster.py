"""Against a real cluster (coordinator and 2 workers over mutual TLS, started
by tests/deploy/python-client.sh): submit, watch to the end, metrics, status,
cancel, refusals, a TorchScript module, and the README's quick start."""
import math
import re

import pytest

from conftest import ROOT, small_spec
from ringtrain_client import Client, RingtrainError


def test_submit_watch_metrics(client):
    job = client.submit(small_spec(max_steps=20))
    assert re.fullmatch(r"[0-9a-f]{16}", job)
    events = list(client.watch(job))
    assert events[0].kind == "snapshot"
    assert all(e.status.job_id == job for e in events)
    steps = [e.status.step for e in events]
    assert steps == sorted(steps), "steps go forward"
    final = events[-1].status
    assert final.state == "succeeded", final
    assert final.done and final.step == 20 and final.total_steps == 20
    assert final.workers_wanted == 2
    assert final.loss is not None and math.isfinite(final.loss)
    now = client.status(job)
    assert (now.job_id, now.state, now.step) == (job, "succeeded", 20)

    rows = client.metrics(job)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 20, steps  # increasing, to the end
    assert len(rows) >= 10
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert all(1 <= r["workers"] <= 2 for r in rows)
    # It learns: the last steps' loss is below the first's.
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"]

    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(rows)
    assert list(frame.columns) == [
        "step", "epoch", "loss", "samples_per_s", "workers", "test_accuracy", "test_loss"]
    assert frame["step"].is_monotonic_increasing and frame["loss"].dtype == float
    # No evaluation asked for but the final one, after the last step.
    assert frame["test_accuracy"][:-1].isna().all()
    assert 0 < frame["test_accuracy"].iloc[-1] <= 1 and frame["test_loss"].iloc[-1] > 0


def test_status_lists_jobs_and_workers(client):
    job = client.submit(small_spec(max_steps=4, name="listed"))
    final = client.wait(job)
    assert final.state == "succeeded"
    jobs = {j.job_id: j for j in client.status()}
    assert jobs[job].name == "listed" and jobs[job].state == "succeeded"
    workers = client.workers()
    assert len([w for w in workers if w.alive]) == 2


def test_wrong_token_is_unauthenticated(cluster):
    addr, tls_dir = cluster
    with Client(addr, tls_dir=tls_dir, token="not-the-token") as bad:
        with pytest.raises(RingtrainError) as e:
            bad.status()
        with pytest.raises(RingtrainError):
            bad.submit(small_spec())
    assert e.value.code_name == "UNAUTHENTICATED"
    assert e.value.message == "unknown token"
    assert str(e.value) == "UNAUTHENTICATED: unknown token"


def test_refusals_are_one_line_errors(client):
    with pytest.raises(RingtrainError) as e:
        client.status("0000000000000001")
    assert e.value.code_name == "NOT_FOUND", e.value
    assert "0000000000000001" in e.value.message

    with pytest.raises(RingtrainError) as e:
        client.submit(small_spec(bogus_key=1))
    assert e.value.code_name == "INVALID_ARGUMENT"
    assert "bogus_key" in e.value.message and "\n" not in e.value.message

    with pytest.raises(RingtrainError) as e:
        client.submit(small_spec(dataset={"format": "idx", "path": "/nonexistent/fashion"}))
    assert e.value.code_name == "INVALID_ARGUMENT"
    assert "dataset" in e.value.message


def test_cancel_a_running_job(client):
    job = client.submit(small_spec(max_steps=100000, name="to-cancel"))
    for event in client.watch(job):
        if event.status.state == "running" and event.status.step >= 2:
            break  # leaving the loop ends the stream
        assert not event.status.done, event.status
    status = client.cancel(job)
    assert status.job_id == job and status.state == "cancelled", status
    final = client.wait(job)
    assert final.state == "cancelled" and final.step < 100000
    assert {j.job_id: j.state for j in client.status()}[job] == "cancelled"


def test_torchscript_module_through_the_export_helper(client):
    torch = pytest.importorskip("torch")
    from torch import nn

    class Net(nn.Module):
        """28x28 images to 10 classes' logits."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    spec = small_spec(max_steps=12, name="py-module", loss="cross_entropy")
    del spec["model"]
    job = client.submit_module(Net(), spec)
    final = client.wait(job)
    assert final.state == "succeeded", final
    assert final.model.startswith("sha256:") and final.step == 12
    assert all(math.isfinite(r["loss"]) for r in client.metrics(job))

    # Traced instead of scripted, and refused when not a module.
    traced = client.submit_module(Net(), dict(spec, max_steps=2), example_inputs=torch.zeros(1, 1, 28, 28))
    assert client.wait(traced).state == "succeeded"
    with pytest.raises(TypeError):
        client.submit_module(object(), spec)


def readme_python_quick_start():
    """The Python block of the README's quick start ("Using it")."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if "from ringtrain_client import Client" in b]
    assert found, "README.md: no Python quick start (a ```python block using ringtrain_client)"
    return found[0]


def test_readme_quick_start_runs(cluster, monkeypatch, capsys):
    addr, tls_dir = cluster
    code = readme_python_quick_start()
    assert 'Client("127.0.0.1:50051", tls_dir="tls/")' in code
    code = code.replace('"127.0.0.1:50051"', repr(addr)).replace('"tls/"', repr(tls_dir))
    monkeypatch.chdir(ROOT)  # the snippet names examples/ relative to the checkout
    scope = {}
    exec(compile(code, "README.md (Python quick start)", "exec"), scope)
    out = capsys.readouterr().out
    final = scope["client"].status(scope["job"])
    assert final.state == "succeeded", (final, out)
    assert "succeeded" in out
