"""The CPU kernels' build lock: a builder killed mid-build must not make later starts wait
forever (torch's own lock is a plain file it leaves behind)."""

from __future__ import annotations

import os
import subprocess
import sys

from pdserve.kernels.cpu import _build_lock


def test_a_stale_torch_lock_goes_and_a_dead_holder_releases(tmp_path):
    folder = str(tmp_path)
    (tmp_path / "lock").write_text("")  # what a killed torch build leaves
    with _build_lock(folder):
        assert not (tmp_path / "lock").exists()
    # a process that dies holding the lock (SIGKILL, no cleanup) does not keep it
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pdserve.kernels.cpu import _build_lock\n"
        f"with _build_lock({folder!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    probe = subprocess.run([sys.executable, "-c", (
        f"from pdserve.kernels.cpu import _build_lock\nwith _build_lock({folder!r}):\n    print('got it')")],
        capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "got it", probe.stderr
    assert os.path.exists(os.path.join(folder, "pdserve.flock"))
