"""Run untrusted, model-written Python programs for code rewards, confined and bounded.

Code rewards execute whatever the policy wrote, in the trainer's process tree. A sample that
loops, forks, allocates, floods its output, writes files, opens sockets, reads the trainer's
secrets or signals the trainer must come back as a failed sample in bounded time, never as a
hung or damaged trainer. `run_python` layers four defences:

  1. bubblewrap (`bwrap`): the host root bound read-only, private size-capped tmpfs over /tmp,
     /var/tmp and the home directories, the working dir /tmp/sandbox on the private /tmp (the
     read-only root has nowhere else to mount one), new network namespace (no network
     at all), new PID namespace (the trainer is invisible and unkillable), --die-with-parent,
     --new-session (no terminal injection), a user namespace with nested user namespaces disabled.
     When the trainer runs as root the sandbox runs as `nobody` (uid 65534): root is exempt from
     RLIMIT_NPROC, an unprivileged uid is not.
  2. rlimits set by a tiny shim that is the sandbox's first program (RLIMIT_CPU, RLIMIT_AS,
     RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, no core files) before it execs the program; a
     shim rather than `preexec_fn`, which is unsafe in the trainer's multi-threaded process.
  3. a cleared environment (PATH, LANG, HOME, TMPDIR only) and `python -I`.
  4. a wall-clock deadline after which the whole process group is SIGKILLed (`os.killpg`); with
     bwrap that also tears down the PID namespace and everything in it. Output is read in chunks
     from the pipes with a selector and the run is killed as soon as a stream passes its cap.

Where bwrap cannot run, `SandboxUnavailable` names the fix (`check_available()` says so up front, for
the CLI pre-flights). VP2O_SANDBOX_NO_BWRAP=1 makes the sandbox act as if bwrap were not installed
(to test the no-sandbox path on a machine that has it). The opt-in unconfined mode
(`allow_unconfined=True` or VP2O_SANDBOX_UNCONFINED=1) keeps defences 2-4 only: its programs can
read and write what their uid can, reach the network, and (if not root) signal the trainer.

`run_many` runs programs concurrently; every run holds one slot of a process-wide semaphore sized
from the CPUs this process may use (override: VP2O_SANDBOX_MAX_PROCS), so concurrent reward calls
never oversubscribe the machine. A run's deadline starts when it gets its slot.
"""

import dataclasses
import functools
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

UNCONFINED_ENV = "VP2O_SANDBOX_UNCONFINED"
MAX_PROCS_ENV = "VP2O_SANDBOX_MAX_PROCS"
NO_BWRAP_ENV = "VP2O_SANDBOX_NO_BWRAP"  # 1: act as if bwrap were not installed
SANDBOX_UID = 65534  # nobody: used only when the trainer runs as root
WORKDIR = "/tmp/sandbox"  # the program's cwd inside bwrap, on the private /tmp tmpfs
_MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
_READ_CHUNK = 65536
_MODES = ("auto", "bwrap", "unconfined")

# First program inside the sandbox: set the rlimits, then exec the real program.
_RLIMIT_SHIM = (
    "import os, resource as r, sys\n"
    "cpu, mem, nproc, fsize = map(int, sys.argv[1:5])\n"
    "for k, soft, hard in ((r.RLIMIT_CPU, cpu, cpu + 1), (r.RLIMIT_AS, mem, mem),\n"
    "                      (r.RLIMIT_NPROC, nproc, nproc), (r.RLIMIT_FSIZE, fsize, fsize),\n"
    "                      (r.RLIMIT_NOFILE, 256, 256), (r.RLIMIT_CORE, 0, 0)):\n"
    "    r.setrlimit(k, (soft, hard))\n"
    "os.execv(sys.argv[5], sys.argv[5:])\n"
)


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot confine programs here and unconfined mode was not opted into."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run produced. `exit_code` is None when the program never started."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    output_truncated: bool = False
    error: str | None = None  # why the run failed outside the program itself
    wall_s: float = 0.0
    confined: bool = True  # False: ran in the weaker unconfined mode

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.output_truncated or self.error)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource caps of one run; every field bounds one way a program can hurt the host."""

    timeout_s: float = 10.0  # wall clock, from the moment the run gets its slot
    memory_mb: int = 512  # RLIMIT_AS (address space) of each process
    max_procs: int = 32  # RLIMIT_NPROC: processes + threads in the sandbox
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file a program may write
    tmpfs_mb: int = 64  # size of each private tmpfs (/tmp with the working dir, homes)
    max_output_bytes: int = 1 << 20  # per stream; the run is killed past it

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "max_procs", "max_file_mb", "tmpfs_mb",
                     "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)}")


def max_concurrent() -> int:
    """How many sandboxed programs may run at once in this process (the semaphore size)."""
    override = os.environ.get(MAX_PROCS_ENV)
    if override:
        return max(1, int(override))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cpus or 1)


_slots_lock = threading.Lock()
_slots_sem: threading.BoundedSemaphore | None = None


def _slots() -> threading.BoundedSemaphore:
    """The process-wide run semaphore, sized by `max_concurrent()` at the first run."""
    global _slots_sem
    with _slots_lock:
        if _slots_sem is None:
            _slots_sem = threading.BoundedSemaphore(max_concurrent())
        return _slots_sem


def _run_as() -> dict:
    """Popen kwargs that drop root to `nobody`; empty for an unprivileged trainer."""
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


def _default_python() -> str:
    """An interpreter the sandbox user can execute (the trainer's may live under /root)."""
    return shutil.which("python3", path=_MINIMAL_PATH) or sys.executable


def _masked_dirs() -> list[str]:
    """Host directories hidden behind a private tmpfs: temp dirs and every home."""
    dirs = ["/tmp", "/var/tmp", "/home", "/root", os.path.expanduser("~")]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d) and d != "/"))


def _bwrap_argv(bwrap: str, script: str, limits: SandboxLimits) -> tuple[list[str], str]:
    """bwrap options for one run; returns (argv prefix up to `--`, HOME inside)."""
    size = str(limits.tmpfs_mb << 20)
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for d in _masked_dirs():
        argv += ["--size", size, "--tmpfs", d]
    home = "/home/sandbox" if os.path.isdir("/home") else "/tmp"
    if home != "/tmp":
        argv += ["--dir", home]
    argv += ["--dir", WORKDIR, "--ro-bind", script, f"{WORKDIR}/main.py", "--chdir", WORKDIR,
             "--unshare-user", "--disable-userns", "--unshare-pid",
             "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--"]
    return argv, home


def _env(home: str) -> dict:
    return {"PATH": _MINIMAL_PATH, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": "/tmp"}


@functools.cache
def _bwrap_problem(bwrap: str | None) -> str | None:
    """Why bwrap cannot confine a program here (None: it can). Probed once per binary."""
    if bwrap is None:
        return "the bwrap executable was not found on PATH"
    with tempfile.TemporaryDirectory(prefix="vp2o-sbx-probe-") as tmp:
        script = _write_script(tmp, "pass\n")
        prefix, home = _bwrap_argv(bwrap, script, SandboxLimits())
        try:
            proc = subprocess.run(prefix + [_default_python(), "-I", "main.py"], env=_env(home),
                                  capture_output=True, timeout=30, **_run_as())
        except (OSError, subprocess.SubprocessError) as err:
            return f"running bwrap failed: {err}"
    if proc.returncode != 0:
        return f"bwrap exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}"
    return None


def _write_script(tmp: str, source: str) -> str:
    path = os.path.join(tmp, "main.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    os.chmod(path, 0o644)
    if os.geteuid() == 0:
        os.chown(tmp, SANDBOX_UID, SANDBOX_UID)
    os.chmod(tmp, 0o755)
    return path


def _opted_in(allow_unconfined: bool = False) -> bool:
    return allow_unconfined or os.environ.get(UNCONFINED_ENV, "") not in ("", "0")


def find_bwrap() -> str | None:
    """The bwrap executable on PATH (None if absent, or hidden by VP2O_SANDBOX_NO_BWRAP=1)."""
    if os.environ.get(NO_BWRAP_ENV, "") not in ("", "0"):
        return None
    return shutil.which("bwrap")


def bwrap_problem() -> str | None:
    """Why bwrap cannot confine a program here (None: it can)."""
    return _bwrap_problem(find_bwrap())


def check_available(allow_unconfined: bool = False) -> None:
    """Raise SandboxUnavailable (naming the fix) if `run_python(mode="auto")` would: bwrap cannot
    run here and the unconfined mode was not opted into."""
    _resolve_mode("auto", allow_unconfined)


def _resolve_mode(mode: str, allow_unconfined: bool) -> bool:
    """True: run under bwrap; False: unconfined. Raises SandboxUnavailable."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode == "unconfined":
        return False
    bwrap = find_bwrap()
    problem = _bwrap_problem(bwrap)
    if problem is None:
        return True
    if mode == "auto" and _opted_in(allow_unconfined):
        return False
    fix = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`)" if bwrap is None
           else "let bwrap create user namespaces (e.g. sysctl kernel.unprivileged_userns_clone=1"
                " or user.max_user_namespaces > 0; in a container, allow unshare/clone)")
    raise SandboxUnavailable(
        f"cannot sandbox untrusted code: {problem}. Fix: {fix}, or accept the weaker unconfined "
        f"mode (rlimits, timeouts and a cleared environment only) with allow_unconfined=True "
        f"or {UNCONFINED_ENV}=1.")


def run_python(source: str, stdin: str = "", timeout_s: float = 10.0, memory_mb: int = 512,
               allow_unconfined: bool = False, *, limits: SandboxLimits | None = None,
               mode: str = "auto", python: str | None = None) -> SandboxResult:
    """Run `source` as `python -I main.py` with `stdin`, confined; never raises for what the
    program does. `limits` overrides `timeout_s`/`memory_mb`; `mode` is "auto" (bwrap, else
    unconfined if opted into), "bwrap" (never unconfined) or "unconfined" (skip bwrap)."""
    limits = limits or SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    confined = _resolve_mode(mode, allow_unconfined)
    python = python or _default_python()
    with tempfile.TemporaryDirectory(prefix="vp2o-sbx-") as tmp, _slots():
        script = _write_script(tmp, source)
        if confined:
            prefix, home = _bwrap_argv(find_bwrap(), script, limits)
            cwd, program = None, "main.py"
        else:
            prefix, home, cwd, program = [], tmp, tmp, script
        cpu_s = math.ceil(limits.timeout_s) + 1
        shim = [python, "-I", "-S", "-c", _RLIMIT_SHIM, str(cpu_s), str(limits.memory_mb << 20),
                str(limits.max_procs), str(limits.max_file_mb << 20)]
        env = _env(home) if confined else {**_env(home), "TMPDIR": tmp}
        argv = prefix + shim + [python, "-I", program]
        result = _execute(argv, env, cwd, stdin.encode(), limits)
    return dataclasses.replace(result, confined=confined)


def _execute(argv: list[str], env: dict, cwd: str | None, stdin: bytes,
             limits: SandboxLimits) -> SandboxResult:
    start = time.monotonic()
    deadline = start + limits.timeout_s
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=cwd, close_fds=True,
                                start_new_session=True, **_run_as())
    except OSError as err:
        return SandboxResult("", "", None, False, error=f"could not start: {err}")
    try:
        out, err, timed_out, truncated = _pump(proc, stdin, deadline, limits.max_output_bytes)
        if not (timed_out or truncated):
            timed_out = not _wait_exited(proc.pid, deadline)
    finally:
        _kill_group(proc.pid)  # the group still exists: proc is not reaped yet
        exit_code = proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    error = "timeout" if timed_out else ("output limit exceeded" if truncated else None)
    return SandboxResult(out.decode(errors="replace"), err.decode(errors="replace"), exit_code,
                         timed_out, truncated, error, time.monotonic() - start)


def _pump(proc: subprocess.Popen, stdin: bytes, deadline: float,
          cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin and read stdout/stderr until both close, the deadline or the cap."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    pending = memoryview(stdin)
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while len(sel.get_map()) > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), True, False
            for key, _ in sel.select(remaining):
                f = key.fileobj
                if f is proc.stdin:
                    pending = _write_some(f, pending)
                    if not pending:
                        sel.unregister(f)
                        f.close()
                    continue
                chunk = os.read(f.fileno(), _READ_CHUNK)
                if not chunk:
                    sel.unregister(f)
                    continue
                buf = bufs[f]
                room = cap - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:
                    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), False, True
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), False, False


def _write_some(f, pending: memoryview) -> memoryview:
    try:
        return pending[os.write(f.fileno(), pending[:_READ_CHUNK]):]
    except BlockingIOError:
        return pending
    except BrokenPipeError:  # the program exited or closed stdin: drop the rest
        return pending[:0]


def _wait_exited(pid: int, deadline: float) -> bool:
    """Wait, without reaping, until `pid` has exited; False if the deadline passes first."""
    while time.monotonic() < deadline:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        time.sleep(0.002)
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_many(jobs: Iterable[Mapping], max_workers: int | None = None) -> list[SandboxResult]:
    """Run many programs concurrently; each job is `run_python` keyword arguments. Results keep
    the jobs' order. At most `max_concurrent()` programs run at once, whatever `max_workers`."""
    jobs = list(jobs)
    if not jobs:
        return []
    workers = min(len(jobs), max_workers or max_concurrent())
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda job: run_python(**job), jobs))
