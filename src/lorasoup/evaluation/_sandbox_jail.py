"""Kernel-level layers of lorasoup's sandbox: namespaces, a read-only jail, no capabilities, seccomp.

Loaded by the sandbox child (``_sandbox_child.py``) inside the sandbox's own interpreter, never by
the harness; stdlib only. Python 3.10 lacks ``os.unshare``/``mount``/``prctl``, so the few libc calls
go through ctypes, which the program cannot use afterwards (see ``forget``; the audit hook refuses
ctypes and the seccomp filter does not care how a syscall is made).

``enter_namespaces`` (processes: outer -> init of a new pid namespace -> the program):

1. new user, mount, pid, network, IPC and UTS namespaces; namespace root maps to the caller's uid,
   or to host ``nobody`` when started as root (written by the outer process, which alone can);
2. a tmpfs root at the working directory holding read-only binds of /usr, /lib*, the stdlib dirs
   and a few /dev nodes, plus a small writable tmpfs at /tmp (the program's cwd); chroot into it;
3. every capability dropped (bounding set, ambient, securebits locked so exec regains none);
4. a last fork, so the program is not the namespace's init (init ignores SIGXCPU and its own signals).

``harden`` then sets ``no_new_privs`` and, on x86_64, a seccomp filter (both modes).
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import sys

NOBODY = 65534
CLONE_NEWPID, CLONE_THREAD = 0x20000000, 0x00010000
# user | mount | pid | net | ipc | uts
CLONE_FLAGS = 0x10000000 | 0x00020000 | CLONE_NEWPID | 0x40000000 | 0x08000000 | 0x04000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
ST_NOATIME, ST_NODIRATIME, ST_RELATIME = 1024, 2048, 4096
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 22, 24, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
# NOROOT + lock, NO_SETUID_FIXUP lock, KEEP_CAPS lock, NO_CAP_AMBIENT_RAISE + lock
SECUREBITS = 1 | 2 | 8 | 32 | 64 | 128
SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")

# seccomp (x86_64 only: syscall numbers are per architecture and only these are tested)
AUDIT_ARCH_X86_64, X32_SYSCALL_BIT = 0xC000003E, 0x40000000
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
EPERM, ENOSYS = 1, 38
X86_64 = {"clone": 56, "clone3": 435, "kill": 62, "tgkill": 234}
# socket socketpair fork vfork execve execveat tkill rt_sigqueueinfo rt_tgsigqueueinfo ptrace
# process_vm_readv/writev pidfd_open/send_signal/getfd unshare setns mount umount2 pivot_root chroot
# bpf perf_event_open userfaultfd keyctl add_key request_key (f)init_module kexec_load io_uring_*
X86_64_DENIED = (
    *(41, 53, 57, 58, 59, 322, 200, 129, 297, 101, 310, 311, 434, 424, 438, 272, 308),
    *(165, 166, 155, 161, 321, 298, 323, 250, 248, 249, 175, 313, 246, 425, 426, 427),
)


class Kernel:
    """The few libc calls the ``os`` module lacks, raising OSError like ``os`` does."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        self.libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

    def check(self, result: int, what: str) -> None:
        if result != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int) -> None:
        self.check(self.libc.unshare(flags), "unshare")

    def prctl(self, option: int, arg: int, what: str) -> None:
        self.check(self.libc.prctl(option, arg, 0, 0, 0), what)

    def mount(
        self, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None
    ) -> None:
        enc = [None if s is None else os.fsencode(s) for s in (src, dst, fstype, data)]
        self.check(self.libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {src} on {dst}")

    def drop_capabilities(self) -> None:
        """No capabilities left (not even in the namespace), none regained by exec."""
        self.prctl(PR_SET_SECUREBITS, SECUREBITS, "PR_SET_SECUREBITS")
        for cap in range(64):
            if self.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break  # EINVAL past the last capability this kernel knows
        self.libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        header = (self.ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (self.ctypes.c_uint32 * 6)()
        self.check(self.libc.capset(header, data), "capset")
        self.check(self.libc.capget(header, data), "capget")
        if any(data):
            raise OSError("capabilities still present after capset")

    def seccomp(self, program: bytes) -> None:
        """Install a classic-BPF filter (``struct sock_fprog {u16 len; sock_filter *filter}``)."""
        insns = self.ctypes.create_string_buffer(program, len(program))
        fprog = self.ctypes.create_string_buffer(
            struct.pack("=HxxxxxxQ", len(program) // 8, self.ctypes.addressof(insns))
        )
        self.check(
            self.libc.prctl(PR_SET_SECCOMP, 2, self.ctypes.addressof(fprog), 0, 0), "seccomp"
        )  # 2: FILTER


def _bind_readonly(kernel: Kernel, src: str, dst: str) -> None:
    """Bind ``src`` at ``dst`` and remount it read-only, keeping the flags the kernel locks."""
    try:
        kernel.mount(src, dst, None, MS_BIND)
    except OSError:  # EINVAL: a mount with locked submounts can only be bound recursively
        kernel.mount(src, dst, None, MS_BIND | MS_REC)
    st = os.statvfs(src).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (st & (MS_NODEV | MS_NOEXEC | ST_NODIRATIME))
    flags |= MS_NOATIME if st & ST_NOATIME else MS_RELATIME if st & ST_RELATIME else MS_STRICTATIME
    kernel.mount(None, dst, None, flags)


def _jail_sources() -> list[str]:
    """System library dirs plus the stdlib dirs on sys.path, outermost first, none inside another."""
    paths: list[str] = []
    candidates = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    candidates += sorted((p for p in sys.path if os.path.isdir(p)), key=len)
    for path in candidates:
        if not any(path == kept or path.startswith(kept.rstrip("/") + "/") for kept in paths):
            paths.append(path)
    return paths


def _open_sources() -> list[tuple[str, str, int | str]]:
    """(path, kind, O_PATH fd or symlink text) for everything the jail shows, opened as the caller.

    Opened before switching to the namespace's root (host nobody when started as root), which may not
    be allowed to walk to them (e.g. /root/.pyenv); binds then go through /proc/self/fd.
    """
    sources: list[tuple[str, str, int | str]] = []
    for src in _jail_sources() + list(DEVICES):
        if os.path.islink(src):  # e.g. /lib -> usr/lib on merged-/usr systems
            sources.append((src, "link", os.readlink(src)))
        elif os.path.exists(src):
            kind = "dir" if os.path.isdir(src) else "device" if src in DEVICES else "file"
            sources.append((src, kind, os.open(src, os.O_PATH | os.O_CLOEXEC)))
    return sources


def _build_jail(kernel: Kernel, root: str, work_mb: int, as_root: bool) -> None:
    """Leave the cwd at a tmpfs root: read-only binds of what the interpreter needs, a writable /tmp."""
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE)
    kernel.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755,uid=0,gid=0")
    os.chdir(root)
    sources = _open_sources()
    if as_root:  # become namespace root = host nobody; files in the namespace's tmpfs need a mapped owner
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    os.umask(0o022)
    for src, kind, handle in sources:
        dst = "." + src
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        if isinstance(handle, str):
            os.symlink(handle, dst)
            continue
        if kind == "dir":
            os.makedirs(dst, mode=0o755, exist_ok=True)
        else:
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
        via = f"/proc/self/fd/{handle}"
        if kind == "device":  # bound writable: writing /dev/null is harmless
            kernel.mount(via, dst, None, MS_BIND)
        else:
            _bind_readonly(kernel, via, dst)
        os.close(handle)
    os.makedirs("./tmp", mode=0o755, exist_ok=True)
    work_opts = f"size={work_mb}m,nr_inodes=4096,mode=0700,uid=0,gid=0"
    kernel.mount("tmpfs", "./tmp", "tmpfs", MS_NOSUID | MS_NODEV, work_opts)
    kernel.mount(None, ".", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _write_id_maps(proc: str, outside_uid: int, outside_gid: int) -> None:
    """Map namespace uid/gid 0 to one host id: the caller's own, or nobody when started as root."""
    if outside_uid == os.geteuid() != 0:  # unprivileged writers must deny setgroups first
        with open(f"{proc}/setgroups", "w") as f:
            f.write("deny")
    with open(f"{proc}/gid_map", "w") as f:
        f.write(f"0 {outside_gid} 1")
    with open(f"{proc}/uid_map", "w") as f:
        f.write(f"0 {outside_uid} 1")


def _mirror_exit(pid: int, decode: bool) -> None:
    """Wait for ``pid`` and end the same way: its signal, or its exit status.

    The pid namespace's init cannot kill itself with a signal, so it exits with 128 + signal instead;
    the outer process (``decode``) turns that back into the signal for the harness to see.
    """
    code = 1
    try:
        os.close(0)
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = 128 + sig if sig else os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
        if decode and not sig and code > 128:
            sig = code - 128
        if sig:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
    finally:  # never return into the child's main(): only the program's process may write frames
        os._exit(code)


def _fork_as_root(kernel: Kernel) -> None:
    """Root: the outer process (still privileged in the host namespace) writes the child's id maps.

    A process can only map its own id from inside a new user namespace, so mapping namespace root to
    host nobody needs a writer outside it. The outer process makes the pid namespace; the inner child
    (its pid 1) makes the others and waits until the outer process has written its maps.
    """
    kernel.unshare(CLONE_NEWPID)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        os.close(go_r)
        try:
            if os.read(ready_r, 1) == b"u":
                _write_id_maps(f"/proc/{pid}", NOBODY, NOBODY)
                os.write(go_w, b"g")
        except OSError:
            pass  # the inner child reports the failure
        _mirror_exit(pid, decode=True)
    os.close(ready_r)
    os.close(go_w)
    kernel.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")
    kernel.unshare(CLONE_FLAGS & ~CLONE_NEWPID)
    os.write(ready_w, b"u")
    os.close(ready_w)
    if os.read(go_r, 1) != b"g":
        raise OSError("the outer process could not write the user namespace's id maps")
    os.close(go_r)


def enter_namespaces(kernel: Kernel, workdir: str, work_mb: int) -> None:
    """Isolate (see the module docstring); returns only in the program's process, cwd /tmp in the jail."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        _fork_as_root(kernel)
    else:
        kernel.unshare(CLONE_FLAGS)
        _write_id_maps("/proc/self", uid, gid)
        pid = os.fork()
        if pid:
            _mirror_exit(pid, decode=True)
        kernel.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")
    # pid 1 of the new pid namespace: every process in it dies with it
    _build_jail(kernel, workdir, work_mb, as_root=uid == 0)
    os.chroot(".")
    os.chdir("/tmp")
    kernel.drop_capabilities()
    pid = os.fork()  # the program must not be init: init ignores SIGXCPU and signals it sends itself
    if pid:
        _mirror_exit(pid, decode=False)


def seccomp_program(own_pid: int) -> bytes:
    """Classic BPF for x86_64: deny (EPERM) process creation, exec, signals to other processes,
    sockets, ptrace and namespace, mount, module and io_uring calls; clone only for threads; clone3
    gets ENOSYS so glibc falls back to clone. https://docs.kernel.org/userspace-api/seccomp_filter.html
    """
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    allow, deny, enosys = SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM, SECCOMP_RET_ERRNO | ENOSYS
    code: list[tuple[int, int, int, int]] = [(ld, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH_X86_64), (ret, 0, 0, deny)]
    code += [(ld, 0, 0, 0), (0x35, 0, 1, X32_SYSCALL_BIT), (ret, 0, 0, deny)]  # BPF_JGE: no x32 ABI
    for nr in X86_64_DENIED:
        code += [(jeq, 0, 1, nr), (ret, 0, 0, deny)]
    code += [(jeq, 0, 1, X86_64["clone3"]), (ret, 0, 0, enosys)]
    # each block: if nr matches, test args[0] (low 32 bits) and return; else skip the block's 4 insns
    code += [(jeq, 0, 4, X86_64["clone"]), (ld, 0, 0, 16), (jset, 0, 1, CLONE_THREAD)]  # threads only
    code += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    for name in ("kill", "tgkill"):  # signals only to this process
        code += [(jeq, 0, 4, X86_64[name]), (ld, 0, 0, 16), (jeq, 0, 1, own_pid)]
        code += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    code += [(ret, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in code)


def harden(kernel: Kernel | None, seccomp: bool = True) -> list[str]:
    """``no_new_privs`` and (x86_64) the seccomp filter on this process; the layers applied."""
    if kernel is None:
        return []
    kernel.prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    if not seccomp or os.uname().machine != "x86_64":
        return ["no_new_privs"]
    kernel.seccomp(seccomp_program(os.getpid()))
    return ["no_new_privs", "seccomp"]


def forget() -> None:
    """Drop the ctypes modules so the program finds no loaded libc handles (with the Kernel unreferenced)."""
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    import gc

    gc.collect()
