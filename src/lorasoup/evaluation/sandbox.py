"""Run untrusted, model-written Python programs: one jailed process each, a pool across cores.

PAL / program-of-thought tasks (GSM-Hard in the LoRA Soups paper, arXiv 2410.13025) score a model by
running the program it writes. ``run_program`` executes one program and returns a ``ProgramResult``
(verdict, the text of ``solution()``'s return value, capped stdout/stderr); ``run_programs`` runs many
on a thread pool, each in its own process, results in input order. The harness survives anything a
program does: the worst outcome is a verdict.

Layers (threat model and guarantees: docs/sandbox.md):

- a separate interpreter per program: ``python -I -S -B`` (no site-packages, no PYTHONPATH, no user
  site; lorasoup is not importable), a scrubbed environment (PATH and LANG only), a fresh temporary
  working directory removed afterwards, its own session / process group killed with SIGKILL at the
  wall-clock timeout and after every run;
- rlimits: CPU seconds, address space, file size, process count, open files, no core dumps;
- ``namespaces`` isolation where unprivileged user namespaces work (probed once per process): new
  user, mount, pid, network, IPC and UTS namespaces; a read-only chroot jail holding only the
  interpreter's libraries and a small writable tmpfs; no capabilities; host root mapped to nobody;
  every process of the program dies with the jail's pid 1. ``fallback`` elsewhere: the same
  interpreter flags, rlimits and process-group kill, and root dropped to nobody;
- both modes: ``no_new_privs`` and (x86_64) a seccomp filter refusing fork/exec, signals to other
  processes, sockets, ptrace, mounts and namespaces; then an audit hook (defence in depth) that also
  refuses ctypes and file writes outside the working directory;
- the return value travels on a private pipe, not stdout, in frames that carry a per-run nonce, so
  printing a fake marker changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from lorasoup.errors import ConfigError, LorasoupError

Verdict = Literal["ok", "error", "timeout", "memory", "output_limit", "killed"]
"""ok: ran to the end (``returned`` holds ``solution()``'s value if any); error: an exception, a syntax
error, ``sys.exit(n != 0)``, ``os._exit`` or a tampered result channel; timeout: wall clock or CPU
time; memory: MemoryError at the address-space limit; output_limit: stdout or stderr over the cap;
killed: ended by a signal (e.g. SIGSEGV from a C-stack overflow, or the program killing itself)."""

IsolationMode = Literal["namespaces", "fallback"]

_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
_GRACE_S = 0.5  # how long to drain pipes after the program's process exited
_POLL_S = 0.01  # exit polling interval where pidfd_open is unavailable
_DISABLED_LAYERS: frozenset[str] = frozenset()  # tests only: "audit-hook", "seccomp" (to test the rest)
_TMP_ROOT: str | None = None  # parent of the per-program working directories (None: system temp dir)


class SandboxError(LorasoupError):
    """The sandbox itself could not run (not the program's fault): interpreter missing, setup failed."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``cpu_s`` ends runaway computation, ``timeout_s`` everything else (sleeps)."""

    timeout_s: float = 5.0  # wall clock; kills the whole process group
    cpu_s: int = 5  # RLIMIT_CPU (SIGXCPU, SIGKILL one second later)
    memory_mb: int = 512  # RLIMIT_AS (address space)
    file_size_mb: int = 1  # RLIMIT_FSIZE
    max_processes: int = 32  # RLIMIT_NPROC, threads included; per program in namespaces mode
    output_bytes: int = 64_000  # stdout/stderr captured at most this much each; more ends the run
    workdir_mb: int = 16  # size of the private tmpfs working directory (namespaces mode)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"sandbox limit {name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ProgramResult:
    """What one program did. ``returned`` is ``str(value)`` of ``call()``'s result (numbers keep full
    precision), or None when no ``call`` was asked for, the program does not define it, it returned
    None, or the program did not finish; the harness then parses ``stdout``."""

    verdict: Verdict
    returned: str | None
    stdout: str
    stderr: str
    duration_s: float
    detail: str = ""  # one line: why (e.g. "TimeoutError after 5 s (wall clock)", "NameError: ...")
    returned_type: str | None = None  # the type's name of call()'s value: "int", "float", "str", ...


@dataclass(frozen=True)
class Isolation:
    """What this machine gives: ``mode``, a one-line ``detail`` (why fallback, if so) and the layers
    the probe program ran under (e.g. namespaces, jail, no-capabilities, nobody, rlimits,
    no_new_privs, seccomp, audit-hook)."""

    mode: IsolationMode
    detail: str
    layers: tuple[str, ...] = ()


@dataclass
class _Run:
    """Raw outcome of supervising one child process."""

    stdout: bytes
    stderr: bytes
    result: bytes
    status: int  # wait status
    cpu_s: float  # user + system time of the child and its waited-for descendants
    reason: str | None  # "timeout", "output_limit", "tampered" (result pipe overflow) or None
    overflow: str = ""  # which stream hit its cap


_ISOLATION: Isolation | None = None
_ISOLATION_LOCK = threading.Lock()
_PROBE_LIMITS = SandboxLimits(timeout_s=30.0, cpu_s=10)


def isolation() -> Isolation:
    """The isolation mode, probed once per process by running a trivial program in namespaces."""
    global _ISOLATION
    with _ISOLATION_LOCK:
        if _ISOLATION is None:
            _ISOLATION = _probe()
        return _ISOLATION


def _probe() -> Isolation:
    program = "def solution():\n    return 1\n"
    reason = f"namespaces need Linux, this is {sys.platform}"
    if sys.platform.startswith("linux"):
        try:
            result, layers = _execute(program, "solution", _PROBE_LIMITS, "namespaces")
            if result.verdict == "ok" and result.returned == "1":
                return Isolation("namespaces", "unprivileged user namespaces work", layers)
            reason = f"namespace probe gave {result.verdict}: {result.detail}"
        except SandboxError as exc:
            reason = f"no user namespaces ({exc})"
    result, layers = _execute(program, "solution", _PROBE_LIMITS, "fallback")
    if result.verdict != "ok" or result.returned != "1":
        raise SandboxError(f"the sandbox cannot run programs here: {result.verdict}, {result.detail}")
    return Isolation("fallback", reason, layers)


def run_program(
    code: str, *, call: str | None = "solution", limits: SandboxLimits = SandboxLimits()
) -> ProgramResult:
    """Run ``code`` as ``__main__`` in a fresh sandboxed process, then ``call()`` if it is defined."""
    if os.name != "posix":
        raise SandboxError("the sandbox needs a POSIX system (Linux for full isolation)")
    if call is not None and not call.isidentifier():
        raise ConfigError(f"sandbox call must be a Python identifier or None, got {call!r}")
    return _execute(code, call, limits, isolation().mode)[0]


def run_programs(
    codes: Sequence[str],
    *,
    call: str | None = "solution",
    limits: SandboxLimits = SandboxLimits(),
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[ProgramResult]:
    """Run many programs, each in its own process, ``workers`` at a time (default: one per core).

    Results come back in input order; ``progress(done, total)`` is called after each one finishes.
    """
    total = len(codes)
    if total == 0:
        return []
    if workers is not None and workers < 1:
        raise ConfigError(f"sandbox workers must be >= 1, got {workers}")
    isolation()  # probe before the threads start
    results: list[ProgramResult | None] = [None] * total
    pool = ThreadPoolExecutor(min(workers or os.cpu_count() or 1, total), "lorasoup-sandbox")
    try:
        jobs = {pool.submit(run_program, code, call=call, limits=limits): i for i, code in enumerate(codes)}
        for done, future in enumerate(as_completed(jobs), start=1):
            results[jobs[future]] = future.result()
            if progress is not None:
                progress(done, total)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [r for r in results if r is not None]


class ProgramCache:
    """Results of programs already run, by ``(code, call, limits)``, for one scoring session.

    A program takes no input, so its result is a function of its text and limits. Models scored on
    the same test set write the same program for many examples (the demo's 18 rows ran 1,802 programs
    of which 461 were distinct), so a session that scores many models runs each program once. The
    cache freezes what does vary between runs (a program that reads the clock or draws random
    numbers, or one that ends near its time limit) at its first run; pass no cache to run every time.
    """

    def __init__(self) -> None:
        self._results: dict[tuple[str, str | None, SandboxLimits], ProgramResult] = {}
        self.hits = 0  # programs answered from the cache

    def __len__(self) -> int:
        return len(self._results)

    def run(
        self,
        codes: Sequence[str],
        *,
        call: str | None = "solution",
        limits: SandboxLimits = SandboxLimits(),
        workers: int | None = None,
    ) -> list[ProgramResult]:
        """``run_programs`` for the codes not seen before; every code's result, in input order."""
        missing = list(dict.fromkeys(code for code in codes if (code, call, limits) not in self._results))
        ran = run_programs(missing, call=call, limits=limits, workers=workers)
        for code, result in zip(missing, ran, strict=True):
            self._results[(code, call, limits)] = result
        self.hits += len(codes) - len(missing)
        return [self._results[(code, call, limits)] for code in codes]


@functools.cache
def _interpreter() -> str:
    """The base interpreter (not a venv's wrapper), so no site-packages can be configured in."""
    return os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)


# Loads the jail source as module ``_sandbox_jail``, then runs the child source as ``__main__``.
_BOOT = (
    "import sys\n"
    "jail = type(sys)('_sandbox_jail')\n"
    "exec(compile(sys.argv[1], '_sandbox_jail.py', 'exec'), jail.__dict__)\n"
    "sys.modules['_sandbox_jail'] = jail\n"
    "exec(compile(sys.argv[2], '_sandbox_child.py', 'exec'), {'__name__': '__main__'})\n"
)


@functools.cache
def _child_argv() -> tuple[str, ...]:
    here = Path(__file__).parent
    sources = [
        (here / name).read_text(encoding="utf-8") for name in ("_sandbox_jail.py", "_sandbox_child.py")
    ]
    return (_interpreter(), "-I", "-S", "-B", "-X", "utf8", "-c", _BOOT, *sources)


def _execute(
    code: str, call: str | None, limits: SandboxLimits, mode: IsolationMode
) -> tuple[ProgramResult, tuple[str, ...]]:
    """Spawn the child in a fresh working directory, supervise, classify, clean up; also the layers."""
    workdir = tempfile.mkdtemp(prefix="lorasoup-sandbox-", dir=_TMP_ROOT)
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    result_r, result_w = os.pipe()
    try:
        header = {
            "nonce": nonce,
            "mode": mode,
            "result_fd": result_w,
            "call": call,
            "disable": sorted(_DISABLED_LAYERS),
            "workdir": workdir,
            "limits": asdict(limits),
        }
        payload = json.dumps(header).encode() + b"\n" + code.encode("utf-8", "replace")
        argv = [*_child_argv(), workdir]  # the workdir also tags the processes (tests look for it)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=_ENV,
                start_new_session=True,
                pass_fds=(result_w,),
            )
        except OSError as exc:
            raise SandboxError(f"cannot start the sandbox interpreter {argv[0]}: {exc}") from exc
        finally:
            os.close(result_w)
        run = _Supervisor(proc, result_r, payload, limits).run()
    finally:
        os.close(result_r)
        _remove_tree(workdir)
    verdict, returned, detail, layers = _classify(run, limits, nonce)
    cap = limits.output_bytes
    result = ProgramResult(
        verdict=verdict,
        returned=returned,
        detail=detail,
        returned_type=_returned_type(run.result, nonce) if returned is not None else None,
        duration_s=time.monotonic() - start,
        stdout=_decode(run.stdout[:cap]),
        stderr=_decode(run.stderr[:cap]),
    )
    return result, layers


class _Supervisor:
    """Feeds one child's stdin and reads its three pipes with caps until it exits (then drains them
    for at most ``_GRACE_S``), the wall-clock deadline passes, or a pipe overflows; then kills its
    process group and reaps it."""

    def __init__(self, proc: subprocess.Popen, result_r: int, payload: bytes, limits: SandboxLimits) -> None:
        assert proc.stdin and proc.stdout and proc.stderr  # all PIPE by construction
        self.proc, self.payload, self.sent = proc, payload, 0
        self.deadline = time.monotonic() + limits.timeout_s
        self.names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", result_r: "result"}
        cap = limits.output_bytes
        # a report holds <= cap characters of return value, JSON-escaped (<= 12 bytes each) + small fields
        self.caps = {"stdout": cap, "stderr": cap, "result": 12 * cap + 4096}
        self.bufs = {name: bytearray() for name in self.caps}
        self.stdin_fd, self.pidfd = proc.stdin.fileno(), _open_pidfd(proc.pid)
        self.exited_at: float | None = None
        self.reason: str | None = None
        self.overflow = ""
        self.sel = selectors.DefaultSelector()
        for fd in [*self.names, self.stdin_fd]:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_WRITE if fd == self.stdin_fd else selectors.EVENT_READ)
        if self.pidfd is not None:
            self.sel.register(self.pidfd, selectors.EVENT_READ)

    def run(self) -> _Run:
        try:
            self._loop()
        finally:
            status, cpu_s = self._reap()
        out, err, result = (bytes(self.bufs[n]) for n in ("stdout", "stderr", "result"))
        return _Run(out, err, result, status, cpu_s, self.reason, self.overflow)

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            if self.exited_at is None and self.pidfd is None and _has_exited(self.proc.pid):
                self.exited_at = _kill_group(self.proc.pid)
            pipes_open = set(self.names) & set(self.sel.get_map())
            if self.exited_at is not None and (now - self.exited_at > _GRACE_S or not pipes_open):
                return
            if now >= self.deadline:
                self.reason = "timeout"
                return
            wait = self.deadline - now
            if self.exited_at is not None:
                wait = min(wait, self.exited_at + _GRACE_S - now)
            for key, _ in self.sel.select(wait if self.pidfd is not None else min(wait, _POLL_S)):
                if self._handle(key.fd):
                    return

    def _handle(self, fd: int) -> bool:
        """Serve one ready fd; True when a pipe overflowed and the run must end."""
        if fd == self.stdin_fd:
            self.sent = _feed(fd, self.payload, self.sent)
            if self.sent >= len(self.payload):
                self.sel.unregister(fd)
                self.proc.stdin.close()  # type: ignore[union-attr]
            return False
        if fd == self.pidfd:
            self.sel.unregister(fd)
            self.exited_at = _kill_group(self.proc.pid)
            return False
        name = self.names[fd]
        if not _drain(fd, self.bufs[name], self.sel) or len(self.bufs[name]) <= self.caps[name]:
            return False
        self.reason, self.overflow = ("tampered" if name == "result" else "output_limit"), name
        return True

    def _reap(self) -> tuple[int, float]:
        self.sel.close()
        _kill_group(self.proc.pid)  # before reaping: the zombie leader keeps the group id from being reused
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
        return status, usage.ru_utime + usage.ru_stime


def _feed(fd: int, payload: bytes, sent: int) -> int:
    try:
        return sent + os.write(fd, payload[sent : sent + 65536])
    except BlockingIOError:
        return sent
    except OSError:  # BrokenPipeError: the child died before reading; its exit tells the story
        return len(payload)


def _drain(fd: int, buf: bytearray, sel: selectors.BaseSelector) -> bool:
    """Read what is there into ``buf``; False (and unregister) at EOF."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return True
    if not chunk:
        sel.unregister(fd)
        return False
    buf += chunk
    return True


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or not Linux
        return None


def _has_exited(pid: int) -> bool:
    """Exited, without reaping (so the process-group id stays reserved until we kill the group)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> float:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return time.monotonic()


def _remove_tree(path: str) -> None:
    """Remove the working directory even if the program made parts of it unwritable."""

    def retry(func: Callable, failed: str, _: object) -> None:
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            func(failed)
        except OSError:
            pass

    key = "onexc" if sys.version_info >= (3, 12) else "onerror"
    shutil.rmtree(path, **{key: retry})


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _parse_frames(data: bytes, nonce: str) -> tuple[list[dict], str]:
    """The child's frames: ``ready`` (or ``setup_failed``) then ``done``; else why they are invalid."""
    lines = data.split(b"\n")
    if lines[-1]:
        return [], "an unterminated line"
    frames = []
    for line in lines[:-1]:
        try:
            frame = json.loads(line)
        except ValueError:
            return [], "a line that is not JSON"
        if not isinstance(frame, dict) or frame.get("nonce") != nonce:
            return [], "a frame without this run's nonce"
        frames.append(frame)
    events = [f.get("event") for f in frames]
    if events not in ([], ["setup_failed"], ["ready"], ["ready", "done"]):
        return [], f"unexpected frames {events}"
    if events[:1] == ["ready"] and not all(isinstance(x, str) for x in frames[0].get("layers", [0])):
        return [], "a malformed ready frame"
    if events == ["ready", "done"]:
        done = frames[1]
        if done.get("status") not in ("ok", "error", "memory") or not isinstance(done.get("detail"), str):
            return [], "a malformed final frame"
        if not isinstance(done.get("returned"), (str, type(None))):
            return [], "a malformed return value"
    return frames, ""


def _returned_type(data: bytes, nonce: str) -> str | None:
    """The type's name the final frame gives for ``call()``'s value, if it gives one."""
    frames, problem = _parse_frames(data, nonce)
    kind = frames[1].get("returned_type") if len(frames) == 2 and not problem else None
    return kind if isinstance(kind, str) else None


def _classify(
    run: _Run, limits: SandboxLimits, nonce: str
) -> tuple[Verdict, str | None, str, tuple[str, ...]]:
    """(verdict, returned, detail, layers) from the raw run; raises SandboxError if setup failed."""
    frames, problem = _parse_frames(run.result, nonce)
    layers = tuple(frames[0].get("layers", ())) if frames else ()
    if run.reason == "output_limit":
        return "output_limit", None, f"{run.overflow} exceeded {limits.output_bytes} bytes", layers
    if run.reason == "timeout" and len(frames) < 2:  # a finished report wins over a late exit
        return "timeout", None, f"TimeoutError after {limits.timeout_s:g} s (wall clock)", layers
    if run.reason == "tampered" or problem:
        return (
            "error",
            None,
            f"result channel tampered with: {problem or 'more data than any report'}",
            layers,
        )
    if not frames or frames[0]["event"] == "setup_failed":
        why = frames[0].get("detail", "") if frames else f"no report, {_describe_exit(run.status)}"
        tail = _decode(run.stderr).strip().splitlines()[-1:] or [""]
        raise SandboxError(f"sandbox setup failed: {why} {tail[0]}".strip())
    if len(frames) == 2:
        done = frames[1]
        return done["status"], done["returned"], done["detail"], layers
    return (*_classify_exit(run, limits), layers)


def _classify_exit(run: _Run, limits: SandboxLimits) -> tuple[Verdict, str | None, str]:
    """The program ended its process itself (or was killed) before the wrapper could report."""
    if os.WIFSIGNALED(run.status):
        sig = os.WTERMSIG(run.status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and run.cpu_s >= limits.cpu_s):
            return "timeout", None, f"CPU time limit of {limits.cpu_s} s exceeded"
        return "killed", None, f"killed by {_describe_exit(run.status)}"
    return "error", None, f"{_describe_exit(run.status)} before reporting (os._exit or a crash)"


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            return signal.Signals(os.WTERMSIG(status)).name
        except ValueError:
            return f"signal {os.WTERMSIG(status)}"
    return f"exited with status {os.WEXITSTATUS(status) if os.WIFEXITED(status) else status}"
