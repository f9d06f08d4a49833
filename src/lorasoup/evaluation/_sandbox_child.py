"""Child side of lorasoup's sandbox: isolate, run ONE untrusted program, report on a private pipe.

``lorasoup.evaluation.sandbox`` starts ``python -I -S -B -X utf8 -c <boot> <jail source> <this
source> <workdir>``; the boot line loads ``_sandbox_jail.py`` as module ``_sandbox_jail`` and runs
this file as ``__main__`` (stdlib only: the program can't import lorasoup, and neither do these).

Protocol:

- stdin: one JSON header line (nonce, mode, limits, result fd, ...) then the program's source; read
  whole before anything else, then fd 0 is pointed at /dev/null.
- the result fd (a pipe inherited from the parent, not stdout): exactly two JSON lines, each with
  the nonce: ``{"event": "ready", "layers": [...]}`` just before the program runs (or
  ``"setup_failed"`` instead), then ``{"event": "done", "status": ok|error|memory, "returned": ...,
  "detail": ...}`` after it (plus ``"returned_type"``, the type's name, when a value was returned).

Setup, in order: ``namespaces`` mode enters the jail (``_sandbox_jail.enter_namespaces``);
``fallback`` mode drops root to ``nobody`` when started as root; then rlimits, ``no_new_privs`` +
seccomp (``_sandbox_jail.harden``) and the audit hook (defence in depth, see docs/sandbox.md).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import resource
import sys

import _sandbox_jail as jail  # provided by the boot line, see above

# Imported before dropping root in fallback mode, where the stdlib may sit in a directory that
# `nobody` cannot read (e.g. /root/.pyenv); programs importing anything else get ImportError there.
_PRELOAD = [
    *("math", "cmath", "decimal", "fractions", "statistics", "itertools", "functools", "collections"),
    *("re", "datetime", "random", "string", "heapq", "bisect", "operator", "typing", "dataclasses"),
    *("enum", "numbers", "copy", "time", "threading", "traceback", "linecache"),
]
_BLOCKED_MODULES = frozenset(
    {
        *("ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing", "_multiprocessing"),
        *("_posixshmem", "socket", "_socket", "ssl", "_ssl", "pty", "_testcapi", "_testinternalcapi"),
        *("_xxsubinterpreters", "_ctypes_test", "_testbuffer", "_testmultiphase", "_xxtestfuzz"),
    }
)
_BLOCKED_EVENTS = frozenset(
    {
        *("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen"),
        *("os.killpg", "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers"),
        *("gc.get_referents", "sys.addaudithook"),
    }
)
# event -> positions of path arguments that must lie inside the working directory
_WRITE_EVENTS = {
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.truncate": (0,),
    "os.utime": (0,),
    "os.rename": (0, 1),
    "os.link": (0, 1),
    "os.symlink": (1,),
    "os.chflags": (0,),
    "os.lchflags": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.copytree": (1,),
    "shutil.move": (0, 1),
}
_READ_EVENTS = {"os.listdir": (0,), "os.scandir": (0,), "os.listxattr": (0,), "os.getxattr": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class _Reporter:
    """Writes the framed result lines to the inherited pipe (never to stdout, which the program owns)."""

    def __init__(self, fd: int, nonce: str) -> None:
        self.fd, self.nonce = fd, nonce
        # Prebuilt so a MemoryError can still be reported without allocating much.
        memory = {
            "event": "done",
            "status": "memory",
            "returned": None,
            "detail": "MemoryError (memory limit)",
        }
        self.memory_frame = self._frame(memory)

    def _frame(self, payload: dict) -> bytes:
        payload["nonce"] = self.nonce
        return (json.dumps(payload, ensure_ascii=True) + "\n").encode()

    def send(self, payload: dict) -> None:
        _write_all(self.fd, self._frame(payload))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _drop_root_fallback() -> list[str]:
    """Fallback mode started as root: become nobody (a hard file-permission and kill() boundary)."""
    if os.geteuid() != 0:
        return []
    for name in _PRELOAD:
        __import__(name)
    os.chown(".", jail.NOBODY, jail.NOBODY)
    os.setgroups([])
    os.setresgid(jail.NOBODY, jail.NOBODY, jail.NOBODY)
    os.setresuid(jail.NOBODY, jail.NOBODY, jail.NOBODY)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise OSError("could not drop root")
    return ["nobody"]


def _apply_limits(limits: dict) -> None:
    mib = 1 << 20
    wanted = {
        resource.RLIMIT_CPU: (limits["cpu_s"], limits["cpu_s"] + 1),  # SIGXCPU first, SIGKILL 1 s later
        resource.RLIMIT_AS: (limits["memory_mb"] * mib,) * 2,
        resource.RLIMIT_FSIZE: (limits["file_size_mb"] * mib,) * 2,
        resource.RLIMIT_NPROC: (limits["max_processes"],) * 2,
        resource.RLIMIT_NOFILE: (256, 256),
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in wanted.items():
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))


def _install_audit_hook(workdir: str) -> None:
    """Refuse process creation, signals to others, sockets, ctypes and writes outside ``workdir``.

    Defence in depth only: CPython audit hooks are not a security boundary (see docs/sandbox.md).
    """
    realpath, fspath, pid = os.path.realpath, os.fspath, os.getpid()
    work = realpath(workdir)
    read_roots = tuple({realpath(p) for p in sys.path if os.path.isdir(p)} | {work})
    devices = frozenset(jail.DEVICES)

    def inside(path: object, roots: tuple[str, ...]) -> bool:
        if isinstance(path, int):
            return True  # an fd the program already holds: its opening was checked
        full = realpath(os.path.join(work, os.fsdecode(fspath(path))))
        return full in devices or any(full == r or full.startswith(r + "/") for r in roots)

    def refuse(event: str, detail: object = "") -> None:
        raise PermissionError(f"sandbox refused {event} {detail}".strip())

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            if path is not None and not inside(path, (work,) if writing else read_roots):
                refuse(event, path)
        elif event in _WRITE_EVENTS:
            if not all(inside(args[i], (work,)) for i in _WRITE_EVENTS[event]):
                refuse(event, args[0])
        elif event in _READ_EVENTS:
            if args[_READ_EVENTS[event][0]] is not None and not inside(args[0], read_roots):
                refuse(event, args[0])
        elif event == "import":
            if args[0].partition(".")[0] in _BLOCKED_MODULES:
                refuse(event, args[0])
        elif event in _BLOCKED_EVENTS or event.startswith(("socket.", "ctypes.")):
            refuse(event)
        elif event == "os.kill" and args[0] != pid:
            refuse(event, args[0])

    sys.addaudithook(hook)


def _as_text(value: object, cap: int) -> str | None:
    """The return value as plain text: ``str`` (numbers keep their full precision), capped, valid UTF-8."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text[:cap].encode("utf-8", "replace").decode("utf-8")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    try:
        message = " ".join(str(exc).split())
    except BaseException:
        message = ""

    return f"{type(exc).__name__}: {message}"[:300] if message else type(exc).__name__


def _print_traceback(exc: BaseException, code: str) -> None:
    try:
        import linecache
        import traceback

        linecache.cache["<program>"] = (len(code), None, code.splitlines(True), "<program>")
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
    except BaseException:
        print(_one_line(exc), file=sys.stderr)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):
            stream.flush()


def _run(code: str, call: str | None, cap: int, report: _Reporter) -> None:
    """Execute the program as ``__main__``, then call ``call()`` if defined; report once; exit."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    done = {"event": "done", "status": "ok", "returned": None, "detail": ""}
    try:
        exec(compile(code, "<program>", "exec"), namespace)
        func = namespace.get(call) if call else None
        if callable(func):
            value = func()
            done["returned"] = _as_text(value, cap)
            if value is not None:  # the harness needs to know a str from a number ('1,234' is text)
                done["returned_type"] = "str" if isinstance(value, str) else type(value).__name__
    except SystemExit as exc:  # sys.exit(0) ends the program normally; anything else is an error
        if exc.code not in (None, 0):
            done.update(status="error", detail=f"SystemExit: {exc.code}"[:300])
        else:
            done["detail"] = "SystemExit(0)"
    except MemoryError:
        namespace.clear()
        _flush()
        _write_all(report.fd, report.memory_frame)
        os._exit(0)
    except BaseException as exc:
        done.update(status="error", detail=_one_line(exc))
        _print_traceback(exc, code)
    _flush()
    report.send(done)
    os._exit(0)  # never wait for threads the program left running


def _isolate(config: dict) -> list[str]:
    """Every layer before the program runs; the names of the layers applied."""
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        kernel: jail.Kernel | None = jail.Kernel()
    except (ImportError, OSError, AttributeError):
        if config["mode"] == "namespaces":
            raise
        kernel = None  # fallback without ctypes: no no_new_privs / seccomp
    if config["mode"] == "namespaces":
        jail.enter_namespaces(kernel, config["workdir"], config["limits"]["workdir_mb"])
        layers = ["namespaces", "jail", "no-capabilities"]
    else:
        layers = _drop_root_fallback()
    _apply_limits(config["limits"])
    layers += ["rlimits", *jail.harden(kernel, seccomp="seccomp" not in config["disable"])]
    del kernel
    jail.forget()
    del sys.modules["_sandbox_jail"]
    if "audit-hook" not in config["disable"]:
        _install_audit_hook(os.getcwd())
        layers.append("audit-hook")
    sys.argv = [""]
    return layers


def main() -> None:
    head, _, body = sys.stdin.buffer.read().partition(b"\n")
    config = json.loads(head)
    report = _Reporter(config["result_fd"], config["nonce"])
    try:
        layers = _isolate(config)
    except BaseException as exc:  # the sandbox's fault, not the program's: the parent raises
        import traceback

        traceback.print_exc()
        report.send({"event": "setup_failed", "detail": _one_line(exc)})
        os._exit(3)
    report.send({"event": "ready", "layers": layers})
    _run(body.decode("utf-8", "replace"), config["call"], config["limits"]["output_bytes"], report)


if __name__ == "__main__":
    main()
