"""Running the rig's preparation steps: logs, progress and one-line failures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import RigError

#: Seconds of silence after which a running step prints a heartbeat line.
HEARTBEAT_S = 10.0


def say(msg: str) -> None:
    """Print a progress line of the harness (stderr, so CMD's stdout stays clean)."""
    print(f"[rig] {msg}", file=sys.stderr, flush=True)


def run_step(
    step: str,
    argv: list[str],
    log: Path,
    *,
    show: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run one command of a step, its whole output appended to ``log``.

    Lines matching the regex ``show`` are echoed as progress; when nothing was
    echoed for HEARTBEAT_S seconds a heartbeat with the elapsed time and the
    latest output line is printed, so a long build never looks hung. A non-zero
    exit raises RigError naming the step and the log.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    pat = re.compile(show) if show else None
    start = time.monotonic()
    last = {"line": "", "said": start}
    lock = threading.Lock()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except OSError as e:
            raise RigError(step, f"cannot run {argv[0]}: {e.strerror}", log) from e
        done = threading.Event()

        def beat() -> None:
            while not done.wait(1.0):
                now = time.monotonic()
                with lock:
                    if now - last["said"] >= HEARTBEAT_S:
                        tail = last["line"][:100]
                        say(f"  ... {step}: {now - start:.0f}s {tail}")
                        last["said"] = now

        t = threading.Thread(target=beat, daemon=True)
        t.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            line = line.strip()
            with lock:
                if line:
                    last["line"] = line
                if pat and pat.search(line):
                    say(f"  {line}")
                    last["said"] = time.monotonic()
        rc = proc.wait()
        done.set()
        t.join()
    if rc != 0:
        why = last["line"][:160] or f"exit status {rc}"
        raise RigError(step, f"{argv[0]} exited {rc}: {why}", log)


def apt_env() -> dict[str, str]:
    """Environment for non-interactive apt-get runs."""
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}


def missing_debs(names: tuple[str, ...] | list[str]) -> list[str]:
    """Those of the named Debian packages that are not installed on the host."""
    if not shutil.which("dpkg-query"):
        raise RigError("host packages", "dpkg-query not found: the rig needs a Debian host")
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *names],
        capture_output=True,
        text=True,
    ).stdout
    ok = {ln.split()[0] for ln in out.splitlines() if ln.split()[1:2] == ["ii"]}
    return [n for n in names if n not in ok]


def ensure_host_debs(names: tuple[str, ...], log: Path) -> None:
    """apt-get install the missing ones of ``names`` (idempotent, no recommends)."""
    miss = missing_debs(names)
    if not miss:
        return
    step = "host packages"
    if os.geteuid() != 0:
        raise RigError(step, f"missing {' '.join(miss)}; install them (root needed)")
    say(f"installing host packages: {' '.join(miss)}")
    env = apt_env()
    run_step(step, ["apt-get", "update", "-q"], log, env=env)
    run_step(
        step,
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *miss],
        log,
        env=env,
        show=r"^(Unpacking|Setting up) ",
    )


def mirror_uri() -> str:
    """The Debian mirror the host's apt uses (its deb822 or one-line sources)."""
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for m in re.finditer(r"^URIs:\s*(\S+)", src.read_text(), re.M):
            if not m.group(1).rstrip("/").endswith("-security"):
                return m.group(1).rstrip("/")
    lst = Path("/etc/apt/sources.list")
    if lst.exists():
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", lst.read_text(), re.M):
            if "security" not in m.group(1):
                return m.group(1).rstrip("/")
    return "http://deb.debian.org/debian"


def download_backports(pkgs: list[str], dest: Path, state: Path, log: Path) -> None:
    """Download exact ``name=version`` packages from bookworm-backports into dest.

    Uses a private apt state under ``state`` so the host's apt set-up is
    untouched (no sources added, nothing installed).
    """
    step = "download kernel packages"
    for d in ("lists/partial", "cache/archives/partial"):
        (state / d).mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    src = state / "sources.list"
    src.write_text(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        f"{mirror_uri()} bookworm-backports main\n"
    )
    opts = [
        f"-oDir::Etc::sourcelist={src}",
        "-oDir::Etc::sourceparts=-",
        f"-oDir::State::Lists={state / 'lists'}",
        f"-oDir::Cache={state / 'cache'}",
        "-oDir::State::status=/dev/null",
        "-oAPT::Sandbox::User=root",
    ]
    env = apt_env()
    say("apt-get update (bookworm-backports, private state)")
    run_step(step, ["apt-get", *opts, "update", "-q"], log, env=env)
    for p in pkgs:  # one at a time, so a missing version is named exactly
        name, ver = p.split("=", 1)
        q = subprocess.run(
            ["apt-cache", *opts, "madison", name], capture_output=True, text=True, env=env
        ).stdout
        if f"| {ver} |" not in q:
            raise RigError(
                step,
                f"{p} is not on the mirror (bookworm-backports); "
                "set PYVMM_RIG_KERNEL_DEB_VERSION/_ABI to one it has",
                log,
            )
    say(f"downloading {len(pkgs)} packages (~280 MB)")
    run_step(step, ["apt-get", *opts, "download", *pkgs], log, cwd=dest, env=env, show=r"^Get:")
