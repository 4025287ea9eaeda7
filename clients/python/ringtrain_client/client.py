"""The client of a ringtrain coordinator's client API (gRPC service
`ringtrain.v1.Coordinator`), as the `ringtrain` CLI speaks it: mutual TLS
with the cluster CA and a bearer token, or plaintext with `insecure=True`."""
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import grpc

from . import _toml
from ._export import export_module

try:
    from . import ringtrain_pb2 as pb
    from . import ringtrain_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "ringtrain_client's gRPC stubs are missing: they are generated when the "
        "package is built; install it with `pip install ./clients/python`"
    ) from e

DEFAULT_COORDINATOR = "127.0.0.1:50051"
# The DNS name in the coordinator's certificate that marks its role: what the
# CLI verifies (addresses are whatever peers advertise, the role is what counts).
COORDINATOR_NAME = "coordinator.ringtrain.internal"
# Bytes per UploadModel message (the coordinator takes at most 1 MiB).
UPLOAD_CHUNK = 1 << 20
NEITHER_GIVEN = (
    "no transport security chosen: pass tls_dir=DIR (or set RINGTRAIN_TLS_DIR; make one "
    "with `ringtrain certs init DIR`), or insecure=True to connect in the clear"
)
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class RingtrainError(Exception):
    """An error a user can hit: the coordinator's refusal (`code` is the
    grpc.StatusCode, `message` the server's one line), or a local one (a
    missing file, no TLS dir: `code` is None)."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def code_name(self):
        return self.code.name if self.code is not None else None

    def __str__(self):
        return f"{self.code.name}: {self.message}" if self.code is not None else self.message


def _state_name(state):
    """The CLI's name of a state: "succeeded" for JOB_STATE_SUCCEEDED."""
    name = pb.JobState.Name(state) if state in pb.JobState.values() else "JOB_STATE_UNKNOWN"
    return name[len("JOB_STATE_"):].lower()


def _finite(v):
    return v if math.isfinite(v) else None


@dataclass
class JobStatus:
    """A job as the coordinator reports it. `state` is one of pending,
    running, waiting, succeeded, failed, cancelled. `loss`, `test_accuracy`,
    `test_loss` and `test_bits_per_byte` are None where there is none yet
    (or, for test_accuracy, where the model computes its own loss)."""

    job_id: str
    name: str
    state: str
    error: str
    step: int
    total_steps: int
    epoch: int
    workers: int
    workers_wanted: int
    loss: Optional[float]
    samples_per_s: float
    has_eval: bool
    test_accuracy: Optional[float]
    test_loss: Optional[float]
    test_bits_per_byte: Optional[float]
    checkpoint_dir: str
    ring_generation: int
    model: str
    submitted_unix_s: float
    skipped_steps: int
    owner: str

    @classmethod
    def from_pb(cls, s):
        return cls(
            job_id=s.job_id,
            name=s.name,
            state=_state_name(s.state),
            error=s.error,
            step=s.step,
            total_steps=s.total_steps,
            epoch=s.epoch,
            workers=s.workers,
            workers_wanted=s.workers_wanted,
            loss=_finite(s.loss),
            samples_per_s=s.samples_per_s,
            has_eval=s.has_eval,
            test_accuracy=_finite(s.test_accuracy) if s.has_eval else None,
            test_loss=s.test_loss if s.has_eval else None,
            test_bits_per_byte=s.test_bits_per_byte if s.test_bits_per_byte > 0 else None,
            checkpoint_dir=s.checkpoint_dir,
            ring_generation=s.ring_generation,
            model=s.model,
            submitted_unix_s=s.submitted_unix_s,
            skipped_steps=s.skipped_steps,
            owner=s.owner,
        )

    @property
    def done(self):
        """Succeeded, failed or cancelled: nothing will change it any more."""
        return self.state in TERMINAL_STATES

    def to_dict(self):
        return asdict(self)


@dataclass
class WorkerStatus:
    worker_id: str
    address: str
    job_id: str
    rank: Optional[int]  # None when idle
    last_step: int
    samples_per_s: float
    last_heartbeat_age_s: float
    alive: bool

    @classmethod
    def from_pb(cls, w):
        return cls(
            worker_id=w.worker_id,
            address=w.address,
            job_id=w.job_id,
            rank=w.rank if w.rank >= 0 else None,
            last_step=w.last_step,
            samples_per_s=w.samples_per_s,
            last_heartbeat_age_s=w.last_heartbeat_age_s,
            alive=w.alive,
        )


@dataclass
class JobEvent:
    """One event of WatchJob: `kind` is snapshot (the first), state, step,
    eval, checkpoint or workers; `status` the job after it."""

    kind: str
    message: str
    status: JobStatus = field(repr=False)


def _read_text(path, what):
    try:
        return Path(path).read_text()
    except OSError as e:
        raise RingtrainError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _read_token(tls_dir):
    try:
        token = (Path(tls_dir) / "token").read_text().strip()
    except OSError:
        return None
    return token or None


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


class Client:
    """A connection to a coordinator.

        client = Client("127.0.0.1:50051", tls_dir="tls/")
        job = client.submit({"model": "mlp", "workers": 2, "max_steps": 100,
                             "dataset": {"format": "idx", "path": "/usr/share/datasets/fashion-mnist"}})
        for event in client.watch(job):
            print(event.kind, event.status.step, event.status.loss)
        rows = client.metrics(job)          # pandas.DataFrame(rows)

    `addr` is HOST:PORT (a URL's scheme is ignored, as by the CLI; default
    $RINGTRAIN_COORDINATOR, else 127.0.0.1:50051). Mutual TLS with the files
    of `tls_dir` (default $RINGTRAIN_TLS_DIR: ca.pem, client.pem, client.key
    from `ringtrain certs init`) and the bearer token `token` (default
    $RINGTRAIN_TOKEN, else the TLS dir's `token` file); or, only when asked
    with `insecure=True` (or $RINGTRAIN_INSECURE), in the clear. `timeout`
    bounds each call but WatchJob, in seconds.
    """

    def __init__(self, addr=None, tls_dir=None, token=None, insecure=None, timeout=120.0):
        addr = addr or os.environ.get("RINGTRAIN_COORDINATOR") or DEFAULT_COORDINATOR
        self.addr = addr.split("://", 1)[-1].rstrip("/")
        if tls_dir is None:
            tls_dir = os.environ.get("RINGTRAIN_TLS_DIR") or None
        if insecure is None:
            insecure = _env_flag("RINGTRAIN_INSECURE")
        if token is None:
            token = os.environ.get("RINGTRAIN_TOKEN") or None
        if tls_dir and insecure:
            raise RingtrainError("pass either tls_dir or insecure=True, not both")
        if not tls_dir and not insecure:
            raise RingtrainError(NEITHER_GIVEN)
        self.timeout = timeout
        options = [
            # Metrics of a long job and big listings exceed gRPC's 4 MiB default.
            ("grpc.max_receive_message_length", 256 << 20),
        ]
        if tls_dir:
            self.tls_dir = Path(tls_dir)
            creds = grpc.ssl_channel_credentials(
                root_certificates=self._tls_file("ca.pem"),
                private_key=self._tls_file("client.key"),
                certificate_chain=self._tls_file("client.pem"),
            )
            options.append(("grpc.ssl_target_name_override", COORDINATOR_NAME))
            if token is None:
                token = _read_token(self.tls_dir)
            self._channel = grpc.secure_channel(self.addr, creds, options=options)
        else:
            self.tls_dir = None
            self._channel = grpc.insecure_channel(self.addr, options=options)
        self._metadata = ()
        if token is not None:
            token = token.strip()
            if not token.isascii() or not token.isprintable():
                raise RingtrainError("the token holds characters a gRPC header cannot carry")
            # Exactly what the CLI sends.
            self._metadata = (("authorization", f"Bearer {token}"),)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def _tls_file(self, name):
        path = self.tls_dir / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise RingtrainError(
                f"TLS dir {self.tls_dir} has no {name} (make one with `ringtrain certs init DIR`)"
            ) from None
        except OSError as e:
            raise RingtrainError(f"cannot read {path}: {e.strerror or e}") from None

    # -- plumbing ------------------------------------------------------------

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _error(self, e, doing=None):
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else None) or str(code.name).lower()
        details = " ".join(details.split())  # one line
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"cannot reach the coordinator at {self.addr}: {details}"
        elif doing:
            details = f"{doing}: {details}"
        return RingtrainError(details, code)

    def _call(self, method, request, doing=None):
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._error(e, doing) from None

    # -- the API ---------------------------------------------------------------

    def upload_model(self, model):
        """Streams a TorchScript model to the coordinator, which keeps it by
        content hash; returns what a spec names it by ("sha256:HEX").
        `model`: a file path, the file's bytes, or a torch module (exported
        with `ringtrain_client.export_module`)."""
        if isinstance(model, (bytes, bytearray, memoryview)):
            data, what = bytes(model), "model"
        elif isinstance(model, (str, os.PathLike)):
            try:
                data = Path(model).read_bytes()
            except OSError as e:
                raise RingtrainError(f"cannot read model file {model}: {e.strerror or e}") from None
            what = str(model)
        else:
            data, what = export_module(model), type(model).__name__

        def chunks():
            for i in range(0, max(len(data), 1), UPLOAD_CHUNK):
                yield pb.FileChunk(data=data[i : i + UPLOAD_CHUNK])

        reply = self._call(self._stub.UploadModel, chunks(), f"uploading {what}")
        return reply.model

    def prepare_spec(self, spec, model=None):
        """The spec as the coordinator takes it (a dict): read from TOML text
        or a .toml file, paths made absolute against this process's working
        directory (as the CLI does), `model` uploaded and named by hash."""
        if isinstance(spec, os.PathLike) or (
            isinstance(spec, str) and "\n" not in spec and spec.strip().endswith(".toml")
        ):
            spec = _read_text(spec, "job spec")
        if isinstance(spec, (str, bytes)):
            if isinstance(spec, bytes):
                spec = spec.decode()
            try:
                spec = _toml.loads(spec)
            except _toml.TOMLDecodeError as e:
                raise RingtrainError(f"job spec: not TOML: {e}") from None
        elif isinstance(spec, dict):
            spec = _toml.nest(spec)
        else:
            raise TypeError(f"spec: a dict, TOML text or a .toml path, not {type(spec).__name__}")

        def absolute(table, key):
            value = table.get(key) if isinstance(table, dict) else None
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if isinstance(value, str) and value:
                table[key] = os.path.abspath(value)

        absolute(spec, "init_from")
        absolute(spec.get("dataset"), "path")
        absolute(spec.get("dataset"), "test_path")
        absolute(spec.get("checkpoint"), "dir")

        if model is not None:
            if isinstance(model, str) and model.startswith("sha256:"):
                spec["model"] = model
            else:
                spec["model"] = self.upload_model(model)
        else:
            named = spec.get("model")
            if isinstance(named, os.PathLike):
                named = os.fspath(named)
            # A TorchScript file travels with the job: workers fetch it from
            # the coordinator, wherever they run.
            if isinstance(named, str) and named.endswith((".pt", ".pth")):
                spec["model"] = self.upload_model(named)
        return spec

    def submit(self, spec, model=None, resume_from=None):
        """Submits a job; returns its id.

        `spec`: a dict (nested tables, or dotted keys such as
        "optimizer.lr"), TOML text, or the path of a .toml file, as
        `ringtrain submit` takes (see the README's job spec). `model`: a
        TorchScript file path, its bytes, a torch.nn.Module (exported to
        TorchScript here), or "sha256:HEX" of an uploaded one; it replaces
        the spec's `model`. `resume_from`: a checkpoint directory."""
        spec = self.prepare_spec(spec, model)
        resume = ""
        if resume_from:
            if not (Path(resume_from) / "checkpoint.json").is_file():
                raise RingtrainError(
                    f"cannot resume: {resume_from} holds no checkpoint (checkpoint.json missing)"
                )
            resume = os.path.abspath(resume_from)
        try:
            text = _toml.dumps(spec)
        except (TypeError, ValueError) as e:
            raise RingtrainError(f"job spec: {e}") from None
        reply = self._call(
            self._stub.SubmitJob, pb.SubmitJobRequest(spec_toml=text, resume_from=resume)
        )
        return reply.job_id

    def submit_module(self, module, spec, example_inputs=None, resume_from=None):
        """Exports `module` (a torch.nn.Module) to TorchScript
        (torch.jit.script, else torch.jit.trace on `example_inputs`) and
        submits it as the job's model; returns the job id."""
        return self.submit(
            spec, model=export_module(module, example_inputs), resume_from=resume_from
        )

    def job(self, job):
        """The job's status now."""
        return JobStatus.from_pb(self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job)))

    def _list(self):
        jobs, workers, token = [], [], ""
        while True:
            page = self._call(self._stub.ListJobs, pb.ListJobsRequest(page_token=token))
            jobs.extend(JobStatus.from_pb(j) for j in page.jobs)
            workers.extend(WorkerStatus.from_pb(w) for w in page.workers)
            # A token that does not move would loop for ever.
            if not page.next_page_token or page.next_page_token == token:
                return jobs, workers
            token = page.next_page_token

    def status(self, job=None):
        """Without `job`: every job (a list of JobStatus, in submission
        order, all pages); with it: that job's JobStatus."""
        if job is not None:
            return self.job(job)
        return self._list()[0]

    def workers(self) -> List[WorkerStatus]:
        """Every registered worker."""
        return self._list()[1]

    def watch(self, job) -> Iterator[JobEvent]:
        """The job's events, a snapshot first, until it ends (the stream
        closes after the final state). Stop early by breaking out: the
        stream is cancelled."""
        call = self._stub.WatchJob(pb.WatchJobRequest(job_id=job), metadata=self._metadata)
        try:
            for event in call:
                if event.HasField("status"):
                    yield JobEvent(event.kind, event.message, JobStatus.from_pb(event.status))
        except grpc.RpcError as e:
            raise self._error(e, f"watching job {job}") from None
        finally:
            call.cancel()

    def wait(self, job) -> JobStatus:
        """Watches the job to its end; returns its final status."""
        last = None
        for event in self.watch(job):
            last = event.status
        if last is None:
            raise RingtrainError(f"job {job}: the coordinator closed the stream without a status")
        return last

    def cancel(self, job) -> JobStatus:
        """Cancels a job; returns its status after."""
        reply = self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job))
        return JobStatus.from_pb(reply.job)

    def metrics(self, job) -> List[dict]:
        """The job's completed steps, one dict per step, in step order:
        step, epoch, loss, samples_per_s, workers, test_accuracy and
        test_loss (None where no evaluation followed the step).
        `pandas.DataFrame(client.metrics(job))` takes them as they are."""
        reply = self._call(self._stub.GetJobMetrics, pb.GetJobRequest(job_id=job))
        return [
            {
                "step": r.step,
                "epoch": r.epoch,
                "loss": r.loss,
                "samples_per_s": r.samples_per_s,
                "workers": r.workers,
                "test_accuracy": r.test_accuracy if r.has_eval else None,
                "test_loss": r.test_loss if r.has_eval else None,
            }
            for r in reply.rows
        ]
