"""Compile the project's own .proto files into extproc/_proto (Makefile and Dockerfile use this).

protoc writes imports rooted at the proto directory (`from extproc.admin.v1 import ...`); they
are re-rooted under `extproc._proto` so the generated code lives inside the package.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "proto"
OUT = ROOT / "extproc" / "_proto"


def main() -> int:
    protos = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.proto"))
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    args = ["protoc", f"-I{SRC}", f"--python_out={OUT}", f"--grpc_python_out={OUT}",
            f"--pyi_out={OUT}", *protos]  # fmt: skip
    if protoc.main(args) != 0:
        return 1
    for path in OUT.rglob("*.py*"):
        text = path.read_text()
        path.write_text(re.sub(r"^from extproc\.", "from extproc._proto.extproc.", text, flags=re.M))
    for directory in [OUT, *(d for d in OUT.rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
