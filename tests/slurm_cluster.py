"""A real SLURM cluster on one machine for tests: munged, slurmctld and two slurmd as nodes n1, n2.

Needs root and Debian's slurm-wlm + munge (installed with apt-get when missing). Each slurmd runs
in a private mount namespace with its own /etc/hosts so that n1 and n2 resolve (to 127.0.0.1)
inside jobs. Credentials expire after 10 s instead of 120 s: SLURM holds a requeued job back for
that long. Everything lives in a temporary directory and is stopped on exit.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .helpers import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def ensure_installed() -> str | None:
    """None when the daemons are available (installing them if needed), else why not."""
    if os.geteuid() != 0:
        return "needs root to run slurmctld, slurmd and munged"
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if not shutil.which("apt-get"):
        return "slurm is not installed and apt-get is unavailable"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=300)
    res = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                         capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {res.stderr[-500:]}"
    return None


class LocalSlurm:
    def __init__(self, root: Path, nodes=("n1", "n2"), cpus: int = 2):
        self.root, self.nodes, self.cpus = Path(root), nodes, cpus
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalSlurm":
        r = self.root
        for d in ("munge", "ctld", "log", *[f"spool-{n}" for n in self.nodes]):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)  # munged refuses a socket dir without execute for all
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.sock = r / "munge" / "munge.sock"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={self.sock}",
                        f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                        f"--seed-file={r / 'munge' / 'seed'}"], check=True, capture_output=True)
        host = socket.gethostname().split(".")[0]
        ctld_port = free_port()
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={self.cpus} State=UNKNOWN"
            for n in self.nodes)
        self.conf.write_text(f"""ClusterName=xfttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.sock},cred_expire=10
CredType=cred/munge
StateSaveLocation={r / 'ctld'}
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r / 'ctld' / 'slurmctld.pid'}
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
{node_lines}
PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")
        hosts = r / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"127.0.0.1 {n}\n" for n in self.nodes)
                         + f"127.0.0.1 {host}\n")
        self._daemon(["slurmctld", "-D", "-i"], "slurmctld")
        for n in self.nodes:
            script = f"mount --bind {hosts} /etc/hosts && exec slurmd -D -N {n}"
            self._daemon(["unshare", "-m", "--propagation", "private", "sh", "-c", script], f"slurmd-{n}")
        self.wait_idle()
        return self

    def _daemon(self, argv, name):
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.run(["sinfo", "-h", "-o", "%T", "-N"], check=False)
            states = res.stdout.split()
            if len(states) == len(self.nodes) and all(s.startswith("idle") for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout}s: {res.stdout!r} {res.stderr!r}\n{self.logs()}")

    def stop(self) -> None:
        self.run(["scontrol", "shutdown"], check=False)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        pid_file = self.root / "munge" / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # ------------------------------------------------------------------------------ commands
    def run(self, argv, check=True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                             timeout=kw.pop("timeout", 60), **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed: {res.stdout} {res.stderr}")
        return res

    def sbatch(self, script, *args, env: dict | None = None, cwd=None) -> int:
        res = self.run(["sbatch", "--parsable", *args, str(script)], env=env or {}, cwd=cwd)
        return int(res.stdout.strip().split(";")[0])

    def state(self, job: int) -> str:
        res = self.run(["scontrol", "show", "job", str(job)], check=False)
        for tok in res.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def restarts(self, job: int) -> int:
        res = self.run(["scontrol", "show", "job", str(job)], check=False)
        for tok in res.stdout.split():
            if tok.startswith("Restarts="):
                return int(tok.split("=", 1)[1])
        return 0

    def wait(self, job: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.state(job)
            if s in states:
                return s
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout}s\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")[-1500:]
            out.append(f"--- {f.name}\n{text}")
        return "\n".join(out)
