"""Checks that need no cluster: the generated stubs match the repository's
proto, specs round-trip through TOML, and what a user gets wrong locally is
a RingtrainError naming the cause."""
import math
import subprocess
import sys

import pytest

from conftest import ROOT
from ringtrain_client import Client, RingtrainError
from ringtrain_client import _toml


def test_stubs_match_the_repository_proto(tmp_path):
    """The installed stubs were generated from proto/ringtrain.proto as it is
    now (a stale install would speak an older API)."""
    from google.protobuf import descriptor_pb2

    from ringtrain_client import ringtrain_pb2

    out = tmp_path / "set.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
         f"--descriptor_set_out={out}", "ringtrain.proto"],
        check=True,
    )
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    # protoc writes json_name into a descriptor set, generated code leaves it out.
    def clear_json_names(messages):
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            clear_json_names(m.nested_type)

    clear_json_names(fresh.message_type)
    installed = descriptor_pb2.FileDescriptorProto()
    ringtrain_pb2.DESCRIPTOR.CopyToProto(installed)
    # Only the file's name differs: the stubs live in the package.
    assert installed.name == "ringtrain_client/ringtrain.proto"
    installed.name = fresh.name
    assert installed == fresh, "reinstall: pip install ./clients/python"


def test_spec_dict_round_trips_through_toml():
    spec = {
        "name": 'a "quoted" näme',
        "model": "mlp",
        "workers": 2,
        "keep_global_batch": False,
        "optimizer.lr": 1e-08,  # dotted keys become tables, as --set does
        "optimizer": {"kind": "adamw", "betas": [0.9, 0.999]},
        "dataset": {"format": "idx", "path": "/data", "classes": [0, 1]},
        "model_config": {},
        "clip": float("inf"),
    }
    text = _toml.dumps(_toml.nest(spec))
    back = _toml.loads(text)
    assert back["optimizer"] == {"kind": "adamw", "betas": [0.9, 0.999], "lr": 1e-08}
    assert back["name"] == 'a "quoted" näme'
    assert back["dataset"]["classes"] == [0, 1]
    assert back["keep_global_batch"] is False
    assert back["model_config"] == {}
    assert math.isinf(back["clip"])
    # Plain keys come before every table, or they would land in the last one.
    assert text.index("workers") < text.index("[optimizer]")


def test_cannot_write_what_toml_lacks():
    with pytest.raises(TypeError, match="dataset.path"):
        _toml.dumps({"dataset": {"path": object()}})


def test_neither_tls_dir_nor_insecure():
    with pytest.raises(RingtrainError, match="RINGTRAIN_TLS_DIR") as e:
        Client("127.0.0.1:1")
    assert e.value.code is None


def test_tls_dir_without_certificates(tmp_path):
    with pytest.raises(RingtrainError, match="no ca.pem"):
        Client("127.0.0.1:1", tls_dir=tmp_path)


def test_missing_spec_and_model_files(tmp_path):
    client = Client("127.0.0.1:1", insecure=True)
    with pytest.raises(RingtrainError, match="cannot read job spec .*nope.toml"):
        client.submit(str(tmp_path / "nope.toml"))
    with pytest.raises(RingtrainError, match="cannot read model file .*net.pt"):
        client.submit({"model": str(tmp_path / "net.pt")})
    with pytest.raises(RingtrainError, match="not TOML"):
        client.submit("name = \n")
    with pytest.raises(RingtrainError, match="holds no checkpoint"):
        client.submit({"model": "mlp"}, resume_from=tmp_path)


def test_unreachable_coordinator():
    client = Client("127.0.0.1:1", insecure=True, timeout=5)
    with pytest.raises(RingtrainError, match="cannot reach the coordinator at 127.0.0.1:1") as e:
        client.status()
    assert e.value.code_name == "UNAVAILABLE"
