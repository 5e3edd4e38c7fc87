"""Starting and adopting tracked processes: ``open_process``, ``run_process``, ``track_pid``.

``TrackedProcess`` is the process object a session hands out (usable like anyio's
``Process``); ``ProcessArgs`` are the keyword arguments ``open_process`` and
``run_process`` share, written once.

Invariants:

* A started process is tracked before anything can cancel the caller: ``open_process``
  checkpoints before ``Popen`` and never after, and ``Popen`` runs on the loop thread
  (as asyncio's own subprocess transport does).
* Every process gets a new session and process group of its own
  (``start_new_session=True``) and the session's marker in its environment
  (``KILL_SWITCH_SESSION``); where the plane has a cgroup, the child joins it in
  ``preexec_fn``, before it can fork.
* Closing a ``TrackedProcess`` never waits for EOF on its pipes (``_pipes``), so a
  grandchild holding stdout cannot hang it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any, Final, TypeAlias, TypedDict, Unpack

import anyio
import anyio.abc
import anyio.lowlevel

from kill_switch._vocabulary._audit_event import PROCESS_STARTED
from kill_switch._vocabulary._validate import positive_int

from ._adopt import adopt, own_spawn
from ._escalation import EscalationPolicy, TrackedGroup, check_policy
from ._pipes import ReceiveStream, SendStream
from ._process_plane import TRACKING_ENV, plane_for

if TYPE_CHECKING:
    from kill_switch._vocabulary._plane import PlaneHost

PIPE: Final = subprocess.PIPE
STDOUT: Final = subprocess.STDOUT
DEVNULL: Final = subprocess.DEVNULL


#: Argument types of ``open_process`` / ``run_process`` (as ``anyio.open_process``).
Command: TypeAlias = str | bytes | Sequence[str | bytes | os.PathLike[str]]
StdIO: TypeAlias = int | IO[Any] | None
PathArg: TypeAlias = str | bytes | os.PathLike[str] | None
GroupList: TypeAlias = Iterable[str | int] | None
Fds: TypeAlias = Sequence[int]
CompletedProcess = subprocess.CompletedProcess


class ProcessArgs(TypedDict, total=False):
    """The keyword arguments ``open_process`` and ``run_process`` share (as in
    ``anyio.open_process``, plus ``escalation``); passed on with ``Unpack`` so that they
    are written once (trio's ``GeneralProcessArgs``)."""

    stdin: StdIO
    stdout: StdIO
    stderr: StdIO
    cwd: PathArg
    env: Mapping[str, str] | None
    pass_fds: Fds
    user: str | int | None
    group: str | int | None
    extra_groups: GroupList
    umask: int
    escalation: EscalationPolicy | None


# ------------------------------------------------------------------ the process object


class TrackedProcess(anyio.abc.Process):
    """A subprocess in its own process group, stopped with its session.

    Usable like anyio's ``Process``. ``aclose()`` closes the pipes (without waiting for
    EOF) and waits for the process; cancelled (not by the session's interrupt, which
    stops the process through its ladder), it SIGKILLs the whole group and waits for it,
    shielded and bounded by the policy's ``kill_timeout``.
    """

    def __init__(self, group: TrackedGroup, popen: subprocess.Popen[bytes]) -> None:
        self._group = group
        self._stdin = SendStream(popen.stdin) if popen.stdin is not None else None
        self._stdout = ReceiveStream(popen.stdout) if popen.stdout is not None else None
        self._stderr = ReceiveStream(popen.stderr) if popen.stderr is not None else None

    def __repr__(self) -> str:
        return f"<TrackedProcess pid={self.pid} pgid={self.pgid} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        return self._group.pid

    @property
    def pgid(self) -> int | None:
        """The process group the session's interrupt signals."""
        return self._group.pgid

    @property
    def returncode(self) -> int | None:
        return self._group.returncode

    @property
    def stdin(self) -> anyio.abc.ByteSendStream | None:
        return self._stdin

    @property
    def stdout(self) -> anyio.abc.ByteReceiveStream | None:
        return self._stdout

    @property
    def stderr(self) -> anyio.abc.ByteReceiveStream | None:
        return self._stderr

    async def wait(self) -> int:
        """Wait until the process exits (not its pipes: a grandchild may hold them).

        A checkpoint. Raises ``RuntimeError`` if the exit status could not be collected.
        """
        group = self._group
        if group.reaped:
            await anyio.lowlevel.checkpoint()
        else:
            if group.exited is None:
                group.exited = anyio.Event()
            await group.exited.wait()
        if group.returncode is None:
            raise RuntimeError(f"exit status of process {self.pid} is unknown: {group.error}")
        return group.returncode

    def send_signal(self, sig: signal.Signals) -> None:
        """Send *sig* to the process (not its group), unless it has exited."""
        self._group.leader.send(sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _kill_group(self) -> None:
        group = self._group
        if group.reaped or group.stage != "running":
            return
        group.signal(signal.SIGKILL)

    def close_pipes(self) -> None:
        """Close the pipe ends now, without waiting for EOF (the plane, after a stop)."""
        for stream in (self._stdin, self._stdout, self._stderr):
            if stream is not None:
                stream.close()

    async def aclose(self) -> None:
        self.close_pipes()
        try:
            await self.wait()
        except BaseException:
            if not self._group.plane.delivered:
                # Cancelled by someone other than the interrupt (a timeout, say): take
                # the whole group down, not just the child as anyio does.
                self._kill_group()
                with anyio.move_on_after(self._group.policy.kill_timeout, shield=True):
                    await self.wait()
            raise


# ------------------------------------------------------------------------ entry points


def _check_command(command: object) -> tuple[str | bytes | Sequence[Any], bool, tuple[str, ...]]:
    if isinstance(command, (str, bytes)):
        if not command.strip():
            raise ValueError("command must not be empty")
        return command, True, (os.fsdecode(command),)
    if isinstance(command, os.PathLike):
        return [command], False, (os.fsdecode(command),)
    if not isinstance(command, Sequence):
        raise TypeError(
            f"command must be a str or a sequence of str/bytes/paths, not {type(command).__name__}"
        )
    args = list(command)
    if not args:
        raise ValueError("command must not be empty")
    for arg in args:
        if not isinstance(arg, (str, bytes, os.PathLike)):
            raise TypeError(f"command arguments must be str, bytes or paths, not {arg!r}")
    return args, False, tuple(os.fsdecode(a) for a in args)


async def open_process(
    session: PlaneHost,
    command: str | bytes | Sequence[str | bytes | os.PathLike[str]],
    *,
    stdin: int | IO[Any] | None = PIPE,
    stdout: int | IO[Any] | None = PIPE,
    stderr: int | IO[Any] | None = PIPE,
    cwd: str | bytes | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    user: str | int | None = None,
    group: str | int | None = None,
    extra_groups: Iterable[str | int] | None = None,
    umask: int = -1,
    escalation: EscalationPolicy | None = None,
) -> TrackedProcess:
    """Start *command* in a new process group that *session*'s interrupt stops.

    A checkpoint before the process starts, none after: once it runs, it is tracked,
    so a cancellation can never orphan it.

    Raises:
        ValueError / TypeError: an empty or malformed command, a bad policy.
        OSError: the command could not be started (``FileNotFoundError``, ...).
        Interrupted: the session was interrupted; nothing was started.
    """
    args, shell, shown = _check_command(command)
    policy = check_policy(escalation)
    await anyio.lowlevel.checkpoint_if_cancelled()
    plane = plane_for(session, policy)
    child_env = dict(os.environ if env is None else env)
    child_env[TRACKING_ENV] = session.id
    cg = plane.ensure_cgroup()

    def spawn(preexec: Callable[[], None] | None) -> subprocess.Popen[bytes]:
        # Popen on the loop thread, as asyncio's own subprocess transport does: fork+exec
        # is quick, and with no await after it a started process is always tracked. Not
        # seen by the spawn hook (``_adopt``): it is tracked here, as a group of its own.
        with own_spawn():
            return subprocess.Popen(
                args,
                shell=shell,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                env=child_env,
                pass_fds=pass_fds,
                user=user,
                group=group,
                extra_groups=extra_groups,
                umask=umask,
                start_new_session=True,
                # preexec_fn is one write(2) into cgroup.procs: the child is in the cgroup
                # before it can fork (Python 3.11 has no clone3(CLONE_INTO_CGROUP)).
                preexec_fn=preexec,
            )

    try:
        if cg is not None:
            try:
                popen = spawn(cg.enter_from_child)
            except subprocess.SubprocessError as exc:
                # The child could not enter the cgroup: fall back and say so.
                plane.cgroup_failed(f"a child could not join the cgroup: {exc}")
                popen = spawn(None)
        else:
            popen = spawn(None)
    except BaseException:
        # Nothing started: the cgroup stays for the session (dropped if it fell back).
        plane.release_idle_cgroup()
        raise
    tracked = TrackedGroup(
        plane, popen.pid, pgid=popen.pid, command=shown, own=True, policy=policy, popen=popen
    )
    process = TrackedProcess(tracked, popen)
    tracked.process = process
    plane.record(
        PROCESS_STARTED,
        {
            "pid": popen.pid,
            "pgid": popen.pid,
            "command": list(shown),
            "containment": plane.containment,
        },
    )
    plane.track(tracked)
    return process


def track_pid(session: PlaneHost, pid: int, *, escalation: EscalationPolicy | None = None) -> None:
    """Adopt *pid*, started by other means, so that *session*'s interrupt stops it.

    Its process group is signalled only if *pid* leads it (and it is not ours); its
    descendants are found when the interrupt comes. It is not reaped here (its parent
    does that); its exit status is read when it is a child of this process.

    Raises:
        TypeError / ValueError: *pid* is not a positive int, or is this process.
        ProcessLookupError: no such process.
        Interrupted: the session was interrupted.
    """
    positive_int("pid", pid)
    if pid <= 1 or pid == os.getpid():
        raise ValueError(f"cannot track pid {pid}")
    policy = check_policy(escalation)
    plane = plane_for(session, policy)
    if not adopt(plane, pid, policy):
        raise ProcessLookupError(f"no process {pid}")


async def run_process(
    session: PlaneHost,
    command: Command,
    *,
    input: bytes | None = None,
    check: bool = True,
    **options: Unpack[ProcessArgs],
) -> subprocess.CompletedProcess[bytes]:
    """Run *command* to completion in a tracked process group and collect its output.

    Returns when the process exits, even if a grandchild still holds its stdout: what is
    in the pipes then is collected, later output of descendants is not.

    Raises:
        subprocess.CalledProcessError: *check* and a nonzero exit status.
        ValueError: both *stdin* and *input* given; see ``open_process``.
    """
    stdin: StdIO = options.pop("stdin", None)
    stdout = options.setdefault("stdout", PIPE)
    stderr = options.setdefault("stderr", PIPE)
    if stdin is not None and input is not None:
        raise ValueError("only one of stdin and input is allowed")
    output = BytesIO()
    errors = BytesIO()

    async def drain(stream: anyio.abc.ByteReceiveStream, sink: BytesIO) -> None:
        async for chunk in stream:
            sink.write(chunk)

    async def feed(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(data)
        await stream.aclose()

    options["stdin"] = PIPE if input else stdin
    async with await open_process(session, command, **options) as process:
        async with anyio.create_task_group() as tg:
            if process._stdout is not None:
                tg.start_soon(drain, process._stdout, output)
            if process._stderr is not None:
                tg.start_soon(drain, process._stderr, errors)
            if process._stdin is not None and input:
                tg.start_soon(feed, process._stdin, input)
            await process.wait()
            tg.cancel_scope.cancel()
        # The leader has exited: take what is in the pipes, never wait for an EOF that
        # a surviving grandchild may hold back.
        if process._stdout is not None:
            output.write(process._stdout.read_available())
        if process._stderr is not None:
            errors.write(process._stderr.read_available())
    returncode = process.returncode
    assert returncode is not None
    out = output.getvalue() if stdout == PIPE else None
    err = errors.getvalue() if stderr == PIPE else None
    if check and returncode != 0:
        raise subprocess.CalledProcessError(returncode, command, out, err)
    return subprocess.CompletedProcess(command, returncode, out, err)
