"""Build of ringtrain-client: the gRPC stubs are generated here, at build time,
from the repository's proto/ringtrain.proto (never committed).

`pip install ./clients/python` builds in this directory, so the proto is
found two levels up. An sdist carries a copy of it (made by `sdist` below),
so a wheel built from the sdist is generated from the same file.
"""
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PACKAGE = "ringtrain_client"
PROTO = "ringtrain.proto"
# In the repository, then inside an sdist.
PROTO_CANDIDATES = [HERE.parent.parent / "proto" / PROTO, HERE / "proto" / PROTO]


def find_proto():
    for path in PROTO_CANDIDATES:
        if path.is_file():
            return path
    raise SystemExit(
        f"ringtrain-client: {PROTO} not found (looked for "
        + ", ".join(str(p) for p in PROTO_CANDIDATES)
        + "): build from a ringtrain checkout, e.g. `pip install ./clients/python`"
    )


def generate_stubs(out_dir):
    """Writes ringtrain_pb2.py, ringtrain_pb2_grpc.py (and .pyi) into
    out_dir/ringtrain_client, importing each other inside the package."""
    import grpc_tools
    from grpc_tools import protoc

    proto = find_proto()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        # The proto's path under the include root becomes the import path of
        # the generated modules: ringtrain_client/ringtrain.proto gives
        # `from ringtrain_client import ringtrain_pb2`.
        (Path(tmp) / PACKAGE).mkdir()
        staged = Path(tmp) / PACKAGE / PROTO
        shutil.copyfile(proto, staged)
        Path(out_dir, PACKAGE).mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{tmp}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(staged),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"ringtrain-client: protoc failed on {proto}")


class BuildPyWithStubs(build_py):
    def run(self):
        super().run()
        # An editable install imports from the source tree: generate there
        # (ignored by git); a wheel gets them in its build dir.
        generate_stubs(HERE if getattr(self, "editable_mode", False) else self.build_lib)


class SdistWithProto(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "proto" / PROTO
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(find_proto(), target)


def requirements():
    """The generated stubs check at import that grpcio and protobuf are at
    least the versions that generated them: require exactly that."""
    from importlib.metadata import version

    reqs = []
    for dist, floor in (("grpcio-tools", "grpcio"), ("protobuf", "protobuf")):
        try:
            reqs.append(f"{floor}>={version(dist)}")
        except Exception:  # metadata only, without the build requirements
            reqs.append(floor)
    return reqs + ["tomli>=1.1; python_version < '3.11'"]


setup(
    install_requires=requirements(),
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto},
)
