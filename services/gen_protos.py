"""Generate the gRPC Python code from protos/ into services/gen/.

protoc emits absolute imports (`from retrieval.v1 import x_pb2`); they are
rewritten to `services.gen.retrieval.v1` so the generated code is an ordinary
subpackage and needs no sys.path tricks. Type stubs come beside the code: `.pyi`
for the messages always, and for the service stubs and servicers too when
mypy-protobuf's plugin is installed (the `[dev]` extra; the type checker needs them).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "services" / "gen"
_IMPORT = re.compile(r"^from retrieval\.v1 import", re.MULTILINE)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={OUT}", f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}"]
    plugin = shutil.which("protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent)) or \
        shutil.which("protoc-gen-mypy_grpc")
    if plugin:
        # quiet: the plugin otherwise prints a line per file it writes.
        args += [f"--plugin=protoc-gen-mypy_grpc={plugin}", f"--mypy_grpc_out={OUT}", "--mypy_grpc_opt=quiet"]
    args += protos
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in OUT.rglob("*.py*"):
        path.write_text(_IMPORT.sub("from services.gen.retrieval.v1 import", path.read_text()))
    for package in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        (package / "__init__.py").touch()
    print(f"generated {len(protos)} protos into {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
