#!/usr/bin/env python3
"""A single-node SLURM cluster on localhost for testing `launcher=slurm_local` (root, Debian).

    python scripts/local_slurm.py install   # apt-get install slurm (ctld, d, client), munge, slurmdbd, mariadb
    python scripts/local_slurm.py start     # munged, mariadbd, slurmdbd, slurmctld, slurmd; waits for the node
    python scripts/local_slurm.py env       # the export clients need: eval "$(python scripts/local_slurm.py env)"
    python scripts/local_slurm.py status
    python scripts/local_slurm.py stop      # cancels jobs, stops every daemon by its pid file

No systemd and no cgroups: daemons are started by hand and stopped by pid. Accounting is
real (a private MariaDB on loopback plus slurmdbd), because submitit asks `sacct` how a job
ended. The node advertises ``--fake-gpus`` GPUs (character devices aliasing /dev/null), so a
job asking for a GPU is scheduled and sees CUDA_VISIBLE_DEVICES. Everything lives under
``$LRC_SLURM_DIR`` (default /tmp/lrc-slurm); ports start at ``$LRC_SLURM_PORT`` (default 6900).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("LRC_SLURM_DIR", "/tmp/lrc-slurm"))
PORT = int(os.environ.get("LRC_SLURM_PORT", "6900"))
CLUSTER = "lrc"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
CONF = ROOT / "etc" / "slurm.conf"
MUNGE_SOCKET = ROOT / "munge" / "socket"
PIDS = {"slurmd": ROOT / "run" / "slurmd.pid", "slurmctld": ROOT / "run" / "slurmctld.pid",
        "slurmdbd": ROOT / "run" / "slurmdbd.pid", "mariadbd": ROOT / "db" / "mariadbd.pid",
        "munged": ROOT / "munge" / "munged.pid"}


def say(message: str) -> None:
    print(f"[local_slurm] {message}", file=sys.stderr, flush=True)


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, env={**os.environ, "SLURM_CONF": str(CONF)}, **kwargs)


def ok(*cmd: str) -> bool:
    env = {**os.environ, "SLURM_CONF": str(CONF)}
    return subprocess.run(list(cmd), env=env, capture_output=True).returncode == 0


def wait(what: str, check, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            raise SystemExit(f"[local_slurm] timed out waiting for {what} (logs in {ROOT / 'log'})")
        time.sleep(0.25)


def alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def install(_args) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], check=True, env=env)


def write_config(gpus: int) -> None:
    for sub in ("etc", "state", "spool", "log", "run", "db", "munge", "dev"):
        (ROOT / sub).mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    memory_mb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal"))) // 1024 - 1024
    gres_node, gres_lines = "", ""
    if gpus > 0:
        for i in range(gpus):  # slurm keeps only GPUs with a File= that is a character device
            device = ROOT / "dev" / f"gpu{i}"
            if not device.exists():
                os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))
        (ROOT / "etc" / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={ROOT}/dev/gpu[0-{gpus - 1}]\n")
        gres_node, gres_lines = f" Gres=gpu:{gpus}", "GresTypes=gpu\nAccountingStorageTRES=gres/gpu\n"
    else:
        (ROOT / "etc" / "gres.conf").unlink(missing_ok=True)
    CONF.write_text(f"""ClusterName={CLUSTER}
SlurmctldHost=localhost
SlurmctldPort={PORT}
SlurmdPort={PORT + 1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={MUNGE_SOCKET}
StateSaveLocation={ROOT}/state
SlurmdSpoolDir={ROOT}/spool
SlurmctldPidFile={PIDS['slurmctld']}
SlurmdPidFile={PIDS['slurmd']}
SlurmctldLogFile={ROOT}/log/slurmctld.log
SlurmdLogFile={ROOT}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=3600
KillWait=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={PORT + 2}
AccountingStoragePass={MUNGE_SOCKET}
JobAcctGatherType=jobacct_gather/linux
{gres_lines}NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN{gres_node}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    dbd = ROOT / "etc" / "slurmdbd.conf"  # slurmdbd reads it from beside slurm.conf
    dbd.write_text(f"""AuthType=auth/munge
AuthInfo=socket={MUNGE_SOCKET}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={PORT + 2}
SlurmUser=root
LogFile={ROOT}/log/slurmdbd.log
PidFile={PIDS['slurmdbd']}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={PORT + 3}
StorageUser=slurm
StoragePass=lrc-local
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)  # slurmdbd refuses a readable file holding a password


def start_munge() -> None:
    key = ROOT / "munge" / "key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
    for path in (ROOT, ROOT / "munge"):
        path.chmod(0o755)  # munged wants the socket's folders traversable
    if not alive(PIDS["munged"]):
        run("munged", f"--socket={MUNGE_SOCKET}", f"--key-file={key}", f"--pid-file={PIDS['munged']}",
            f"--log-file={ROOT}/log/munged.log", f"--seed-file={ROOT}/munge/seed")
    wait("munged", lambda: ok("bash", "-c", f"munge -n -S {MUNGE_SOCKET} | unmunge -S {MUNGE_SOCKET}"))


def start_database() -> None:
    data, sock = ROOT / "db" / "data", ROOT / "db" / "socket"
    if not (data / "mysql").exists():
        run("mariadb-install-db", "--user=root", f"--datadir={data}", "--auth-root-authentication-method=socket",
            "--skip-test-db", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not alive(PIDS["mariadbd"]):
        subprocess.Popen(["mariadbd", "--user=root", f"--datadir={data}", f"--socket={sock}",
                          f"--pid-file={PIDS['mariadbd']}", "--bind-address=127.0.0.1", f"--port={PORT + 3}",
                          "--skip-name-resolve", f"--log-error={ROOT}/log/mariadb.log"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait("mariadbd", lambda: ok("mariadb", "-S", str(sock), "-uroot", "-e", "select 1"))
    run("mariadb", "-S", str(sock), "-uroot", "-e",
        "CREATE DATABASE IF NOT EXISTS slurm_acct_db; "
        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'lrc-local'; "
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")


def start(args) -> None:
    if not shutil.which("slurmctld") or not shutil.which("mariadbd"):
        raise SystemExit("[local_slurm] slurm is not installed: run `python scripts/local_slurm.py install` "
                         "(after apt-get update)")
    started = time.monotonic()
    write_config(args.fake_gpus)
    start_munge()
    start_database()
    if not alive(PIDS["slurmdbd"]):
        run("slurmdbd")
    wait("slurmdbd", lambda: ok("sacctmgr", "-n", "show", "cluster"))
    if CLUSTER not in subprocess.run(["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"],
                                     capture_output=True, text=True,
                                     env={**os.environ, "SLURM_CONF": str(CONF)}).stdout.split():
        run("sacctmgr", "-i", "add", "cluster", CLUSTER, stdout=subprocess.DEVNULL)
    if not alive(PIDS["slurmctld"]):
        run("slurmctld", "-f", str(CONF))
    if not alive(PIDS["slurmd"]):
        run("slurmd", "-f", str(CONF), "-N", "localhost")

    def node_up() -> bool:
        out = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], capture_output=True, text=True,
                             env={**os.environ, "SLURM_CONF": str(CONF)}).stdout
        return out.strip().rstrip("*") in ("idle", "mixed", "allocated")

    wait("the node to become idle", node_up)
    say(f"cluster up in {time.monotonic() - started:.1f} s ({args.fake_gpus} fake GPUs, {ROOT}); "
        f"clients need SLURM_CONF={CONF}")


def stop(_args) -> None:
    if alive(PIDS["slurmctld"]):
        ok("scancel", "--full", "-u", "root")
        wait("jobs to end", lambda: not subprocess.run(
            ["squeue", "-h", "-t", "PD,R,CG"], capture_output=True, text=True,
            env={**os.environ, "SLURM_CONF": str(CONF)}).stdout.strip(), seconds=30)
    for name, pidfile in PIDS.items():
        if alive(pidfile):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            try:
                wait(name, lambda p=pid: not Path(f"/proc/{p}").exists(), seconds=15)
            except SystemExit:
                os.kill(pid, signal.SIGKILL)
            say(f"stopped {name} ({pid})")
        pidfile.unlink(missing_ok=True)


def status(_args) -> None:
    for name, pidfile in PIDS.items():
        print(f"{name}: {'running' if alive(pidfile) else 'stopped'}")
    subprocess.run(["sinfo"], env={**os.environ, "SLURM_CONF": str(CONF)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install").set_defaults(func=install)
    p = sub.add_parser("start")
    p.add_argument("--fake-gpus", type=int, default=1)
    p.set_defaults(func=start)
    sub.add_parser("stop").set_defaults(func=stop)
    sub.add_parser("status").set_defaults(func=status)
    sub.add_parser("env").set_defaults(func=lambda _a: print(f"export SLURM_CONF={CONF}"))
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
