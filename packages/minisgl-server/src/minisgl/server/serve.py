"""`minisgl serve`: launch the engine's processes, then serve the API with hypercorn until told to stop.

Stopping: SIGINT or SIGTERM stops hypercorn (open streams get a short grace period), then every child
is terminated; the exit status is 0. A child that dies on its own makes /health fail at once, stops the
server, and the exit status is 1.

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
from multiprocessing.connection import wait
from types import FrameType

from minisgl.server.args import ServerArgs, setup_logging
from minisgl.server.launch import EngineProcesses, LaunchError, launch_engine

logger = logging.getLogger("minisgl.server")

GRACEFUL_TIMEOUT_S = 3.0


def serve(args: ServerArgs) -> int:
    setup_logging(args.log_level)
    if args.node_rank > 0:
        return _run_other_node(args)
    problem = _port_problem(args.host, args.port)
    if problem is not None:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, problem)
        return 1
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # stop cleanly during start-up too
    try:
        engine = launch_engine(args)
    except LaunchError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.info("interrupted during start-up")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        return asyncio.run(_serve(args, engine))
    except KeyboardInterrupt:
        return 0
    finally:
        engine.shutdown()
        logger.info("stopped")


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
        running = list(engine.processes)
        while running:
            wait([p.sentinel for p in running])
            running = [p for p in running if p.is_alive()]
        failed = [p for p in engine.processes if p.exitcode != 0]
        for process in failed:
            logger.error("%s exited with code %s", process.name, process.exitcode)
        return 1 if failed else 0
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


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _port_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be bound now, found before spending a minute loading the model."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"unknown host ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return "the port is already in use" if exc.errno == errno.EADDRINUSE else str(exc)
    return None


async def _serve(args: ServerArgs, engine: EngineProcesses) -> int:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    from minisgl.server.api.app import ServerState, build_app
    from minisgl.server.engine_client import EngineClient

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
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
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    info = engine.scheduler_info
    state = ServerState(
        client,
        model_name=args.model_name,
        model_path=args.model,
        context_length=info.get("context_length"),
        api_key=args.api_key,
        log_requests=args.log_requests,
        max_request_bytes=args.max_request_bytes,
        longest_token=engine.tokenizer_info.get("longest_token"),
        sampling_defaults=engine.tokenizer_info.get("sampling_defaults") or {},
    )
    config = Config()
    config.bind = [_bind_address(args.host, args.port)]
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    url = f"http://{_bind_address(args.host, args.port)}"
    logger.info("serving %s at %s (OpenAI API under %s/v1)", args.model_name, url, url)
    try:
        await hypercorn_serve(build_app(state), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        for process in engine.processes:
            loop.remove_reader(process.sentinel)
        await client.stop()
    if exit_code == 0:
        logger.info("shutting down")
    return exit_code


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    from minisgl.server.args import parse_serve_args

    return serve(parse_serve_args(sys.argv[1:] if argv is None else argv))
