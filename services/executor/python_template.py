"""The template of a Python function's instances: a process that has started the interpreter and
imported the worker once, and forks a new instance on request (`python -P python_template.py`).

It runs inside the same sandbox an instance would (`Sandbox.launch`), one template per function
spec, and only ever runs our code: the user's module is imported by each forked instance, after
the fork, so module-level code (the function's own initialisation) runs once per instance, as on
FC, and nothing a handler does can reach the template and, through it, later instances.

The executor talks to it over a SOCK_SEQPACKET unix socket on the template's fd 0:
- the template first sends `Hello` (whether it can isolate its forks, see below);
- each `Fork` request carries four descriptors (SCM_RIGHTS): the instance's stdin, stdout and
  stderr, and a socket of its own (`reports`). The new instance sends `Started` on that socket
  (the kernel attaches its pid, as the executor sees it, to the message), and the template later
  sends `Exited` (its wait status) or, if it could not fork, `Failed`.

The template forks each instance ahead of demand: one "spare" waits for a request's descriptors
(and environment), so a start costs a message rather than forks and namespace set-up; after
handing one over the template forks the next.

Isolated forks (`--isolate`, in a sandbox) make a PID namespace per instance: the template forks
a child that unshares a user, PID, mount and IPC namespace, maps its own uid, mounts a private
/tmp, drops every capability and forks the spare, PID 1 of the new namespace, so that when it
dies the kernel kills everything it started, `setsid` children included; the child then exits and
the spare is re-parented to the template (a child subreaper), which reaps it and reports it.

This module imports nothing of taskmode's: the executor imports it for the message structs, and
the template loads the worker by path.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import sys
import traceback
from typing import Any, Final

import msgspec

MAX_MESSAGE: Final = 1 << 20
# Process names (comm) of the template and its spare, so that `ps` (and a test) tells them from
# instances, which all share the template's command line and the environment it was started with.
TEMPLATE_NAME: Final = "fc-template"
SPARE_NAME: Final = "fc-spare"
FDS_PER_FORK: Final = 4  # stdin, stdout, stderr, reports

# Linux constants (sched.h, mount.h, prctl.h, capability.h).
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
PR_SET_PDEATHSIG: Final = 1
PR_SET_NAME: Final = 15
PR_SET_DUMPABLE: Final = 4
PR_CAPBSET_DROP: Final = 24
PR_SET_CHILD_SUBREAPER: Final = 36
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522


class Hello(msgspec.Struct, frozen=True, tag=True):
    isolated: bool  # forks get a namespace each (asked for, and it works here)
    reason: str = ""  # why not, when isolation was asked for and does not work


class Fork(msgspec.Struct, frozen=True, tag=True):
    env: dict[str, str]  # the instance's whole environment


class Started(msgspec.Struct, frozen=True, tag=True):
    """From the instance itself: its pid comes with the message (SCM_CREDENTIALS)."""


class Failed(msgspec.Struct, frozen=True, tag=True):
    message: str


class Exited(msgspec.Struct, frozen=True, tag=True):
    status: int  # as os.waitpid gives it


Message = Hello | Fork | Started | Failed | Exited
encode = msgspec.msgpack.encode
decode = msgspec.msgpack.Decoder(Message).decode

_libc: Any = None


def _call(name: str, *args: Any) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _set_name(name: str) -> None:
    _call("prctl", PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """The new user namespace gave us every capability in it; the instance keeps none."""
    cap = 0
    while True:  # the bounding set, so that nothing exec'd later gets one back
        try:
            _call("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0)
        except OSError:  # EINVAL past the last capability this kernel knows
            break
        cap += 1
    _call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    data = (_CapData * 2)()
    _call("capset", ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data)


def isolate(*, tmp_mb: int, processes: int) -> None:
    """In the intermediate child: namespaces for the instance it is about to fork."""
    uid, gid = os.getuid(), os.getgid()
    _call("unshare", CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC)
    # The template is not dumpable, which makes our /proc files root's: dumpable just long enough
    # to write our own maps (this child runs nothing but this function meanwhile).
    _call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")  # the same uid inside: nothing changes for the code
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)
    # Mounts copied into a less privileged namespace are slaves: this one does not leak out.
    _call("mount", b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb << 20},mode=1777".encode())
    # After unshare: the namespace's own ceiling was taken from the template's (larger) limit, so
    # this bounds the instance alone and the template's bounds them all together.
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    _drop_capabilities()


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    # PID 1 of a namespace ignores signals it has no handler for (SIGKILL aside); a stop asks with
    # SIGTERM first, as it does any instance.
    os._exit(128 + signal.SIGTERM)


class Template:
    def __init__(self, worker: Any, *, isolated: bool, tmp_mb: int, processes: int) -> None:
        self.worker = worker
        self.isolated = isolated
        self.tmp_mb = tmp_mb
        self.processes = processes
        self.control = socket.socket(fileno=0)
        self.reports: dict[int, socket.socket] = {}  # instance pid (ours) -> its reports socket
        self.spare: tuple[int, socket.socket] | None = None  # the next instance, forked ahead
        self.pid = os.getpid()
        with open("/proc/self/comm") as comm:
            self.name = comm.read().strip()  # what an instance is called (the interpreter's name)

    def serve(self) -> int:
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        import select

        control = self.control.fileno()
        while True:
            readable, _, _ = select.select([control, wake_read], [], [])
            if wake_read in readable:
                while True:
                    try:
                        if not os.read(wake_read, 4096):
                            break
                    except BlockingIOError:
                        break
                self.reap()
            if control in readable:
                data, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, FDS_PER_FORK)
                if not data:
                    return 0  # the executor is gone
                self.fork(data, fds)
                if self.spare is None:
                    try:
                        self.make_spare()
                    except OSError:
                        traceback.print_exc()  # the next request tries again, and reports it

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.spare is not None and self.spare[0] == pid:
                self.spare[1].close()
                self.spare = None
            reports = self.reports.pop(pid, None)
            if reports is not None:
                self._report(reports, Exited(status=status))

    @staticmethod
    def _report(reports: socket.socket, message: Failed | Exited) -> None:
        try:
            reports.send(encode(message))
        except OSError:
            pass  # the executor gave up on this instance already
        reports.close()

    def fork(self, data: bytes, fds: list[int]) -> None:
        """Hand a request's descriptors to the spare, which becomes the instance."""
        if len(fds) != FDS_PER_FORK:
            for fd in fds:
                os.close(fd)
            return
        reports = socket.socket(fileno=fds[3])
        try:
            if not isinstance(decode(data), Fork):
                raise ValueError("not a fork request")
            for _ in range(2):  # a spare that died meanwhile is replaced once
                if self.spare is None:
                    self.make_spare()
                assert self.spare is not None
                pid, spare = self.spare
                self.spare = None
                try:
                    socket.send_fds(spare, [data], fds)
                except OSError:
                    continue
                finally:
                    spare.close()
                self.reports[pid] = reports
                return
            raise OSError("the spare instance died before it was used")
        except Exception as exc:
            self._report(reports, Failed(message=f"{type(exc).__name__}: {exc}"))
        finally:
            for fd in fds[:3]:
                os.close(fd)

    def make_spare(self) -> None:
        """Fork the next instance ahead of demand (isolated, if asked), waiting for its descriptors:
        a cold start then costs a message, not a fork (or two) and the namespaces' set-up."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = self._fork_spare(ours, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.spare = (pid, ours)

    def _fork_spare(self, ours: socket.socket, theirs: socket.socket) -> int:
        # The spare must not hold the template's end: it would never see the template go.
        if not self.isolated:
            pid = os.fork()
            if pid == 0:
                ours.close()
                self._spare(theirs, parent_gone=None)
            return pid
        pid_read, pid_write = os.pipe()
        child = os.fork()
        if child == 0:
            ours.close()
            os.close(pid_read)
            try:
                isolate(tmp_mb=self.tmp_mb, processes=self.processes)
                gone_read, gone_write = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(pid_write)
                    os.close(gone_write)
                    self._spare(theirs, parent_gone=gone_read)
                os.write(pid_write, str(pid).encode())
            except BaseException as exc:
                os.write(pid_write, f"!{type(exc).__name__}: {exc}".encode())
                os._exit(1)
            os._exit(0)
        os.close(pid_write)
        answer = b""
        while chunk := os.read(pid_read, 4096):
            answer += chunk
        os.close(pid_read)
        os.waitpid(child, 0)
        if not answer or answer.startswith(b"!"):
            raise OSError(answer[1:].decode(errors="replace") or "the instance could not be forked")
        return int(answer)

    def _spare(self, requests: socket.socket, *, parent_gone: int | None) -> None:
        """In the spare: wait for a request, then become the instance (never returns)."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, _exit_on_sigterm if self.isolated else signal.SIG_DFL)
            os.setsid()  # a group of its own, as a directly started instance has
            _set_name(SPARE_NAME)
            if parent_gone is not None:
                # Until the intermediate child is gone: then the template is our parent.
                os.read(parent_gone, 1)
                os.close(parent_gone)
            else:
                _call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != self.pid:
                    os._exit(1)  # the template died before the death signal was armed
            data, fds, _flags, _addr = socket.recv_fds(requests, MAX_MESSAGE, FDS_PER_FORK)
            if not data or len(fds) != FDS_PER_FORK:
                os._exit(0)  # the template is gone (or retired us)
            request = decode(data)
            assert isinstance(request, Fork)
            _set_name(self.name)
            # The template's sockets are closed below by number; their objects must never close
            # (on collection) whatever the instance has opened under that number by then.
            for sock in (self.control, requests, *self.reports.values()):
                sock.detach()
            for target, fd in enumerate(fds[:3]):
                os.dup2(fd, target)
            reports = socket.socket(fileno=fds[3])
            reports.send(encode(Started()))
            reports.close()
            os.closerange(3, 1 << 16)  # the template's control socket and anything else of its
            os.environ.clear()
            os.environ.update(request.env)
            code = self.worker.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        try:
            import atexit

            atexit._run_exitfuncs()  # what the user's code registered, as at a normal exit
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _load_worker() -> Any:
    # By path, under a private name: -P leaves this directory off sys.path, and a user module
    # named like ours must still import.
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python_worker.py")
    spec = importlib.util.spec_from_file_location("_taskmode_python_worker", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    # By hand, not argparse: its import would add to every template's start.
    options = dict(arg.removeprefix("--").partition("=")[::2] for arg in sys.argv[1:])
    isolate_forks = "isolate" in options  # a user+PID+mount+IPC namespace per instance
    tmp_mb = int(options.get("tmp-mb") or 512)  # the size of an isolated instance's /tmp
    processes = int(options.get("processes") or 64)  # an isolated instance's process limit
    worker = _load_worker()
    _call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # instances are re-parented here, to be reaped
    # Not dumpable: no instance (same uid) may read or write the template's memory through /proc
    # and so reach the instances forked after it; forks inherit this.
    _call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)
    import atexit
    import gc

    atexit._clear()  # the template's own exit handlers are no business of the instances
    gc.freeze()  # what is imported now stays shared with every fork (no copy-on-write by the GC)
    template = Template(worker, isolated=isolate_forks, tmp_mb=tmp_mb, processes=processes)
    _set_name(TEMPLATE_NAME)
    reason = ""
    try:
        template.make_spare()  # also the test of whether isolation works here
    except OSError as exc:
        reason = str(exc)
        template.isolated = False
    template.control.send(encode(Hello(isolated=template.isolated, reason=reason)))
    return template.serve()


if __name__ == "__main__":
    sys.exit(main())
