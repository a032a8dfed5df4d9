"""What torchrun would launch for its parsed arguments, without launching it (``imgtrain launch``).

``torch.distributed.run.run(args)`` first rewrites ``--standalone`` and a one-node static rendezvous with
no endpoint into a local c10d rendezvous (and defaults ``--master-port``), then calls the public
``config_from_args`` and launches at once. torch has no function for that first part, so it is repeated
here, and only here; the canary runs torch's ``run()`` on the same command lines and compares.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from torch.distributed.launcher.api import LaunchConfig
from torch.distributed.run import config_from_args, parse_min_max_nnodes

PRIVATE_SYMBOL = (
    "torch.distributed.run.run (how it rewrites --standalone, a one-node static rendezvous and "
    "--master-port before config_from_args)"
)


def rewrite_as_run_does(args) -> None:
    """Change torchrun's parsed ``args`` in place as ``run()`` does before it builds the launch config."""
    if args.standalone:
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    elif args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None:
        if parse_min_max_nnodes(args.nnodes)[1] == 1:
            args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500


def launch_config(args) -> tuple[LaunchConfig, Callable | str, list[str]]:
    """(config, command, command arguments) that ``torch.distributed.run.run(args)`` would launch."""
    rewrite_as_run_does(args)
    return config_from_args(args)
