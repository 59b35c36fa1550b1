"""`minisgl serve`: launch the engine's processes, then serve the API with hypercorn until told to stop.

The port is bound (and listening) before the model loads, so a second server on the same port fails at
once instead of after loading. Stopping: SIGINT or SIGTERM makes new requests and /health answer 503 and
gives running requests --shutdown-timeout seconds to finish; then every open stream ends with an error
event and [DONE], hypercorn stops, every child is terminated, and the exit status is 0 (a second signal
skips the wait). A child that dies on its own makes /health fail at once, stops the server, and the exit
status is 1.

With --nnodes > 1, nodes other than 0 serve no HTTP: they run their scheduler ranks until node 0 stops
them (exit status 0) or until one of them fails (exit status 1).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING

from minisgl.server.args import ServerArgs, setup_logging
from minisgl.server.launch import EngineProcesses, LaunchError, launch_engine

if TYPE_CHECKING:
    from minisgl.server.api.app import ServerState
    from minisgl.server.engine_client import EngineClient

logger = logging.getLogger("minisgl.server")

GRACEFUL_TIMEOUT_S = 3.0  # for responses to flush once every request has ended
SHUTDOWN_POLL_S = 0.05
LISTEN_BACKLOG = 2048


def serve(args: ServerArgs) -> int:
    setup_logging(args.log_level)
    if args.node_rank > 0:
        return _run_other_node(args)
    try:
        listener = _listen(args.host, args.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s (--host, --port)", args.host, args.port, _why_not(exc))
        return 1
    engine = _start_engine(args, listener)
    if not isinstance(engine, EngineProcesses):
        return engine
    try:
        return asyncio.run(_serve(args, engine, listener))
    except KeyboardInterrupt:
        return 0
    finally:
        engine.shutdown()
        logger.info("stopped")


def _why_not(exc: OSError) -> str:
    return "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)


def _start_engine(args: ServerArgs, listener: socket.socket) -> EngineProcesses | int:
    """The engine, once every process is ready; or, when start-up fails or is interrupted, the exit
    status (the listener is closed then)."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # stop cleanly during start-up too
    try:
        return launch_engine(args)
    except LaunchError as exc:
        logger.error("%s", exc)
        listener.close()
        return 1
    except KeyboardInterrupt:
        logger.info("interrupted during start-up")
        listener.close()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_other_node(args: ServerArgs) -> int:
    """A node > 0: start its scheduler ranks and wait until they end."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    engine: EngineProcesses | None = None
    try:
        engine = launch_engine(args)
        logger.info(
            "node %d: TP ranks %d..%d ready; node 0 serves the API",
            args.node_rank,
            args.local_ranks[0],
            args.local_ranks[-1],
        )
        return _wait_for_ranks(engine)
    except LaunchError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if engine is not None:
            engine.shutdown()
        logger.info("node %d stopped", args.node_rank)


def _wait_for_ranks(engine: EngineProcesses) -> int:
    """Wait until every process of this node ended: 0 when all exited cleanly, else 1."""
    running = list(engine.processes)
    while running:
        wait([p.sentinel for p in running])
        running = [p for p in running if p.is_alive()]
    return _exit_status(engine.processes)


def _exit_status(processes: list[BaseProcess]) -> int:
    failed = [p for p in processes if p.exitcode != 0]
    for process in failed:
        logger.error("%s exited with code %s", process.name, process.exitcode)
    return 1 if failed else 0


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, made before spending a minute loading the model: a port in use
    fails now, and no other server can take the port while this one loads (connections made meanwhile
    wait in the backlog). Hypercorn serves on it later."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


async def _serve(args: ServerArgs, engine: EngineProcesses, listener: socket.socket) -> int:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    from minisgl.server.api.app import ServerState, build_app
    from minisgl.server.engine_client import EngineClient

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # a signal or a dead child: stop taking requests
    hurry = asyncio.Event()  # a second signal: do not wait for running requests
    stopped = asyncio.Event()  # every request has ended: hypercorn may stop
    exit_code = 0
    client = EngineClient(engine.addresses)
    client.start()

    def child_died(name: str) -> None:
        nonlocal exit_code
        process = next(p for p in engine.processes if p.name == name)
        loop.remove_reader(process.sentinel)  # the sentinel stays readable: watch it once
        if stop.is_set():
            return
        process.join(0.1)
        reason = f"{name} died (exit code {process.exitcode})"
        logger.error("%s; stopping the server", reason)
        client.fail_all(f"the engine is unavailable: {reason}")
        exit_code = 1
        stop.set()

    for process in engine.processes:
        loop.add_reader(process.sentinel, child_died, process.name)

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)

    info = engine.scheduler_info
    state = ServerState(
        client,
        model_name=args.model_name,
        model_path=args.model,
        context_length=info.get("context_length"),
        api_key=args.api_key,
        log_requests=args.log_requests,
        tool_call_parser=None if args.tool_call_parser == "none" else args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        max_request_bytes=args.max_request_bytes,
        longest_token=engine.tokenizer_info.get("longest_token"),
        sampling_defaults=engine.tokenizer_info.get("sampling_defaults") or {},
    )
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns the socket from here on
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    url = f"http://{_bind_address(args.host, args.port)}"
    logger.info("serving %s at %s (OpenAI API under %s/v1)", args.model_name, url, url)
    draining = loop.create_task(
        _drain(state, stop, hurry, stopped, args.shutdown_timeout, lambda: exit_code == 0)
    )
    try:
        await hypercorn_serve(build_app(state), config, shutdown_trigger=stopped.wait)  # type: ignore[arg-type]
    finally:
        draining.cancel()
        for process in engine.processes:
            loop.remove_reader(process.sentinel)
        await client.stop()
    if exit_code == 0:
        logger.info("shutting down")
    return exit_code


async def _drain(
    state: ServerState,
    stop: asyncio.Event,
    hurry: asyncio.Event,
    stopped: asyncio.Event,
    timeout: float,
    engine_alive: Callable[[], bool],
) -> None:
    """Once told to stop: refuse new requests, give running ones `timeout` seconds (unless hurried),
    then end the rest with an error (streams get an error event and [DONE]) and let hypercorn stop."""
    await stop.wait()
    try:
        await _end_requests(state, hurry, timeout, engine_alive())
    finally:
        stopped.set()  # whatever happened above, the server stops


async def _end_requests(state: ServerState, hurry: asyncio.Event, timeout: float, engine_alive: bool) -> None:
    from minisgl.server.api.app import SHUTTING_DOWN

    state.draining = True
    client = state.client
    if engine_alive and client.num_open:
        logger.info(
            "stopping: %d request(s) running; they get up to %g s to finish (--shutdown-timeout)",
            client.num_open,
            timeout,
        )
        await _wait_for_requests(client, hurry, timeout)
        if client.num_open:
            logger.warning("stopping: ending %d unfinished request(s)", client.num_open)
            client.fail_all(SHUTTING_DOWN)


async def _wait_for_requests(client: EngineClient, hurry: asyncio.Event, timeout: float) -> None:
    """Until the open requests finish, the timeout passes, or a second signal hurries the stop."""
    deadline = time.monotonic() + timeout
    while client.num_open and time.monotonic() < deadline and not hurry.is_set():
        await asyncio.sleep(SHUTDOWN_POLL_S)


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    from minisgl.server.args import parse_serve_args

    return serve(parse_serve_args(sys.argv[1:] if argv is None else argv))
