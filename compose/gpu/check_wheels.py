"""Checks that a wheel set plus the GPU machine's image covers every requirement of the set.

    python3 compose/gpu/check_wheels.py [.whl] [--python-version 3.12]

Reads each wheel's METADATA Requires-Dist (extras skipped, markers evaluated for Linux x86-64
and the given Python) and prints every requirement that no wheel of the set and no package of
the image (IMAGE, from .library's list of the 'cuda' image) provides; exits 1 if any. Versions
of image packages are not known here, so they are assumed to fit (a version clash shows on the
machine, at import).
"""

from __future__ import annotations

import argparse
import email.parser
import glob
import os
import re
import sys
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x filelock
fsspec grpcio h11 h5py hf-xet httpcore httpx huggingface-hub idna jinja2 markupsafe mpmath msgpack multidict
networkx ninja numpy nvidia-ml-py nvidia-nccl-cu13 packaging pillow pip prometheus-client propcache protobuf
psutil pyyaml regex requests safetensors sentencepiece setuptools six sympy tokenizers torch tqdm transformers
triton typing-extensions urllib3 uvloop wheel yarl zipp""".split())


def wheel_requirements(path: str) -> tuple[str, list[Requirement]]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
        message = email.parser.Parser().parsestr(z.read(meta).decode())
    return canonicalize_name(message["Name"]), [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def missing(folder: str, python_version: str) -> list[str]:
    env = {**default_environment(), "python_version": python_version, "python_full_version": python_version + ".0",
           "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    provided = dict(wheel_requirements(p) for p in sorted(glob.glob(os.path.join(folder, "*.whl"))))
    gaps = []
    for name, reqs in provided.items():
        for req in reqs:
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another platform / Python
            need = canonicalize_name(req.name)
            if need not in provided and need not in IMAGE:
                gaps.append(f"{name} needs {req}")
    return gaps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", default=".whl")
    p.add_argument("--python-version", default="3.12")
    args = p.parse_args()
    wheels = glob.glob(os.path.join(args.folder, "*.whl"))
    gaps = missing(args.folder, args.python_version)
    for gap in gaps:
        print("missing:", gap)
    print(f"{len(wheels)} wheels in {args.folder}: " + ("complete with the image" if not gaps else f"{len(gaps)} gaps"))
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
