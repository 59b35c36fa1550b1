"""Start the engine's processes, wait until each one is ready, and stop them all.

    launcher (API server or shell) --> tokenizer/detokenizer worker --> scheduler rank 0
                                                                          | lockstep (gloo)
                                                                        scheduler ranks 1 .. tp-1

Children are started with `spawn` (no forked torch or CUDA state) and report over a pipe: ("ready", what
they loaded) or ("error", why not). Start-up fails as soon as one child fails or dies. With --nnodes > 1
each node starts the scheduler ranks it hosts; only node 0 starts the tokenizer (and serves HTTP).
shutdown() stops rank 0 first (which releases the other ranks, on every node), then SIGTERMs the
remaining children, waits, SIGKILLs what is left, and removes the socket directory.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from minisgl.server.args import ServerArgs
from minisgl.server.ipc import IpcAddresses

logger = logging.getLogger("minisgl.server.launch")

PROGRESS_INTERVAL_S = 10.0  # a "still loading" line this often while children start


class LaunchError(RuntimeError):
    """The engine did not start; the message says which process failed and why."""


@dataclass
class EngineProcesses:
    addresses: IpcAddresses
    directory: Path
    processes: list[BaseProcess] = field(default_factory=list)
    # What each child reported when it was ready, by process name.
    loaded: dict[str, Any] = field(default_factory=dict)

    @property
    def scheduler_info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.loaded.get("minisgl-scheduler-0", {})
        return info

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        """What the first tokenizer worker reported (every worker loads the same tokenizer)."""
        info: dict[str, Any] = next((v for k, v in self.loaded.items() if k.startswith("minisgl-tok")), {})
        return info

    def dead_child(self) -> BaseProcess | None:
        for process in self.processes:
            if not process.is_alive():
                return process
        return None

    def shutdown(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        self._stop_leader(timeout)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            _join_or_kill(process, deadline, timeout)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _stop_leader(self, timeout: float) -> None:
        """Rank 0 first: it finishes its step and tells the other ranks to stop before it exits."""
        leader = next((p for p in self.processes if p.name == "minisgl-scheduler-0"), None)
        if leader is not None and leader.is_alive():
            leader.terminate()
            leader.join(timeout)


def _join_or_kill(process: BaseProcess, deadline: float, timeout: float) -> None:
    process.join(max(0.0, deadline - time.monotonic()))
    if process.is_alive():
        logger.warning("%s did not stop in %.0f s; killing it", process.name, timeout)
        process.kill()
        process.join(2.0)


def launch_engine(args: ServerArgs) -> EngineProcesses:
    """Start this node's scheduler ranks (and on node 0 the tokenizer worker); return once all are ready."""
    args = _with_dist_address(args)
    context = mp.get_context("spawn")
    directory = Path(tempfile.mkdtemp(prefix="minisgl-"))
    engine = EngineProcesses(IpcAddresses.in_directory(directory, args.tokenizer_workers), directory)
    pipes: dict[str, Connection] = {}
    try:
        for name, target, number in _children(args):
            receive, send = context.Pipe(duplex=False)
            child_args = (args, engine.addresses, number, send)
            engine.processes.append(context.Process(target=target, args=child_args, name=name, daemon=True))
            pipes[name] = receive
        logger.info(
            "loading %s: TP ranks %d..%d of %d on this node%s",
            args.model,
            args.local_ranks[0],
            args.local_ranks[-1],
            args.engine.tp_size,
            f", and {args.tokenizer_workers} tokenizer process(es)" if args.node_rank == 0 else "",
        )
        for process in engine.processes:
            process.start()
        _wait_until_ready(engine, pipes, args.startup_timeout)
    except BaseException:
        engine.shutdown()
        raise
    return engine


def _with_dist_address(args: ServerArgs) -> ServerArgs:
    """The args, checked; a single-node TP run gets a free local port for the ranks to meet on."""
    problem = args.combination_problem()
    if problem is not None:
        raise LaunchError(f"{problem[0]} {problem[1]}")
    if args.engine.tp_size > 1 and args.dist_init_addr is None:
        return args.replace(dist_init_addr=f"127.0.0.1:{_free_port()}")
    return args


def _children(args: ServerArgs) -> list[tuple[str, Callable[..., None], int]]:
    """This node's processes: (name, entry point, TP rank or tokenizer worker number)."""
    from minisgl.server.scheduler_worker import run_scheduler
    from minisgl.server.tokenizer_worker import run_tokenizer

    children: list[tuple[str, Callable[..., None], int]] = [
        (f"minisgl-scheduler-{rank}", run_scheduler, rank) for rank in args.local_ranks
    ]
    if args.node_rank == 0:
        count = args.tokenizer_workers
        names = ["minisgl-tokenizer"] if count == 1 else [f"minisgl-tokenizer-{w}" for w in range(count)]
        children += [(name, run_tokenizer, worker) for worker, name in enumerate(names)]
    return children


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_ready(engine: EngineProcesses, pipes: dict[str, Connection], timeout: float) -> None:
    _StartupWait(engine, pipes, timeout).run()


class _StartupWait:
    """Waits for every process's ready message. A process that reports a failure, exits, or is not ready
    within the timeout is a LaunchError; every PROGRESS_INTERVAL_S a line says who is still loading."""

    def __init__(self, engine: EngineProcesses, pipes: dict[str, Connection], timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout
        self.started = time.monotonic()
        self.next_progress = self.started + PROGRESS_INTERVAL_S
        self.by_name = {p.name: p for p in engine.processes}
        self.waiting = dict(pipes)  # process name -> its pipe, until it is ready

    def run(self) -> None:
        while self.waiting:
            self._log_progress()
            remaining = self._remaining()
            sentinels = {self.by_name[name].sentinel: name for name in self.waiting}
            self._take(wait([*self.waiting.values(), *sentinels], timeout=min(remaining, 1.0)), sentinels)

    def _take(self, ready: list[Any], sentinels: dict[int, str]) -> None:
        """What wait() returned: pipes with a message, and sentinels of processes that ended."""
        for item in ready:
            if isinstance(item, int):
                self._check_exit(sentinels[item])
            else:
                self._take_ready(next(n for n, conn in self.waiting.items() if conn is item))

    def _log_progress(self) -> None:
        if time.monotonic() >= self.next_progress:
            self.next_progress += PROGRESS_INTERVAL_S
            elapsed = time.monotonic() - self.started
            logger.info("still loading (%.0f s): waiting for %s", elapsed, ", ".join(self.waiting))

    def _remaining(self) -> float:
        remaining = self.timeout - (time.monotonic() - self.started)
        if remaining <= 0:
            raise LaunchError(
                f"the engine did not start within {self.timeout:g} s (waiting for {', '.join(self.waiting)})"
            )
        return remaining

    def _check_exit(self, name: str) -> None:
        """A process ended: fatal unless it was ready, or its ready message is still in its pipe."""
        if name in self.waiting and not self.waiting[name].poll():
            code = self.by_name[name].exitcode
            raise LaunchError(f"{name} exited during start-up (exit code {code})")

    def _take_ready(self, name: str) -> None:
        try:
            status, payload = self.waiting[name].recv()
        except EOFError:
            raise LaunchError(f"{name} exited during start-up") from None
        if status != "ready":
            raise LaunchError(f"{name} failed to start: {payload}")
        self.engine.loaded[name] = payload
        del self.waiting[name]
        logger.info("%s ready (%.1f s): %s", name, time.monotonic() - self.started, _describe(payload))


def _describe(payload: Any) -> str:
    if isinstance(payload, dict):
        return ", ".join(f"{k}={v}" for k, v in payload.items())
    return str(payload)
