"""Contract: every hostile program comes back as a failed sample in bounded time, the host and the
trainer untouched; a well-behaved program's stdout, stderr and exit code come back exactly."""

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest

from megatron_vp2o.rewards import sandbox
from megatron_vp2o.rewards.sandbox import SandboxLimits, SandboxUnavailable, run_many, run_python

_BWRAP_PROBLEM = sandbox.bwrap_problem()
needs_bwrap = pytest.mark.skipif(_BWRAP_PROBLEM is not None, reason=f"no bwrap: {_BWRAP_PROBLEM}")
FAST = SandboxLimits(timeout_s=1.0, memory_mb=256, max_output_bytes=4096)


def _marked_processes(marker: str) -> list[int]:
    """Host pids whose command line contains `marker` (processes a sandbox left behind)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.parametrize("mode", [pytest.param("bwrap", marks=needs_bwrap), "unconfined"])
def test_normal_program_round_trips_exactly(mode):
    src = "import sys\ndata = sys.stdin.read()\nprint(data[::-1], end='')\n" \
          "print('warn', file=sys.stderr)\nsys.exit(3)\n"
    res = run_python(src, stdin="héllo\nworld", mode=mode)
    assert (res.stdout, res.stderr, res.exit_code) == ("dlrow\nolléh", "warn\n", 3)
    assert not res.timed_out and not res.output_truncated and res.error is None
    assert res.confined == (mode == "bwrap")
    assert run_python("print(6 * 7)", mode=mode).ok


@pytest.mark.parametrize("mode", [pytest.param("bwrap", marks=needs_bwrap), "unconfined"])
def test_infinite_loop_times_out(mode):
    start = time.monotonic()
    res = run_python("while True:\n    pass\n", limits=FAST, mode=mode)
    assert res.timed_out and not res.ok and res.error == "timeout"
    assert time.monotonic() - start < FAST.timeout_s + 2.0


@needs_bwrap
def test_fork_bomb_is_capped_and_fully_killed():
    marker = f"bomb-{uuid.uuid4().hex}"
    src = ("import os, sys\n"
           f"if len(sys.argv) < 2:\n    os.execv(sys.executable, [sys.executable, '-I', 'main.py', '{marker}'])\n"
           "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    start = time.monotonic()
    res = run_python(src, limits=FAST)
    assert not res.ok and res.timed_out
    assert time.monotonic() - start < FAST.timeout_s + 3.0
    deadline = time.monotonic() + 2.0  # namespace teardown is asynchronous, but quick
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marked_processes(marker) == []


@needs_bwrap
def test_memory_hog_fails_fast():
    res = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n",
                     limits=SandboxLimits(timeout_s=5.0, memory_mb=128))
    assert not res.ok and not res.timed_out
    assert "MemoryError" in res.stderr


@needs_bwrap
def test_background_child_does_not_outlive_the_run():
    marker = f"{uuid.uuid4().int % 10**6 + 10**6}.5"
    res = run_python(f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nprint('ok')\n",
                     limits=FAST)
    assert res.stdout == "ok\n" and res.wall_s < FAST.timeout_s
    time.sleep(0.2)
    assert _marked_processes(f"sleep\0{marker}") == []


@needs_bwrap
def test_writes_outside_the_sandbox_never_reach_the_host(tmp_path):
    name = f"vp2o-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", os.path.join(os.path.expanduser("~"), name),
               str(tmp_path / name), os.path.join(os.path.dirname(__file__), name),
               f"/var/tmp/{name}"]
    src = "import os\n" + "".join(
        f"try:\n    open({t!r}, 'w').write('x')\n    print('wrote', {t!r})\n"
        f"except OSError as e:\n    print('denied', e)\n" for t in targets)
    src += f"open(os.path.expanduser('~/{name}'), 'w').write('x')\n"
    res = run_python(src, limits=FAST)
    assert res.exit_code == 0, res.stderr  # writing to its private /tmp and home is allowed...
    for target in targets:
        assert not os.path.exists(target), target  # ...but nothing reaches the host


@needs_bwrap
def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    src = ("import socket\ns = socket.socket()\ns.settimeout(0.5)\n"
           f"s.connect(('127.0.0.1', {port}))\nprint('connected')\n")
    try:
        res = run_python(src, limits=FAST)
        with pytest.raises(BlockingIOError):
            server.accept()  # no connection ever arrived
    finally:
        server.close()
    assert not res.ok and "connected" not in res.stdout
    assert "ConnectionRefusedError" in res.stderr or "OSError" in res.stderr


@pytest.mark.parametrize("mode", [pytest.param("bwrap", marks=needs_bwrap), "unconfined"])
def test_trainer_environment_is_invisible(monkeypatch, mode):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("VP2O_TEST_SECRET", secret)
    src = ("import os\nprint(dict(os.environ))\n"
           f"for pid in ['self', '1', '{os.getpid()}', '{os.getppid()}'] + os.listdir('/proc'):\n"
           "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
           "    except OSError:\n        pass\n")
    res = run_python(src, limits=SandboxLimits(timeout_s=5.0, max_output_bytes=1 << 20), mode=mode)
    assert res.exit_code == 0, res.stderr
    assert "PATH" in res.stdout and secret not in res.stdout + res.stderr
    assert "VP2O_TEST_SECRET" not in res.stdout


@needs_bwrap
def test_cannot_kill_parent_or_trainer():
    # Same uid as the sandboxed program: only the PID namespace keeps it out of reach.
    victim = subprocess.Popen(["sleep", "30"], **sandbox._run_as())
    try:
        src = ("import os, signal\n"
               "for pid in (%d, %d, -1, os.getppid()):\n"
               "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
               % (victim.pid, os.getpid()))
        res = run_python(src, limits=FAST)
        assert res.wall_s < FAST.timeout_s + 1.0
        assert victim.poll() is None  # a host process the program tried to kill is alive
        assert run_python("print('still fine')", limits=FAST).stdout == "still fine\n"
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("mode", [pytest.param("bwrap", marks=needs_bwrap), "unconfined"])
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_is_capped(mode, stream):
    res = run_python(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 1000)\n",
                     limits=FAST, mode=mode)
    assert res.output_truncated and not res.ok and not res.timed_out
    assert len(getattr(res, stream)) == FAST.max_output_bytes
    assert res.wall_s < FAST.timeout_s


def test_missing_bwrap_names_the_fix(monkeypatch):
    python = sandbox._default_python()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, path=None: None)
    monkeypatch.delenv(sandbox.UNCONFINED_ENV, raising=False)
    monkeypatch.delenv(sandbox.NO_BWRAP_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap") as info:
        run_python("print(1)")
    assert sandbox.UNCONFINED_ENV in str(info.value) and "allow_unconfined" in str(info.value)
    res = run_python("print(1)", allow_unconfined=True, python=python)
    assert res.stdout == "1\n" and not res.confined
    monkeypatch.setenv(sandbox.UNCONFINED_ENV, "1")
    assert not run_python("print(1)", python=python).confined
    with pytest.raises(SandboxUnavailable):
        run_python("print(1)", mode="bwrap")
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, path=None: "/bin/false")
    with pytest.raises(SandboxUnavailable, match="bwrap exited 1.*user namespaces"):
        run_python("print(1)", mode="bwrap")  # installed but unable to run: a different fix


def test_hidden_bwrap_acts_as_missing(monkeypatch):
    """VP2O_SANDBOX_NO_BWRAP=1: the no-sandbox path on any machine (the same refusal, the same opt-in)."""
    monkeypatch.setenv(sandbox.NO_BWRAP_ENV, "1")
    monkeypatch.delenv(sandbox.UNCONFINED_ENV, raising=False)
    assert sandbox.find_bwrap() is None and "not found" in sandbox.bwrap_problem()
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        sandbox.check_available()
    monkeypatch.setenv(sandbox.UNCONFINED_ENV, "1")
    sandbox.check_available()
    res = run_python("print(6 * 7)", python=sandbox._default_python())
    assert res.stdout == "42\n" and not res.confined


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="mode"):
        run_python("print(1)", mode="chroot")


@needs_bwrap
def test_run_many_keeps_order_and_bounds_concurrency():
    src = "import time\nt0 = time.time()\ntime.sleep(0.3)\nprint(t0, time.time(), {i})\n"
    results = run_many([{"source": src.format(i=i), "timeout_s": 5.0} for i in range(6)],
                       max_workers=16)
    spans = [tuple(float(x) for x in r.stdout.split()) for r in results]
    assert [int(s[2]) for s in spans] == list(range(6))
    peak = max(sum(a <= t < b for a, b, _ in spans) for t, _, _ in spans)
    assert 1 <= peak <= sandbox.max_concurrent()
    assert run_many([]) == []
