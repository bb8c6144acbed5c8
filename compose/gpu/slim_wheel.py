"""Rewrites a wheel without the members matching any --drop regex (and their RECORD lines).

    python3 compose/gpu/slim_wheel.py .whl/libucx_cu13-*.whl --drop '\\.a$' --drop '/bin/'

Used by prepare_wheels.sh to fit libucx into the device machine's per-call size limit. The wheel
is replaced in place; pip installs it like the original (RECORD lists what remains).
"""

from __future__ import annotations

import argparse
import os
import re
import zipfile


def slim(path: str, patterns: list[str]) -> tuple[int, int]:
    """Returns (bytes before, bytes after)."""
    drop = [re.compile(p) for p in patterns]
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        kept = [i for i in src.infolist() if not any(p.search(i.filename) for p in drop)]
        names = {i.filename for i in kept}
        for info in kept:
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if line.split(",", 1)[0] in names
                                  or line.split(",", 1)[0].endswith("RECORD")) + "\n").encode()
            dst.writestr(info, data)
    before = os.path.getsize(path)
    os.replace(tmp, path)
    return before, os.path.getsize(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wheel")
    p.add_argument("--drop", action="append", default=[], help="regex of member names to leave out")
    args = p.parse_args()
    before, after = slim(args.wheel, args.drop)
    print(f"{os.path.basename(args.wheel)}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
