"""The sandbox for model-written code: scoring basics, then hostile programs in every isolation mode.

Hostile programs run as one parallel ``run_programs`` batch per mode; each case then checks its
verdict and that the host is untouched (files, canary, listening socket, processes, temp dirs).
Modes: ``namespaces`` (the default where user namespaces work), ``fallback`` (forced; what Docker
or hardened kernels get) and ``namespaces-only`` (without the audit hook and the seccomp filter:
only the namespaces, the jail, dropped capabilities and rlimits stand between program and host).
"""

from __future__ import annotations

import os
import shutil
import socket
import string
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import lorasoup
from lorasoup.errors import ConfigError
from lorasoup.evaluation import sandbox
from lorasoup.evaluation.sandbox import Isolation, ProgramResult, SandboxLimits, run_program, run_programs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

FAST = SandboxLimits(timeout_s=2.0, cpu_s=1, memory_mb=256, output_bytes=20_000, max_processes=16)
SECRET = "lorasoup-secret-7f3a9c"
LORASOUP_SRC = Path(lorasoup.__file__).resolve().parent


@pytest.fixture(params=["namespaces", "fallback"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    _use_mode(request.param, monkeypatch)
    return request.param


def _use_mode(name: str, monkeypatch: pytest.MonkeyPatch, disable: frozenset[str] = frozenset()) -> None:
    if name in ("namespaces", "namespaces-only") and sandbox.isolation().mode != "namespaces":
        pytest.skip(f"user namespaces unavailable here: {sandbox.isolation().detail}")
    if name == "fallback":
        monkeypatch.setattr(sandbox, "_ISOLATION", Isolation("fallback", "forced by the test"))
    if name == "namespaces-only":
        disable = frozenset({"audit-hook", "seccomp"})
    monkeypatch.setattr(sandbox, "_DISABLED_LAYERS", disable)


# ---------------------------------------------------------------- scoring basics


@pytest.mark.parametrize(
    ("code", "returned"),
    [
        ("def solution():\n    return 42\n", "42"),
        ("def solution():\n    return -3\n", "-3"),
        ("def solution():\n    return 0.1 + 0.2\n", "0.30000000000000004"),
        ("def solution():\n    return 10**15 + 7\n", "1000000000000007"),
        ("def solution():\n    return 987654321 * 123456789\n", "121932631112635269"),
        ("def solution():\n    return 1.5e15\n", "1500000000000000.0"),
        ("def solution():\n    return 2.5e16\n", "2.5e+16"),
        ("from fractions import Fraction\ndef solution():\n    return float(Fraction(1, 4))\n", "0.25"),
        ("import math\ndef solution():\n    return math.floor(7.9)\n", "7"),
        ("def solution():\n    return 'forty-two'\n", "forty-two"),
    ],
    ids=[
        "int",
        "negative",
        "float",
        "large-int",
        "product",
        "large-float",
        "huge-float",
        "fraction",
        "math",
        "str",
    ],
)
def test_solution_return_value_is_reported(mode: str, code: str, returned: str) -> None:
    result = run_program(code, limits=FAST)
    assert (result.verdict, result.returned, result.detail) == ("ok", returned, "")


@pytest.mark.parametrize(
    ("code", "call", "stdout"),
    [
        ("print(17)\n", "solution", "17\n"),
        ("def solution():\n    print(5)\n", "solution", "5\n"),
        ("def solution():\n    return 3\nprint(solution() * 2)\n", None, "6\n"),
        ("x = 2 ** 10\nprint(f'answer: {x}')\n", "solution", "answer: 1024\n"),
        ("import sys\nprint(9)\nsys.exit(0)\n", "solution", "9\n"),
        ("print('\u00e9t\u00e9 \u2713')\n", "solution", "\u00e9t\u00e9 \u2713\n"),
    ],
    ids=["print-no-solution", "solution-prints", "call-none", "formatted", "sys-exit-0", "unicode"],
)
def test_printed_answers_arrive_on_stdout(mode: str, code: str, call: str | None, stdout: str) -> None:
    result = run_program(code, call=call, limits=FAST)
    assert (result.verdict, result.returned, result.stdout) == ("ok", None, stdout)


def test_custom_call_name(mode: str) -> None:
    result = run_program(
        "def answer():\n    return 8\ndef solution():\n    return 0\n", call="answer", limits=FAST
    )
    assert result.returned == "8"


@pytest.mark.parametrize(
    ("code", "detail"),
    [
        ("def solution(:\n    return 1\n", "SyntaxError"),
        ("x = 1 / 0\n", "ZeroDivisionError: division by zero"),
        ("def solution():\n    return undefined_name\n", "NameError: name 'undefined_name' is not defined"),
        ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
        ("def solution():\n    return 10**5000\n", "ValueError"),
    ],
    ids=["syntax", "module-exception", "solution-exception", "sys-exit-3", "int-too-long"],
)
def test_failures_are_errors_naming_the_exception(mode: str, code: str, detail: str) -> None:
    result = run_program(code, limits=FAST)
    assert result.verdict == "error" and result.returned is None
    assert result.detail.startswith(detail)
    if not detail.startswith("SystemExit"):  # a traceback on stderr, as Python prints it
        assert detail.split(":")[0] in result.stderr


def test_cpu_limit_ends_busy_loops_before_the_wall_clock(mode: str) -> None:
    limits = SandboxLimits(timeout_s=6.0, cpu_s=1)
    result = run_program("while True:\n    pass\n", limits=limits)
    assert (result.verdict, result.detail) == ("timeout", "CPU time limit of 1 s exceeded")
    assert result.duration_s < 5.0


def test_run_programs_keeps_input_order_and_reports_progress() -> None:
    codes = [
        f"import time\ntime.sleep({(7 * i) % 5} / 50)\ndef solution():\n    return {i}\n" for i in range(24)
    ]
    seen: list[tuple[int, int]] = []
    results = run_programs(
        codes, limits=FAST, workers=4, progress=lambda done, total: seen.append((done, total))
    )
    assert [r.returned for r in results] == [str(i) for i in range(24)]
    assert seen == [(k, 24) for k in range(1, 25)]
    assert run_programs([]) == []
    assert [r.returned for r in run_programs(codes[:2], limits=FAST, workers=1)] == ["0", "1"]


def test_invalid_settings_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ConfigError, match="memory_mb"):
        SandboxLimits(memory_mb=-1)
    with pytest.raises(ConfigError, match="identifier"):
        run_program("print(1)", call="not valid")
    with pytest.raises(ConfigError, match="workers"):
        run_programs(["print(1)"], workers=0)


def test_isolation_probe_is_cached_and_named() -> None:
    first = sandbox.isolation()
    assert first.mode in ("namespaces", "fallback") and first.detail
    assert {"rlimits", "audit-hook"} <= set(first.layers)
    if first.mode == "namespaces":
        assert {"namespaces", "jail", "no-capabilities"} <= set(first.layers)
    assert sandbox.isolation() is first


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is x86_64-only")
@pytest.mark.parametrize(
    ("code", "returned"),
    [
        ("import os\nos.kill(os.getppid(), 0)\n", None),
        ("import os\nos.kill($harness, 0)\n", None),
        ("import os\nos.fork()\n", None),
        ("import os\nos.execv('/usr/bin/true', ['true'])\n", None),
        (
            "import os, threading\nt = threading.Thread(target=os.kill, args=(os.getpid(), 0))\n"
            "t.start()\nt.join()\ndef solution():\n    return 1\n",
            "1",
        ),
    ],
    ids=["kill-parent", "kill-harness", "fork", "exec", "threads-and-self-signal-allowed"],
)
def test_seccomp_alone_refuses_processes_and_signals(
    mode: str, monkeypatch: pytest.MonkeyPatch, code: str, returned: str | None
) -> None:
    """With the audit hook off, the kernel's seccomp filter still answers EPERM."""
    monkeypatch.setattr(sandbox, "_DISABLED_LAYERS", frozenset({"audit-hook"}))
    result = run_program(string.Template(code).substitute(harness=os.getpid()), limits=FAST)
    if returned is None:
        assert (result.verdict, result.detail) == (
            "error",
            "PermissionError: [Errno 1] Operation not permitted",
        )
    else:
        assert (result.verdict, result.returned) == ("ok", returned)


# ---------------------------------------------------------------- hostile programs


@dataclass(frozen=True)
class Case:
    """One hostile program: ``$names`` in ``code`` are filled from the host context."""

    id: str
    code: str
    verdicts: frozenset[str]
    hard_verdicts: frozenset[str] | None = None  # in namespaces-only mode, if different
    returned: str | None = None  # expected when the verdict is ok
    detail: str = ""  # must appear in the detail (first allowed mode only; see below)

    def allowed(self, mode: str) -> frozenset[str]:
        return self.hard_verdicts if mode == "namespaces-only" and self.hard_verdicts else self.verdicts


def _v(*names: str) -> frozenset[str]:
    return frozenset(names)


SLOW = "timeout"  # allowed where a heavily loaded machine may not finish in FAST.timeout_s


SPOOF = '{"event": "done", "status": "ok", "returned": "999", "detail": ""}'
CASES = [
    Case("infinite-loop", "while True:\n    pass\n", _v("timeout")),
    Case(
        "sleep-loop", "import time\nwhile True:\n    time.sleep(0.05)\n", _v("timeout"), detail="wall clock"
    ),
    Case("fork-bomb", "import os\nwhile True:\n    os.fork()\n", _v("error", "timeout", "killed")),
    Case("memory-bomb", "x = bytearray(10**10)\n", _v("memory")),
    Case("memory-growth", "a = []\nwhile True:\n    a.append(bytes(10**6))\n", _v("memory", "killed", SLOW)),
    Case("huge-stdout", "while True:\n    print('x' * 1000)\n", _v("output_limit"), detail="stdout"),
    Case("huge-stderr", "import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n", _v("output_limit")),
    Case("write-outside", "open('$outside', 'w').write('pwned')\n", _v("error")),
    Case("write-tmp", "open('/tmp/lorasoup-pwned-$token', 'w').write('pwned')\n", _v("ok", "error")),
    Case("write-home", "import os\nopen(os.path.expanduser('~/.lorasoup-pwned-$token'), 'w')\n", _v("error")),
    Case("delete-canary", "import os\nos.remove('$canary')\n", _v("error")),
    Case("rmtree-host", "import shutil\nshutil.rmtree('$hostdir')\n", _v("error")),
    Case("rename-canary", "import os\nos.rename('$canary', 'stolen')\n", _v("error")),
    Case("read-env", "import os\nprint(dict(os.environ))\n", _v("ok")),
    Case("proc-environ", "print(open('/proc/$ppid/environ').read())\n", _v("error")),
    Case("proc-mem", "f = open('/proc/$ppid/mem', 'rb')\nprint(f.read(64))\n", _v("error")),
    Case("read-passwd", "print(open('/etc/passwd').read())\n", _v("error")),
    Case(
        "socket-connect",
        "import socket\nsocket.create_connection(('127.0.0.1', $port), timeout=1)\n",
        _v("error"),
    ),
    Case(
        "socket-raw-module",
        """
import importlib
s = importlib.import_module('_socket').socket()
s.connect(('127.0.0.1', $port))
""",
        _v("error"),
    ),
    Case("dns", "import socket\nprint(socket.gethostbyname('example.com'))\n", _v("error")),
    Case("os-system", "import os\nprint(os.system('touch $marker'))\n", _v("error"), _v("ok", "error")),
    Case(
        "subprocess",
        "import subprocess\nsubprocess.run(['touch', '$marker'])\n",
        _v("error"),
        _v("ok", "error"),
    ),
    Case("exec", "import os\nos.execv('/usr/bin/touch', ['touch', '$marker'])\n", _v("error")),
    Case(
        "kill-parent",
        """
import os, time
os.kill(os.getppid(), 9)
time.sleep(0.2)
def solution():
    return 1
""",
        _v("error"),
        _v("ok", "error"),  # the parent in the jail is its init, which ignores the signal
    ),
    Case("kill-harness", "import os, signal\nos.kill($ppid, signal.SIGTERM)\n", _v("error")),
    Case("kill-everything", "import os\nos.kill(-1, 9)\n", _v("error")),
    Case("kill-own-group", "import os\nos.killpg(os.getpgrp(), 9)\n", _v("error", "killed")),
    Case(
        "exit-in-solution", "import sys\ndef solution():\n    sys.exit(0)\n", _v("ok"), detail="SystemExit(0)"
    ),
    Case("os-exit", "import os\ndef solution():\n    os._exit(0)\n", _v("error"), detail="before reporting"),
    Case("recursion-bomb", "def f(n):\n    return f(n + 1)\nf(0)\n", _v("error"), detail="RecursionError"),
    Case(
        "c-stack-overflow",
        """
import sys
sys.setrecursionlimit(10**8)
x = []
for _ in range(10**5):
    x = [x]
str(x)
""",
        _v("killed", "error", "memory", SLOW),
    ),
    Case(
        "threads-never-end",
        """
import threading, time
threading.Thread(target=time.sleep, args=(1000,)).start()
def solution():
    return 7
""",
        _v("ok"),
        returned="7",
    ),
    Case(
        "sigterm-ignored",
        """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    time.sleep(0.05)
""",
        _v("timeout"),
    ),
    Case(
        "close-stdout",
        "import os\nos.close(1)\nos.close(2)\ndef solution():\n    return 11\n",
        _v("ok"),
        returned="11",
    ),
    Case(
        "redirect-stdout",
        "import io, sys\nsys.stdout = io.StringIO()\nprint('hidden')\ndef solution():\n    return 12\n",
        _v("ok"),
        returned="12",
    ),
    Case("import-lorasoup", "import lorasoup\n", _v("error"), detail="ModuleNotFoundError"),
    Case("import-lorasoup-path", "import sys\nsys.path.insert(0, '$src')\nimport lorasoup\n", _v("error")),
    Case("read-parent-source", "print(open('$source').read())\n", _v("error")),
    Case("ctypes-kill", "import ctypes\nctypes.CDLL(None).kill($ppid, 9)\n", _v("error"), _v("ok", "error")),
    Case("ctypes-segfault", "import ctypes\nctypes.string_at(0)\n", _v("error"), _v("killed")),
    Case(
        "multiprocessing",
        "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()\n",
        _v("error"),
        _v("ok", "error"),
    ),
    Case(
        "huge-file", "open('big.bin', 'wb').write(b'0' * (8 * 2**20))\n", _v("error"), detail="File too large"
    ),
    # ext4 file creation can take more than the 1 s of CPU in fallback mode; tmpfs (namespaces) is fast
    Case(
        "fill-workdir",
        "for i in range(3000):\n    open(f'f{i}', 'w').write('x' * 900)\n",
        _v("ok", "error", "timeout"),
    ),
    Case(
        "lock-workdir",
        "import os\nos.mkdir('d')\nopen('d/f', 'w').close()\nos.chmod('d', 0)\nos.chmod('.', 0)\n",
        _v("ok", "error"),
    ),
    Case("spoof-stdout", f"print('{SPOOF}')\ndef solution():\n    return 1\n", _v("ok"), returned="1"),
    Case(
        "spoof-result-fd",
        f"""
import os
for fd in range(3, 256):
    try:
        os.write(fd, b'{SPOOF}\\n')
    except OSError:
        pass
def solution():
    return 1
""",
        _v("error"),
        detail="tampered",
    ),
    Case(
        "setsid",
        "__import__('os').setsid()\nimport time\nwhile True:\n    time.sleep(0.05)\n",
        _v("error", "timeout"),
    ),
    Case(
        "double-fork-daemon",
        """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
def solution():
    return 1
""",
        _v("error"),
        _v("ok"),  # forks are allowed without hook and seccomp; the pid namespace ends the daemon
    ),
    Case("chroot-escape", "import os\nos.mkdir('x')\nos.chroot('x')\n", _v("error")),
    Case(
        "raise-rlimit",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))\n",
        _v("error"),
    ),
]


Hostile = tuple[str, "Host", dict[str, ProgramResult]]


@dataclass
class Host:
    """What the hostile batch could damage, and how to tell."""

    root: Path  # parent of the sandbox working directories (sandbox._TMP_ROOT)
    hostdir: Path  # world-writable, so only the sandbox (not file permissions) protects it
    listener: socket.socket
    values: dict[str, str] = field(default_factory=dict)

    def fill(self, case: Case, mode: str) -> str:
        paths = {"outside": self.outside(case, mode), "marker": self.marker(case, mode)}
        return string.Template(case.code).substitute(self.values, **paths, token=f"{case.id}-{mode}")

    def outside(self, case: Case, mode: str) -> Path:
        return self.hostdir / f"outside-{case.id}-{mode}"

    def marker(self, case: Case, mode: str) -> Path:
        return self.hostdir / f"marker-{case.id}-{mode}"


@pytest.fixture(scope="module", params=["namespaces", "fallback", "namespaces-only"])
def hostile(request: pytest.FixtureRequest) -> Iterator[Hostile]:
    """Run every case in one parallel batch under one mode; yield the results and the host."""
    mode = request.param
    with pytest.MonkeyPatch.context() as mp:
        _use_mode(mode, mp)
        root = Path(tempfile.mkdtemp(prefix="lorasoup-sbx-test-"))
        hostdir = Path(tempfile.mkdtemp(prefix="lorasoup-sbx-host-"))
        for path in (root, hostdir):
            path.chmod(0o777)
        (hostdir / "canary").write_text("still here")
        (hostdir / "canary").chmod(0o666)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        values = {"canary": hostdir / "canary", "hostdir": hostdir, "port": listener.getsockname()[1]}
        values |= {"ppid": os.getpid(), "src": LORASOUP_SRC.parent, "source": LORASOUP_SRC / "errors.py"}
        host = Host(root, hostdir, listener, {k: str(v) for k, v in values.items()})
        mp.setattr(sandbox, "_TMP_ROOT", str(root))
        mp.setenv("LORASOUP_TEST_SECRET", SECRET)
        try:
            start = time.monotonic()
            results = run_programs([host.fill(c, mode) for c in CASES], limits=FAST, workers=4)
            assert time.monotonic() - start < 30
            yield mode, host, dict(zip([c.id for c in CASES], results, strict=True))
        finally:
            listener.close()
            shutil.rmtree(hostdir, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            for path in Path(tempfile.gettempdir()).glob(f"lorasoup-pwned-*-{mode}"):
                path.unlink()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_program_is_contained(hostile: Hostile, case: Case) -> None:
    mode, host, results = hostile
    result = results[case.id]
    assert result.verdict in case.allowed(mode), f"{case.id}: {result}"
    if result.verdict == "ok" and case.returned is not None:
        assert result.returned == case.returned
    if case.detail and mode != "namespaces-only":
        assert case.detail in result.detail, result
    assert result.duration_s < FAST.timeout_s + 1.5
    assert max(len(result.stdout.encode()), len(result.stderr.encode())) <= FAST.output_bytes
    assert result.returned != "999"  # the spoofing cases
    # the host is untouched
    assert not host.outside(case, mode).exists() and not host.marker(case, mode).exists()
    assert not (Path(tempfile.gettempdir()) / f"lorasoup-pwned-{case.id}-{mode}").exists()
    assert not (Path.home() / f".lorasoup-pwned-{case.id}-{mode}").exists()
    assert (host.hostdir / "canary").read_text() == "still here"
    assert SECRET not in result.stdout + result.stderr and "LORASOUP_TEST_SECRET" not in result.stdout
    assert "def __init__" not in result.stdout  # no lorasoup source leaked
    assert "root:" not in result.stdout  # no /etc/passwd


def test_hostile_batch_left_nothing_behind(hostile: Hostile) -> None:
    """No process of any program survives, nothing connected, every working directory is gone."""
    _, host, results = hostile
    deadline = time.monotonic() + 3
    while _processes_mentioning(str(host.root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(str(host.root)) == []
    with pytest.raises(BlockingIOError):
        host.listener.accept()
    assert list(host.root.iterdir()) == []
    assert sorted(p.name for p in host.hostdir.iterdir()) == ["canary"]
    assert len(results) == len(CASES)


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (the sandbox passes its working dir there)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry))
    return found


def test_program_cache_runs_each_distinct_program_once(monkeypatch) -> None:
    from tests.evaluation.test_tasks import count_program_runs

    ran = count_program_runs(monkeypatch)
    cache = sandbox.ProgramCache()
    first = cache.run(["def solution():\n    return 6 * 7\n", "def solution():\n    return 1\n"])
    again = cache.run(["def solution():\n    return 1\n", "def solution():\n    return 2 + 2\n"])
    assert [r.returned for r in first] == ["42", "1"] and [r.returned for r in again] == ["1", "4"]
    assert ran == [ran[0], ["def solution():\n    return 2 + 2\n"]] and len(ran[0]) == 2  # only the new one
    assert again[0] is first[1] and cache.hits == 1 and len(cache) == 3
    other_limits = cache.run(["def solution():\n    return 1\n"], limits=SandboxLimits(timeout_s=2.0))
    assert other_limits[0].returned == "1" and len(cache) == 4  # limits are part of the key
