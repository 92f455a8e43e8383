"""A single-node slurm cluster for tests, started as root from Debian's ``slurm-wlm`` and ``munge``.

:func:`start` installs the packages when they are missing (``apt-get install``; only as root),
writes a ``slurm.conf`` into a temp directory (``proctrack/linuxproc``, ``task/none``,
``select/cons_tres``, ports 16817/16818 unless taken, one node with this machine's CPUs and memory
as ``slurmd -C`` reports them), starts its own ``munged`` (own key and socket), ``slurmctld`` and
``slurmd`` in the foreground as child processes, and waits until the node is idle. It returns a
:class:`LocalSlurm` whose ``env`` (``SLURM_CONF``) the slurm client commands need, or raises
:class:`Unavailable` with the reason (the fixture turns that into a skip). :meth:`LocalSlurm.stop`
ends exactly the daemons it started.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


class Unavailable(RuntimeError):
    """Local slurm cannot run here (the message says why)."""


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports() -> tuple[int, int]:
    for base in range(16817, 17817, 10):
        if _port_free(base) and _port_free(base + 1):
            return base, base + 1
    raise Unavailable("no free port pair for slurmctld/slurmd in 16817..17817")


def ensure_packages(timeout_s: float = 600) -> None:
    """apt-get install slurm-wlm and munge when their daemons are missing (root only)."""
    if all(shutil.which(d, path="/usr/sbin:/usr/bin:/sbin:/bin") for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise Unavailable("slurm-wlm/munge are not installed and installing them needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("slurm-wlm/munge are not installed and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    for attempt in (cmd, None):
        if attempt is None:  # the package lists may be missing: update once, then retry
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=timeout_s)
            attempt = cmd
        proc = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode == 0 and all(shutil.which(d, path="/usr/sbin:/usr/bin") for d in DAEMONS):
            return
    raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-300:]}")


@dataclass
class LocalSlurm:
    root: Path
    env: dict
    node: str
    cpus: int
    procs: list = field(default_factory=list)

    def run(self, *cmd, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        match = re.search(r"JobState=(\S+)", out)
        return match.group(1) if match else "UNKNOWN"

    def wait_job(self, job_id: str, timeout_s: float = 300, states=("COMPLETED", "FAILED", "CANCELLED",
                                                                   "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout_s}s")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged: the processes we started
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []


def _node_line() -> tuple[str, int, str]:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((x for x in out.splitlines() if x.startswith("NodeName=")), None)
    if line is None:
        raise Unavailable(f"slurmd -C printed no node line: {out!r}")
    fields = dict(item.split("=", 1) for item in line.split())
    mem = int(fields.get("RealMemory", "1024"))
    fields["RealMemory"] = str(max(mem - 512, 256))  # keep slurmd from draining the node over a few MB
    node = fields["NodeName"]
    return node, int(fields["CPUs"]), " ".join(f"{k}={v}" for k, v in fields.items())


def _conf(root: Path, node_line: str, node: str, ports: tuple[int, int]) -> str:
    return f"""ClusterName=vp2otest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=60
MinJobAge=600
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _wait_idle(slurm: LocalSlurm, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for proc in slurm.procs:
            if proc.poll() is not None:
                raise Unavailable(f"{proc.args[0]} exited with {proc.returncode}:\n{slurm.logs()}")
        out = slurm.run("sinfo", "-h", "-o", "%t", check=False)
        if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
            return
        time.sleep(0.5)
    raise Unavailable(f"slurm node not idle after {timeout_s}s:\n{slurm.logs()}")


def start(root: Path, timeout_s: float = 60) -> LocalSlurm:
    """Install if needed, configure under ``root`` and start munged, slurmctld and slurmd."""
    if os.geteuid() != 0:
        raise Unavailable("the local slurm runs its daemons as root (tests run as uid "
                          f"{os.geteuid()})")
    ensure_packages()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    os.chmod(root, 0o755)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    node, cpus, node_line = _node_line()
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node_line, node, _ports()))
    env = dict(os.environ, SLURM_CONF=str(conf))
    env.pop("SLURM_JOB_ID", None)
    slurm = LocalSlurm(root, env, node, cpus)
    out = open(root / "daemons.out", "ab")
    cmds = [
        ["munged", "-F", "-f", f"--socket={root}/munge.sock", f"--key-file={key}", f"--log-file={root}/munged.log",
         f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed"],
        ["slurmctld", "-D", "-i", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf)],
    ]
    try:
        for cmd in cmds:
            slurm.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True))
            if cmd[0] == "munged":
                _wait_for(root / "munge.sock", 10, slurm)
        _wait_idle(slurm, timeout_s)
    except BaseException:
        slurm.stop()
        raise
    return slurm


def _wait_for(path: Path, timeout_s: float, slurm: LocalSlurm) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and not path.exists():
        if slurm.procs[-1].poll() is not None:
            break
        time.sleep(0.1)
    if not path.exists():
        raise Unavailable(f"munged did not start: {(slurm.root / 'daemons.out').read_text(errors='replace')[-1000:]}")
