"""Two `paretoken search` processes write the same study at once, on a journal file and on a real
PostgreSQL server (Debian's postgresql, started by the fixture on loopback): no trial is lost or duplicated."""
from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from paretoken.search.storage import open_storage

TRIALS = 10


def _postgres_bin() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").is_file() and Path(candidate, "pg_ctl").is_file():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 (initdb into a temporary directory, run as a
    non-root user when the tests run as root), with database ``paretoken``."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin; Debian package postgresql)")
    root = Path(tempfile.mkdtemp(prefix="paretoken-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        import pwd

        for user in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                continue
            os.chown(root, entry.pw_uid, entry.pw_gid)
            prefix = ["runuser", "-u", user, "--"]
            break
        else:
            pytest.skip("running as root and no 'postgres' or 'nobody' user to run the server")
    data, port = root / "data", _free_port()

    def run(*args):
        done = subprocess.run(prefix + [str(a) for a in args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]} failed: {done.stdout}{done.stderr}"

    run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60", "-o",
        f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100", "start")
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE paretoken")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/paretoken"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _command(storage, checkpoint, seed):
    return [sys.executable, "-m", "paretoken.cli", "search", "--study", "shared", "--storage", storage,
            "--space", "evit", "--trials", str(TRIALS), "--checkpoint", checkpoint, "--images", "16",
            "--batch-size", "16", "--no-speed", "--heartbeat", "2", "--seed", str(seed)]


def _two_processes_share_one_study(storage, checkpoint, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # the same seed on purpose: trial-number seeding keeps the two samplers from proposing the same plans
    procs = [subprocess.Popen(_command(storage, checkpoint, seed=0), cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, out
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    # the target is shared; a simultaneous last ask in both processes may add one trial
    assert TRIALS <= len(complete) <= TRIALS + 1 and len(complete) == len(trials)
    # every trial a process reported is in the study, each reported by exactly one process
    reported = [set(map(int, re.findall(r"^trial +(\d+) COMPLETE", out, re.M))) for out in outputs]
    assert not reported[0] & reported[1]
    assert reported[0] | reported[1] == {t.number for t in complete}
    assert all(reported), "both processes ran trials"
    assert len({t.user_attrs["worker_pid"] for t in complete}) == 2
    # each published schedule was enqueued and ran once, though both processes started the study
    presets = sorted(t.user_attrs["preset"] for t in complete if t.user_attrs.get("preset"))
    assert presets == ["evit-0.5", "evit-0.7", "uncompressed"]
    # the two samplers did not propose the same plans
    plans = [repr(t.user_attrs["plan"]) for t in complete]
    assert len(set(plans)) >= len(plans) - 1
    for t in complete:
        assert {"plan", "top1", "gflops", "device", "duration_s", "versions", "worker_pid"} <= set(t.user_attrs)


def test_two_processes_on_a_journal_file(checkpoint, tmp_path):
    _two_processes_share_one_study(f"journal:{tmp_path}/shared.log", checkpoint, tmp_path)


def test_two_processes_on_postgresql(postgres_url, checkpoint, tmp_path):
    _two_processes_share_one_study(postgres_url, checkpoint, tmp_path)
    # a stopped server is one line, not a traceback
    port = int(postgres_url.rsplit(":", 1)[1].split("/")[0])
    bad = postgres_url.replace(f":{port}/", f":{_free_port()}/")
    done = subprocess.run([sys.executable, "-m", "paretoken.cli", "search", "--study", "x", "--storage", bad,
                           "--trials", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "storage: cannot open" in done.stderr


def test_reading_a_postgresql_database_without_studies_creates_nothing(postgres_url):
    import psycopg2

    port = int(postgres_url.rsplit(":", 1)[1].split("/")[0])
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE empty")
    conn.close()
    empty = postgres_url.rsplit("/", 1)[0] + "/empty"
    done = subprocess.run([sys.executable, "-m", "paretoken.cli", "front", "--study", "x", "--storage", empty],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"storage: {empty} holds no Optuna studies" in done.stderr
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="empty")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert cur.fetchone()[0] == 0
    conn.close()


def test_a_halving_search_on_ray_workers_with_postgresql(postgres_url, checkpoint, tmp_path, monkeypatch):
    """Successive halving on the Ray backend (two workers) with the study in PostgreSQL: each trial's
    rungs are recorded, its rungs run on Ray workers, and a promoted plan reaches all images."""
    pytest.importorskip("ray")
    from paretoken.evaluators.evaluate import EvalConfig
    from paretoken.search import run_search

    monkeypatch.chdir(tmp_path)
    config = EvalConfig(checkpoint=checkpoint, images=16, batch_size=16, speed=False, flops_images=2)
    result = run_search("halving", storage=postgres_url, space="evit", n_trials=4, backend="ray", workers=2,
                        cpus_per_trial=1, eval_config=config, presets=False, min_images=4, eta=2, log=lambda _: None)
    trials = optuna.load_study(study_name="halving", storage=open_storage(postgres_url)).get_trials()
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert os.getpid() not in {t.user_attrs["worker_pid"] for t in trials}
    for t in trials:
        rungs = [e["images"] for e in t.user_attrs["rungs"]]
        assert rungs == [4, 8, 16][:len(rungs)] and t.user_attrs["images"] == rungs[-1]
    assert trials[0].user_attrs["preset"] == "uncompressed" and trials[0].user_attrs["images"] == 16
    assert result.study.user_attrs["paretoken"]["min_images"] == 4
