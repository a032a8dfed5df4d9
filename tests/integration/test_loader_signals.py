"""The trainer's DataLoader workers and stop signals: a SIGTERM/SIGINT sent to the whole job by torchrun's
os.killpg, Slurm or Ctrl-C must not kill them before their training process has saved, nor keep that process
from exiting afterwards."""

from __future__ import annotations

import subprocess
import sys

import psutil

from conftest import subprocess_env

# A training process in miniature: its loader's worker gets SIGTERM and SIGINT from another process (as
# torchrun, Slurm or a terminal sends them), the loader must still deliver every batch, and the process
# exits with the persistent worker still running (multiprocessing then terminates and joins it).
PROCESS = """
import signal, subprocess, psutil, torch
from imgtrain.data.loader import WorkerLoader

loader = WorkerLoader(list(range(40)), batch_size=2, num_workers=1, persistent_workers=True)
it = iter(loader)
first = next(it)
assert not {signal.SIGTERM, signal.SIGINT} & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the trainer's
(worker,) = psutil.Process().children()
print(worker.pid, flush=True)
for sig in ("TERM", "INT"):
    subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
rest = list(it)
assert torch.cat([first, *rest]).tolist() == list(range(40))
print("all batches", flush=True)
"""


def test_loader_workers_drop_a_job_wide_sigterm_and_exit_with_their_process():
    proc = subprocess.run(
        [sys.executable, "-c", PROCESS], capture_output=True, text=True, timeout=180, env=subprocess_env()
    )
    # Without the fix: "DataLoader worker (pid N) is killed by signal: Terminated."
    assert proc.returncode == 0, proc.stderr[-3000:]
    pid, said = proc.stdout.split()[0], proc.stdout.split("\n", 1)[1]
    assert said.strip() == "all batches"
    assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
