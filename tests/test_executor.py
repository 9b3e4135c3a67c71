"""The Dask executor on a real local cluster (two one-thread worker processes on 127.0.0.1): dependencies from
STEP_IO, the run record, the shared-folder check, and a worker killed in the middle of a step."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from cxrstudy import config, pipeline
from cxrstudy.executor import ClusterError, DaskPool, local_cluster, task_resources, tasks_share_cores
from cxrstudy.pipeline import StepFailed

KERNEL = "python3"
#: This process's environment before any cluster started (a nanny adds its worker settings to its own process's).
ENV_BEFORE = dict(os.environ)


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes with one thread and one CPU each, every socket on 127.0.0.1; stopped at the end."""
    with local_cluster(n_workers=2, cpus_per_task=1) as c:
        yield c


def test_the_local_cluster_listens_on_loopback_only(cluster):
    from distributed import Client

    with Client(cluster) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        pids = client.run(os.getpid)
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    assert len(workers) == 2 and all(a.startswith("tcp://127.0.0.1:") for a in workers)
    assert all(w["nthreads"] == 1 and w["resources"] == {"CPU": 1} for w in workers.values())
    procs = [psutil.Process(p) for p in pids.values()]
    procs += [p.parent() for p in procs]  # the nannies
    listening = [c.laddr.ip for p in procs for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening and set(listening) == {"127.0.0.1"}


def test_steps_depend_on_the_earlier_steps_that_write_what_they_read():
    profile = pipeline.load_profile("smoke")
    deps = pipeline.step_dependencies(profile.steps, Path("/r/smoke"))
    transfers = [s.name for s in profile.steps if s.notebook == "04_transfer"]
    assert deps["00_data"] == [] and deps["01_lungs"] == ["00_data"]
    assert deps["02_features"] == deps["03_decomposition"] == ["00_data", "01_lungs"]
    assert all(deps[t] == ["00_data", "01_lungs", "03_decomposition"] for t in transfers)  # not on each other
    assert deps["05_evaluation"] == ["00_data", "01_lungs", "03_decomposition", *transfers]


def test_tasks_share_cores_when_a_host_runs_more_than_one_at_once():
    one = {"host": "a", "nthreads": 1, "resources": {"CPU": 1}}
    assert tasks_share_cores({"w1": one, "w2": one}, {"CPU": 1})
    assert not tasks_share_cores({"w1": one, "w2": {**one, "host": "b"}}, {"CPU": 1})
    assert not tasks_share_cores({"w1": {**one, "resources": {"CPU": 8}}}, {"CPU": 8})
    assert tasks_share_cores({"w1": {**one, "resources": {"CPU": 8}}}, {"CPU": 4})
    gpus = {f"w{i}": {"host": "node", "nthreads": 1, "resources": {"GPU": 1}} for i in range(2)}
    assert tasks_share_cores(gpus, {"GPU": 1}) and not tasks_share_cores({"w0": gpus["w0"]}, {"GPU": 1})
    assert tasks_share_cores({"w1": {"host": "a", "nthreads": 2}}, None)


def test_each_task_asks_for_a_gpu_where_workers_have_them_else_cpus():
    assert task_resources({"a": {"resources": {"GPU": 1}}, "b": {"resources": {"CPU": 8}}}, 4) == {"GPU": 1}
    assert task_resources({"a": {"resources": {"CPU": 8}}}, 4) == {"CPU": 4}
    assert task_resources({"a": {"resources": {}}}, 4) is None
    with pytest.raises(ClusterError, match="at most 2"):
        task_resources({"a": {"resources": {"CPU": 2}}}, 4)


def make_notebook(path: Path, params: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ]
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def toy(tmp_path: Path) -> dict[str, Path]:
    """A profile of two independent steps: ``quick`` writes its kernel's thread and allocator settings; ``slow`` writes its kernel's and its worker's
    pids, then waits until a release file exists."""
    d = {k: tmp_path / k for k in ("notebooks", "params", "reports")}
    for p in d.values():
        p.mkdir()
    d["release"], d["pids"], d["quick"] = tmp_path / "release", tmp_path / "pids.json", tmp_path / "quick.txt"
    make_notebook(
        d["notebooks"] / "quick.ipynb",
        'out = ""',
        "import json, os\nopen(out, 'w').write(json.dumps({k: os.environ.get(k) for k in "
        "('OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'MALLOC_TRIM_THRESHOLD_', 'CXR_MIRROR')}))",
    )
    make_notebook(
        d["notebooks"] / "slow.ipynb",
        'pids = ""\nrelease = ""',
        "import json, os, time\nfrom pathlib import Path\n"
        "Path(pids).write_text(json.dumps({'kernel': os.getpid(), 'worker': os.getppid()}))\n"
        "t0 = time.time()\nwhile not Path(release).exists() and time.time() - t0 < 120:\n    time.sleep(0.2)",
    )
    (d["params"] / "toy.yaml").write_text(
        "steps:\n"
        f"  - {{notebook: quick, params: {{out: '{tmp_path / 'quick.txt'}'}}}}\n"
        f"  - {{notebook: slow, params: {{pids: '{d['pids']}', release: '{d['release']}'}}}}\n"
    )
    return d


def run_toy(toy: dict[str, Path], **kw) -> dict:
    return pipeline.run_profile(
        "toy",
        kernel=KERNEL,
        params_dir=toy["params"],
        notebooks_dir=toy["notebooks"],
        reports_dir=toy["reports"],
        executor="dask",
        **kw,
    )


def test_a_worker_killed_in_a_step_fails_the_run_cleanly_and_a_rerun_resumes(cluster, toy):
    out = toy["reports"] / "toy"
    stamps = out / ".stamps"

    def kill_slow_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (toy["pids"].is_file() and (stamps / "quick.json").is_file()):
            time.sleep(0.1)
        os.kill(json.loads(toy["pids"].read_text())["worker"], signal.SIGKILL)

    killer = threading.Thread(target=kill_slow_worker, daemon=True)
    killer.start()
    with pytest.raises(StepFailed, match=r"step 'slow' \(slow.ipynb\) did not finish: its worker died"):
        run_toy(toy, scheduler=cluster.scheduler_address)
    killer.join(5)
    assert (stamps / "quick.json").is_file() and not (stamps / "slow.json").exists()
    assert not list(stamps.glob(".*"))  # no half-written stamp beside them
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["executor"]["scheduler"] == cluster.scheduler_address
    assert [(s["name"], s["status"]) for s in record["steps"]] == [("quick", "ran"), ("slow", "failed")]
    assert record["steps"][0]["worker"] in record["executor"]["workers"]
    assert not (out / ".lock").exists()
    kernel = json.loads(toy["pids"].read_text())["kernel"]
    deadline = time.time() + 30  # the orphaned kernel notices its parent is gone and exits
    while psutil.pid_exists(kernel) and psutil.Process(kernel).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, f"the killed worker's kernel {kernel} still runs"
        time.sleep(0.5)

    # The nanny restarts the worker; the re-run keeps the finished step and runs the lost one.
    toy["release"].touch()
    from distributed import Client

    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
    record = run_toy(toy, scheduler=cluster.scheduler_address)
    assert record["status"] == "ok"
    assert [(s["name"], s["status"]) for s in record["steps"]] == [("quick", "cached"), ("slow", "ran")]
    assert (stamps / "slow.json").is_file()


def test_without_a_scheduler_the_run_starts_a_loopback_cluster_of_this_machine(toy):
    toy["release"].touch()
    record = run_toy(toy, workers=2)
    ex = record["executor"]
    assert record["status"] == "ok" and ex["name"] == "dask" and ex["cluster"] == "LocalCluster"
    assert ex["scheduler"].startswith("tcp://127.0.0.1:") and len(ex["workers"]) == 2
    assert ex["task_resources"] == {"CPU": 1}
    for step in record["steps"]:
        assert step["status"] == "ran" and step["worker"] in ex["workers"] and step["seconds"] > 0
        assert step["node"]
    assert (toy["reports"] / "toy" / "html" / "slow.html").is_file()
    # the kernel runs as in the local run: not with the one BLAS thread and malloc trim a Dask nanny sets; the two
    # steps may share the two workers' host, so their idle OpenMP threads sleep (unless the user set a policy)
    local = pipeline.kernel_env(ENV_BEFORE)
    assert ex["tasks_share_cores"] is True
    assert json.loads(toy["quick"].read_text()) == {
        **{k: local.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "CXR_MIRROR")},
        "OMP_WAIT_POLICY": local.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    if "OMP_WAIT_POLICY" not in local:
        assert all(s["omp_wait_policy"] == "PASSIVE" for s in record["steps"])


def test_a_worker_that_does_not_see_the_project_fails_before_any_step(cluster, tmp_path):
    from distributed import Client

    with Client(cluster) as client:
        pool = DaskPool(client, None)
        args = (str(config.MANIFEST_PATH), None, str(Path(pipeline.__file__).parent / "__init__.py"), KERNEL)
        with pytest.raises(ClusterError, match=r"(?s)2 of 2 worker\(s\).*cannot read .*not shared"):
            pool.check_workers(pipeline.worker_problems, str(tmp_path / "elsewhere"), "token", *args)
        token = tmp_path / "token"
        token.write_text("token")
        manifest = tmp_path / "manifest.csv"
        manifest.write_text("image\n")
        args = (str(manifest), "0" * 64, str(Path(pipeline.__file__).resolve().parent / "__init__.py"), KERNEL)
        with pytest.raises(ClusterError, match=r"manifest .* differs from the driver's"):
            pool.check_workers(pipeline.worker_problems, str(token), "token", *args)
        pool.check_workers(pipeline.worker_problems, str(token), "token", *args[:1], None, *args[2:])


def test_a_step_that_raises_on_a_worker_fails_the_run_with_its_cell_error_and_node(cluster, tmp_path):
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir(), params.mkdir()
    make_notebook(nbs / "boom.ipynb", "fail = True", "if fail:\n    raise ValueError('boom on the worker')")
    (params / "bad.yaml").write_text("steps:\n  - boom\n")
    with pytest.raises(StepFailed, match=r"(?s)step 'boom'.*ValueError: boom on the worker.*it ran on node .* worker tcp://127"):
        pipeline.run_profile(
            "bad", kernel=KERNEL, params_dir=params, notebooks_dir=nbs, reports_dir=tmp_path / "reports",
            executor="dask", scheduler=cluster.scheduler_address,
        )
    record = json.loads((tmp_path / "reports" / "bad" / "run.json").read_text())
    assert record["status"] == "failed" and record["steps"][0]["status"] == "failed"
    assert (tmp_path / "reports" / "bad" / "notebooks" / "boom.ipynb").is_file()  # the partial notebook is kept


def test_an_unreachable_scheduler_is_a_clear_error(toy):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(ClusterError, match="cannot reach the Dask scheduler tcp://127.0.0.1:9"):
            run_toy(toy, scheduler="tcp://127.0.0.1:9")
    assert not (toy["reports"] / "toy" / ".lock").exists()


def test_the_driver_starts_the_longest_expected_steps_first_and_no_more_than_the_cluster_runs(cluster, tmp_path):
    nbs, params, log = tmp_path / "notebooks", tmp_path / "params", tmp_path / "log"
    for d in (nbs, params, log):
        d.mkdir()
    # no clocks: b and c wait for each other to start (so both must run at once), and each step logs which
    # steps had started and ended before it began
    make_notebook(
        nbs / "hold.ipynb",
        'name = ""\nlog = ""\npartner = ""',
        "import json, time\nfrom pathlib import Path\nlog = Path(log)\n"
        "started, ended = sorted(p.stem for p in log.glob('*.start')), sorted(p.stem for p in log.glob('*.end'))\n"
        "(log / f'{name}.start').touch()\nt0 = time.time()\n"
        "while partner and not (log / f'{partner}.start').exists() and time.time() - t0 < 60:\n    time.sleep(0.1)\n"
        "met = bool(partner) and (log / f'{partner}.start').exists()\n"
        "(log / f'{name}.json').write_text(json.dumps({'started': started, 'ended': ended, 'met': met}))\n"
        "(log / f'{name}.end').touch()",
    )
    partners = {"a": "", "b": "c", "c": "b"}
    (params / "three.yaml").write_text("steps:\n" + "".join(
        f"  - {{notebook: hold, name: {n}, params: {{name: {n}, log: '{log}', partner: '{partners[n]}'}}}}\n" for n in "abc"
    ))
    timings = tmp_path / "earlier.json"  # an earlier run in which c took longest and a was quickest
    timings.write_text(json.dumps({"steps": [
        {"name": "a", "status": "ran", "seconds": 10.0},
        {"name": "b", "status": "cached", "seconds": 20.0},
        {"name": "c", "status": "ran", "seconds": 30.0},
    ]}))
    before = len(cluster.scheduler.transition_log)
    record = pipeline.run_profile(
        "three", kernel=KERNEL, params_dir=params, notebooks_dir=nbs, reports_dir=tmp_path / "reports",
        executor="dask", scheduler=cluster.scheduler_address, timings=timings,
    )
    seen = {n: json.loads((log / f"{n}.json").read_text()) for n in "abc"}
    # two workers: c and b run at once, and a starts after both
    assert seen["b"]["met"] and seen["c"]["met"]
    assert {"b", "c"} <= set(seen["a"]["started"]) and seen["a"]["ended"]
    # the scheduler first heard of a after b or c had finished: the driver held it back
    moves = [(t.key.split("-")[0], t.finish) for t in list(cluster.scheduler.transition_log)[before:]]
    first_heard = [name for name, _ in moves].index("a")
    assert ("b", "memory") in moves[:first_heard] or ("c", "memory") in moves[:first_heard]
    assert record["executor"]["order"] == {"rule": "longest expected first", "timings": [str(timings)]}
    assert [(s["name"], s["expected_seconds"]) for s in record["steps"]] == [("a", 10.0), ("b", 20.0), ("c", 30.0)]
    with pytest.raises(pipeline.ProfileError, match=r"timings .*missing.json: not a readable run.json"):
        pipeline.run_profile(
            "three", kernel=KERNEL, params_dir=params, notebooks_dir=nbs, reports_dir=tmp_path / "reports",
            executor="dask", scheduler=cluster.scheduler_address, timings=tmp_path / "missing.json",
        )
