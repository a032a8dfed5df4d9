"""The preemption handler: one request per event, a second signal exits at once."""

from __future__ import annotations

import signal
import subprocess
import sys

from imgtrain.fault import PreemptionHandler

from conftest import subprocess_env

# A killed `imgtrain launch` agent's death signal reaches its worker once per agent thread (microseconds
# apart): one request. The same signal again later is the user insisting.
PROCESS = f"""
import os, signal, time
from imgtrain.fault import PreemptionHandler

handler = PreemptionHandler().install()
for _ in range(3):
    os.kill(os.getpid(), signal.SIGINT)
print("stopping" if handler.requested else "not requested", flush=True)
time.sleep({PreemptionHandler.REPEAT_WINDOW} + 0.5)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(30)
print("still running", flush=True)
"""


def test_a_burst_of_one_signal_is_one_request_and_a_later_one_exits_at_once():
    proc = subprocess.run(
        [sys.executable, "-c", PROCESS], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert proc.stdout.split() == ["stopping"], proc.stderr[-2000:]
    assert proc.returncode == 128 + signal.SIGINT
    assert proc.stderr.count("received SIGINT; stopping after this step") == 1
    assert "SIGINT again while stopping; exiting at once, without a final checkpoint" in proc.stderr
