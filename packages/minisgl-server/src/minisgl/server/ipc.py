"""Where the processes' ZMQ sockets live, and what every child process does first.

Each socket is an ipc:// path in a private temporary directory of the launching process, so two servers
on one machine never collide and no TCP port is used between processes. Who binds what:

    tokenizer worker i PULL  <- API server (requests, aborts) and scheduler (step outputs of its requests)
    scheduler rank 0   PULL  <- every tokenizer worker
    API server         PULL  <- every tokenizer worker (text outputs, errors, stats)

With --tokenizer-workers N each request belongs to one worker, chosen by the API server; the scheduler
sends each worker the tokens of its own requests.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq

logger = logging.getLogger("minisgl.server")


@dataclass(frozen=True)
class IpcAddresses:
    tokenizers: tuple[str, ...]  # one per tokenizer worker
    scheduler: str
    frontend: str

    @classmethod
    def in_directory(cls, directory: Path, num_tokenizers: int = 1) -> IpcAddresses:
        return cls(
            tokenizers=tuple(f"ipc://{directory / f'tokenizer-{i}'}" for i in range(num_tokenizers)),
            scheduler=f"ipc://{directory / 'scheduler'}",
            frontend=f"ipc://{directory / 'frontend'}",
        )


def push_socket(context: zmq.Context, address: str) -> zmq.Socket:
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    return socket


def pull_socket(context: zmq.Context, address: str) -> zmq.Socket:
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    return socket


_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def prepare_child(log_level: str, name: str) -> None:
    """First thing in every child: its name (as `top` and /proc/PID/comm show it), logging, no orphans.

    Ctrl-C in a terminal signals the whole process group; the launching process alone decides how the
    children stop (SIGTERM), so they ignore SIGINT. If the launcher dies without cleaning up (SIGKILL),
    Linux sends the child SIGTERM (PR_SET_PDEATHSIG); the workers' loops also watch their parent pid.
    """
    from minisgl.server.args import setup_logging

    setup_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM ends the process at once (the default action): a child holds nothing that needs saving.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            logger.debug("prctl(PR_SET_PDEATHSIG) is unavailable; relying on the parent-pid check")


def parent_is_gone(parent_pid: int) -> bool:
    return os.getppid() != parent_pid
