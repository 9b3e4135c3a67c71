"""The papermill pipeline: profile checks, step caching, failure reporting, run record and index."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from cxrstudy import pipeline
from cxrstudy.pipeline import ProfileError, StepFailed
from cxrstudy.runspec import RunSpec


def make_notebook(path: Path, params: str, body: str) -> Path:
    """A minimal study-style notebook: title, tagged parameters cell, one code cell."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Test step"),
        nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def project(tmp_path: Path) -> dict[str, Path]:
    """Notebooks, params and reports folders of a two-step toy study."""
    nbs, params, reports = tmp_path / "notebooks", tmp_path / "params", tmp_path / "reports"
    for d in (nbs, params, reports):
        d.mkdir()
    make_notebook(
        nbs / "a.ipynb",
        'profile = "x"\nseed = 0\nmarker = ""',
        "from pathlib import Path\nimport cxrstudy.config\n"
        "with open(marker, 'a') as fh:\n    fh.write(f'a {profile} {seed}\\n')",
    )
    make_notebook(
        nbs / "b.ipynb",
        'profile = "x"\nmarker = ""\nfail = False',
        "with open(marker, 'a') as fh:\n    fh.write('b\\n')\nif fail:\n    raise ValueError('boom in b')",
    )
    return {"notebooks": nbs, "params": params, "reports": reports, "marker": tmp_path / "marker.txt"}


def write_profile(project: dict[str, Path], name: str, text: str) -> None:
    (project["params"] / f"{name}.yaml").write_text(text.replace("MARKER", str(project["marker"])))


def run(project: dict[str, Path], name: str, **kw) -> dict:
    return pipeline.run_profile(
        name,
        kernel="python3",
        params_dir=project["params"],
        notebooks_dir=project["notebooks"],
        reports_dir=project["reports"],
        **kw,
    )


def test_undeclared_parameter_is_an_error(project):
    write_profile(project, "p", "steps:\n  - {notebook: a, params: {marker: MARKER, sede: 1}}\n")
    with pytest.raises(ProfileError, match=r"\['sede'\] are not declared in a"):
        pipeline.resolve_parameters(pipeline.load_profile("p", project["params"]), project["notebooks"])


def test_common_parameter_declared_nowhere_is_an_error(project):
    write_profile(
        project, "p", "common: {seed: 1, epoch: 3}\nsteps:\n  - {notebook: a, params: {marker: MARKER}}\n"
    )
    with pytest.raises(ProfileError, match=r"\['epoch'\] are declared by no notebook"):
        pipeline.resolve_parameters(pipeline.load_profile("p", project["params"]), project["notebooks"])


def test_profile_shape_errors(project):
    with pytest.raises(ProfileError, match="no file"):
        pipeline.load_profile("nope", project["params"])
    write_profile(project, "p", "stpes: []\n")
    with pytest.raises(ProfileError, match="unknown top-level"):
        pipeline.load_profile("p", project["params"])
    write_profile(project, "q", "steps:\n  - a\n  - a\n")
    with pytest.raises(ProfileError, match="unique"):
        pipeline.load_profile("q", project["params"])
    write_profile(project, "r", "steps:\n  - missing_notebook\n")
    with pytest.raises(ProfileError, match="does not exist"):
        pipeline.resolve_parameters(pipeline.load_profile("r", project["params"]), project["notebooks"])


def test_a_step_gets_its_variants_parameters_under_its_own(project):
    make_notebook(
        project["notebooks"] / "v.ipynb", 'profile = "x"\nvariant = "baseline"\nview = "full"\nw = 0.0', ""
    )
    write_profile(
        project,
        "p",
        "variants:\n  lung: {view: lung_mask, w: 0.5}\nsteps:\n  - {notebook: v, name: v1, params: {variant: lung, w: 1.0}}\n"
        "  - {notebook: v, name: v0}\n",
    )
    (_, p1), (_, p0) = pipeline.resolve_parameters(
        pipeline.load_profile("p", project["params"]), project["notebooks"]
    )
    assert p1 == {"variant": "lung", "view": "lung_mask", "w": 1.0, "profile": "p"}  # the step's own w wins
    assert p0 == {"profile": "p"}  # no variant: the notebook's defaults, i.e. the baseline
    write_profile(
        project, "q", "variants: {lung: {view: x}}\nsteps:\n  - {notebook: v, params: {variant: lungs}}\n"
    )
    with pytest.raises(ProfileError, match=r"variant 'lungs' is not in the profile's variants \['lung'\]"):
        pipeline.load_profile("q", project["params"])
    for bad in ("{Lung: {view: x}}", "{baseline: {view: x}}", "{lung: {variant: lung}}", "[lung]"):
        write_profile(project, "r", f"variants: {bad}\nsteps:\n  - v\n")
        with pytest.raises(ProfileError, match="variant"):
            pipeline.load_profile("r", project["params"])


def test_profiles_share_the_variants_file_and_may_override_a_variant(project):
    make_notebook(project["notebooks"] / "v.ipynb", 'profile = "x"\nvariant = "baseline"\nview = "full"\nw = 0.0', "")
    (project["params"] / pipeline.VARIANTS_FILE).write_text("lung: {view: lung_mask, w: 0.5}\nadv: {w: 1.0}\n")
    write_profile(
        project,
        "p",
        "variants: {adv: {w: 0.3}}\nsteps:\n  - {notebook: v, name: v1, params: {variant: lung}}\n"
        "  - {notebook: v, name: v2, params: {variant: adv}}\n",
    )
    (_, p1), (_, p2) = pipeline.resolve_parameters(
        pipeline.load_profile("p", project["params"]), project["notebooks"]
    )
    assert p1 == {"variant": "lung", "view": "lung_mask", "w": 0.5, "profile": "p"}  # from the shared file
    assert p2 == {"variant": "adv", "w": 0.3, "profile": "p"}  # the profile's own wins
    assert pipeline.profile_names(project["params"]) == ["p"]  # the variants file is not a profile
    with pytest.raises(ProfileError, match="no file"):
        pipeline.load_profile("variants", project["params"])
    (project["params"] / pipeline.VARIANTS_FILE).write_text("Lung: {view: x}\n")
    with pytest.raises(ProfileError, match=r"variants\.yaml: variant name 'Lung'"):
        pipeline.load_profile("p", project["params"])


def test_the_study_profiles_name_their_variants_and_seeds():
    assert pipeline.profile_names() == ["default", "full", "smoke"]
    for name in pipeline.profile_names():  # every variant comes from params/variants.yaml
        assert "variants" not in yaml.safe_load((pipeline.config.PARAMS_DIR / f"{name}.yaml").read_text())
    default = pipeline.load_profile("default")
    variants = {s.params.get("variant", "baseline") for s in default.steps if s.notebook == "04_transfer"}
    assert variants == {"baseline", "lung", "group_dro"}  # the measured negatives (the adversaries) run in full
    assert {s.params.get("variant", "baseline") for s in default.steps if s.params.get("dfr")} == {"baseline", "lung"}
    assert default.common["folds"] == 5 and default.common["repeats"] == 1
    assert not any("n_seeds" in s.params for s in default.steps)
    full = pipeline.load_profile("full")
    adv = next(s.params for s in full.steps if s.params.get("variant") == "lung_adversary")
    assert adv["input_view"] == "lung_mask" and adv["equalize"] is True and adv["adversary_weight"] > 0
    weak = [s.params for s in full.steps if s.params.get("variant") == "lung_adversary_weak"]
    assert {(w["task"], w["adversary_weight"], w["input_view"]) for w in weak} == {
        ("covid_normal_pneumonia", 0.3, "lung_mask")
    }
    full = pipeline.load_profile("full")
    bal = [s.params for s in full.steps if s.params.get("variant") == "lung_balanced"]
    assert [(b["task"], b["scenario"], b["sampling"], b["only_fold"]) for b in bal] == [  # one step per fold
        ("covid_normal_pneumonia", sc, "source_balanced", k) for sc in ("deep", "finetune") for k in range(5)
    ]
    for name in ("smoke", "default", "full"):
        pipeline.resolve_parameters(pipeline.load_profile(name))  # every parameter declared

    ids = pipeline.expected_run_ids(default)  # 9 trained configurations x 5 folds, and 4 DFR configurations x 5 folds
    assert len(ids) == len(set(ids)) == 65
    assert "covid_normal_pneumonia__efficientnet_lite0__deep__nodecomp__seed0__fold3__lung_dfr" in ids
    assert "covid_vs_normal__efficientnet_lite0__shallow__decomp__seed0__fold4" in ids
    assert "covid_normal_pneumonia__efficientnet_lite0__deep__nodecomp__seed0__fold2__lung" in ids
    assert not any(i.endswith(("lung_balanced", "lung_adversary")) for i in ids)
    smoke = pipeline.expected_run_ids(pipeline.load_profile("smoke"))  # notebook defaults fill the gaps
    assert "covid_vs_normal__efficientnet_lite0__shallow__nodecomp__seed0__fold1" in smoke


def test_common_parameters_reach_only_declaring_notebooks(project):
    write_profile(
        project,
        "p",
        "common: {seed: 7, fail: false}\nsteps:\n  - {notebook: a, params: {marker: MARKER}}\n"
        "  - {notebook: b, params: {marker: MARKER}}\n",
    )
    (a, pa), (b, pb) = pipeline.resolve_parameters(
        pipeline.load_profile("p", project["params"]), project["notebooks"]
    )
    assert pa == {"seed": 7, "marker": str(project["marker"]), "profile": "p"}
    assert pb == {"fail": False, "marker": str(project["marker"]), "profile": "p"}


def test_run_cache_and_failure(project):
    write_profile(
        project,
        "p",
        "common: {seed: 3}\nsteps:\n  - {notebook: a, params: {marker: MARKER}}\n"
        "  - {notebook: b, name: b_first, params: {marker: MARKER}}\n",
    )
    record = run(project, "p")
    out = project["reports"] / "p"
    assert project["marker"].read_text().splitlines() == ["a p 3", "b"]
    assert [s["status"] for s in record["steps"]] == ["ran", "ran"]
    for name in ("a", "b_first"):
        assert (out / "notebooks" / f"{name}.ipynb").is_file()
        assert "<html" in (out / "html" / f"{name}.html").read_text()[:2000].lower()
    saved = json.loads((out / "run.json").read_text())
    assert saved["status"] == "ok" and saved["parameters"]["a"]["seed"] == 3
    assert {"torch", "fastai", "timm", "scikit-learn", "python"} <= set(saved["versions"])
    assert all(isinstance(s["seconds"], float) for s in saved["steps"])
    assert "b_first" in (out / "index.html").read_text()

    # Nothing changed: nothing runs again.
    record = run(project, "p")
    assert [s["status"] for s in record["steps"]] == ["cached", "cached"]
    assert project["marker"].read_text().splitlines() == ["a p 3", "b"]

    # A changed parameter of the second step re-runs only that step; then it fails.
    write_profile(
        project,
        "p",
        "common: {seed: 3}\nsteps:\n  - {notebook: a, params: {marker: MARKER}}\n"
        "  - {notebook: b, name: b_first, params: {marker: MARKER, fail: true}}\n",
    )
    with pytest.raises(StepFailed) as err:
        run(project, "p")
    msg = str(err.value)
    assert "b_first" in msg and "b.ipynb" in msg and "ValueError: boom in b" in msg
    partial = out / "notebooks" / "b_first.ipynb"
    assert partial.is_file() and "boom in b" in partial.read_text()
    assert project["marker"].read_text().splitlines() == ["a p 3", "b", "b"]
    saved = json.loads((out / "run.json").read_text())
    assert saved["status"] == "failed" and saved["steps"][-1]["status"] == "failed"
    assert "failed" in (out / "index.html").read_text()


def test_main_reports_errors_with_exit_code(project, capsys, monkeypatch):
    monkeypatch.setattr(pipeline.config, "PARAMS_DIR", project["params"])
    assert pipeline.main(["params", "--profile", "does_not_exist"]) == 1
    assert "does_not_exist" in capsys.readouterr().err


def test_package_dependencies_follow_imports():
    deps = {p.name for p in pipeline.package_dependencies(pipeline.config.NOTEBOOKS_DIR / "00_data.ipynb")}
    assert {"config.py", "build.py"} <= deps and "pipeline.py" not in deps and "runs.py" not in deps


def test_package_dependencies_are_transitive(tmp_path):
    nb = make_notebook(tmp_path / "n.ipynb", "x = 1", "from cxrstudy.pipeline import load_profile")
    names = {p.name for p in pipeline.package_dependencies(nb)}
    assert {"pipeline.py", "config.py", "__init__.py"} <= names
    assert {"record.py", "pages.py"} <= names  # imported inside pipeline functions


def test_declared_parameters_survive_comments_papermill_cannot_parse(tmp_path):
    nb = make_notebook(
        tmp_path / "n.ipynb",
        'profile = "smoke"\nmax_per_class = 0  # per split and class; 0 = all\nk: int | str = 2\nsizes = [1, 2]',
        "pass",
    )
    assert pipeline.declared_parameters(nb) == {
        "profile": "smoke",
        "max_per_class": 0,
        "k": 2,
        "sizes": [1, 2],
    }
    bad = make_notebook(tmp_path / "bad.ipynb", "x = (", "pass")
    with pytest.raises(ProfileError, match="not valid Python"):
        pipeline.declared_parameters(bad)


def test_manifest_is_an_input_of_later_steps_but_not_of_the_data_step(tmp_path, monkeypatch):
    """A fresh clone's first run has no manifest yet; the data step's key must not depend on it."""
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for name in ("00_data", "02_features"):
        make_notebook(nbs / f"{name}.ipynb", 'profile = "x"', "pass")
    monkeypatch.setattr(pipeline.config, "PROCESSED_DIR", tmp_path)
    data, later = pipeline.Step("00_data", "00_data"), pipeline.Step("02_features", "02_features")
    before = pipeline.step_key(data, {}, tmp_path, nbs), pipeline.step_key(later, {}, tmp_path, nbs)
    (tmp_path / "manifest.csv").write_text("image,label\na.png,covid\n")
    after = pipeline.step_key(data, {}, tmp_path, nbs), pipeline.step_key(later, {}, tmp_path, nbs)
    assert before[0] == after[0]
    assert before[1] != after[1]


def test_content_digest_follows_content_not_location(tmp_path):
    a, b = tmp_path / "a" / "runs", tmp_path / "b" / "runs"
    for d in (a, b):
        (d / "r1").mkdir(parents=True)
        (d / "r1" / "run.json").write_text("{}")
    (a / ".lock").write_text("ignored")
    assert pipeline.content_digest([a]) == pipeline.content_digest([b])
    (b / "r1" / "run.json").write_text('{"x": 1}')
    assert pipeline.content_digest([a]) != pipeline.content_digest([b])
    assert pipeline.content_digest([tmp_path / "missing"]) != pipeline.content_digest([a])


def test_keys_follow_what_a_step_reads_not_the_previous_step(tmp_path, monkeypatch):
    """Changing one training's epochs re-runs that training and the evaluation, not the other training."""
    nbs, params, reports = tmp_path / "notebooks", tmp_path / "params", tmp_path / "reports"
    for d in (nbs, params, reports):
        d.mkdir()
    body = f"from pathlib import Path\nout = Path(r'{reports}') / profile\n"
    make_notebook(
        nbs / "train.ipynb",
        'profile = "x"\nrun = ""\nepochs = 1',
        body + "(out / 'runs').mkdir(parents=True, exist_ok=True)\n"
        "(out / 'runs' / f'{run}.txt').write_text(str(epochs))",
    )
    make_notebook(
        nbs / "evaluate.ipynb",
        'profile = "x"',
        body
        + "(out / 'results.txt').write_text(str(sorted(p.read_text() for p in (out / 'runs').iterdir())))",
    )
    monkeypatch.setitem(pipeline.STEP_IO, "train", pipeline.StepIO(writes=("{profile}/runs",)))
    monkeypatch.setitem(pipeline.STEP_IO, "evaluate", pipeline.StepIO(reads=("{profile}/runs",)))

    def profile(shallow_epochs: int) -> None:
        (params / "p.yaml").write_text(
            "steps:\n  - {notebook: train, name: shallow, params: {run: shallow, epochs: "
            + str(shallow_epochs)
            + "}}\n  - {notebook: train, name: deep, params: {run: deep, epochs: 3}}\n  - {notebook: evaluate}\n"
        )

    def statuses() -> list[str]:
        rec = pipeline.run_profile(
            "p", kernel="python3", params_dir=params, notebooks_dir=nbs, reports_dir=reports
        )
        return [s["status"] for s in rec["steps"]]

    profile(1)
    assert statuses() == ["ran", "ran", "ran"]
    assert statuses() == ["cached", "cached", "cached"]
    profile(5)
    assert statuses() == ["ran", "cached", "ran"]
    assert (reports / "p" / "results.txt").read_text() == "['3', '5']"


def test_a_running_profile_refuses_a_second_run_and_a_dead_lock_is_taken_over(tmp_path):
    from cxrstudy.runlock import RunLocked, profile_lock

    out = tmp_path / "reports" / "p"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from cxrstudy.runlock import profile_lock\n"
            f"with profile_lock(Path(r'{out}'), 'reproduce --profile p'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"process {holder.pid} .*reproduce --profile p"):
            with profile_lock(out, "evaluate"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").is_file()  # left behind by the killed process
    with profile_lock(out, "evaluate") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (out / ".lock").exists()


def test_reproduce_fails_at_once_when_the_profile_is_locked(project, capsys, monkeypatch):
    from cxrstudy.runlock import LOCK_NAME

    write_profile(project, "p", "steps:\n  - {notebook: a, params: {marker: MARKER}}\n")
    out = project["reports"] / "p"
    out.mkdir()
    (out / LOCK_NAME).write_text(
        json.dumps(
            {
                "pid": os.getppid(),
                "host": socket.gethostname(),
                "what": "reproduce --profile p",
                "command": "make reproduce",
            }
        )
    )
    with pytest.raises(RuntimeError, match=f"process {os.getppid()}"):
        run(project, "p")
    assert not project["marker"].exists()


def test_template_edits_change_the_evaluation_key(tmp_path, monkeypatch):
    """The report templates are package data: editing one must re-run the notebook that renders it."""
    from cxrstudy.reporting import templates

    nb = make_notebook(
        tmp_path / "05_evaluation.ipynb", 'profile = "x"', "from cxrstudy.reporting import pages"
    )
    step = pipeline.Step("05_evaluation", "05_evaluation")
    before = pipeline.step_key(step, {}, tmp_path, tmp_path)
    template = next(Path(templates.__file__).parent.glob("*.j2"))
    original = template.read_text()
    try:
        template.write_text(original + "\n")
        assert pipeline.step_key(step, {}, tmp_path, tmp_path) != before
    finally:
        template.write_text(original)
    assert pipeline.step_key(step, {}, tmp_path, tmp_path) == before
    assert nb.is_file()


def test_a_per_fold_step_becomes_one_step_per_fold_with_the_same_runs(project):
    smoke = pipeline.load_profile("smoke")
    split = [s for s in smoke.steps if s.name.startswith("04_transfer_covid_normal_pneumonia_deep_group_dro")]
    assert [(s.name, s.params["only_fold"]) for s in split] == [
        ("04_transfer_covid_normal_pneumonia_deep_group_dro_fold0", 0),
        ("04_transfer_covid_normal_pneumonia_deep_group_dro_fold1", 1),
    ]
    # the fold steps train, between them, exactly the runs of the whole step, each once
    whole = {**{k: v for k, v in split[0].params.items() if k != "only_fold"}, **smoke.common}
    per_step = [RunSpec.from_params({**whole, "only_fold": k}) for k in range(2)]
    assert sorted(r.run_id for r in sum(per_step, [])) == sorted(r.run_id for r in RunSpec.from_params(whole))
    assert [{r.fold for r in specs} for specs in per_step] == [{0}, {1}]
    deps = pipeline.step_dependencies(smoke.steps, Path("/r/smoke"))
    assert all(s.name in deps["05_evaluation"] and "03_decomposition" in deps[s.name] for s in split)

    nb = "{notebook: 04_transfer, per_fold: true"
    for text, error in [
        (f"steps:\n  - {nb}}}\n", "needs 'folds'"),
        (f"common: {{folds: 2}}\nsteps:\n  - {nb}, params: {{only_fold: 1}}}}\n", "sets 'only_fold' itself"),
        ("common: {folds: 2}\nsteps:\n  - {notebook: a, per_fold: true}\n", "04_transfer steps only"),
    ]:
        write_profile(project, "p", text)
        with pytest.raises(ProfileError, match=error):
            pipeline.load_profile("p", project["params"])
    write_profile(project, "p", f"steps:\n  - {nb}, name: t, params: {{folds: 3}}}}\n")
    assert [s.name for s in pipeline.load_profile("p", project["params"]).steps] == ["t_fold0", "t_fold1", "t_fold2"]


def test_the_evaluation_gets_the_run_ids_of_the_transfer_steps(project):
    smoke = pipeline.load_profile("smoke")
    steps = pipeline.step_parameters(smoke)
    with_ids = [(s.notebook, p["run_ids"]) for s, p in steps if "run_ids" in p]
    assert with_ids == [("05_evaluation", pipeline.expected_run_ids(smoke))]
    # (shallow, deep x 2 decomposition settings, finetune, scratch, 3 three-class, 2 DFR) x 2 folds
    assert len(with_ids[0][1]) == 22
    evaluation = pipeline.config.NOTEBOOKS_DIR / "05_evaluation.ipynb"
    assert "pipeline.py" not in {p.name for p in pipeline.package_dependencies(evaluation)}
    write_profile(project, "p", "steps:\n  - {notebook: 05_evaluation, params: {run_ids: [x]}}\n")
    with pytest.raises(ProfileError, match=r"\['run_ids'\] are supplied by the pipeline"):
        pipeline.step_parameters(pipeline.load_profile("p", project["params"]))


def test_a_step_must_write_what_it_declares_and_reruns_when_it_is_gone(project, monkeypatch):
    make_notebook(
        project["notebooks"] / "w.ipynb",
        'profile = "x"\nout = ""\nwrite = True',
        "from pathlib import Path\nif write:\n    Path(out, profile, 'made.txt').write_text('x')",
    )
    monkeypatch.setitem(pipeline.STEP_IO, "w", pipeline.StepIO(writes=("{profile}/made.txt",)))
    made = project["reports"] / "p" / "made.txt"

    def profile(write: bool) -> None:
        write_profile(
            project, "p", f"steps:\n  - {{notebook: w, params: {{out: {project['reports']}, write: {write}}}}}\n"
        )

    profile(False)
    with pytest.raises(StepFailed, match=r"step 'w' \(w.ipynb\) finished without writing .*made\.txt"):
        run(project, "p")
    profile(True)
    assert [s["status"] for s in run(project, "p")["steps"]] == ["ran"]
    assert [s["status"] for s in run(project, "p")["steps"]] == ["cached"]
    made.unlink()
    assert [s["status"] for s in run(project, "p")["steps"]] == ["ran"]
    assert made.is_file()


def test_kernel_sockets_stay_out_of_the_project_root(tmp_path):
    """The IPC kernel's socket files live in a runtime folder of the step, removed afterwards, never in the root."""
    root = pipeline.config.ROOT
    before = sorted(p.name for p in root.glob("kernel-ipc-*"))
    nb = make_notebook(
        tmp_path / "k.ipynb",
        "before = []",
        "from pathlib import Path\nfrom ipykernel import get_connection_file\n"
        "leaked = sorted(p.name for p in Path.cwd().glob('kernel-ipc-*'))\n"
        "assert leaked == before, leaked\n"
        "runtime = Path(get_connection_file()).parent\n"
        "assert sorted(runtime.glob('kernel-ipc-*')), list(runtime.iterdir())\n"
        "print(runtime)",
    )
    out = tmp_path / "out.ipynb"
    step = pipeline.Step("k", "k")
    pipeline._execute(nb, out, {"before": before}, "python3", step, pipeline.kernel_env())
    cell = nbformat.read(out, as_version=4).cells[-1]
    runtime = Path(cell.outputs[0]["text"].strip())
    assert runtime != root and not runtime.exists()
    assert sorted(p.name for p in root.glob("kernel-ipc-*")) == before
    failing = make_notebook(tmp_path / "f.ipynb", "x = 1", "from ipykernel import get_connection_file\n"
                            "from pathlib import Path\nprint(Path(get_connection_file()).parent)\nraise ValueError('x')")
    with pytest.raises(StepFailed):
        pipeline._execute(failing, tmp_path / "f_out.ipynb", {}, "python3", step, pipeline.kernel_env())
    runtime = Path(nbformat.read(tmp_path / "f_out.ipynb", as_version=4).cells[-1].outputs[0]["text"].strip())
    assert not runtime.exists()  # removed on failure too
    assert sorted(p.name for p in root.glob("kernel-ipc-*")) == before


def test_run_record_holds_the_environment_the_kernels_got(project, monkeypatch):
    keys = sorted(pipeline.config.RUNTIME_ENV)
    assert len(keys) >= 2
    monkeypatch.delenv(keys[0], raising=False)
    monkeypatch.setenv(keys[1], "12345")  # a value the user set wins
    seen = project["marker"].with_suffix(".json")
    make_notebook(
        project["notebooks"] / "e.ipynb",
        'profile = "x"\nmarker = ""',
        f"import json, os\nfrom pathlib import Path\nPath(marker).write_text(json.dumps({{k: os.environ.get(k) for k in {keys!r}}}))",
    )
    write_profile(project, "p", f"steps:\n  - {{notebook: e, params: {{marker: {seen}}}}}\n")
    record = run(project, "p")
    got = json.loads(seen.read_text())
    assert got == {keys[0]: pipeline.config.RUNTIME_ENV[keys[0]], keys[1]: "12345", **got}
    saved = json.loads((project["reports"] / "p" / "run.json").read_text())
    assert saved["runtime_env"] == record["runtime_env"] == got
    assert keys[0] not in os.environ  # the driver's own environment is left alone


def test_expected_seconds_come_from_timings_then_stamps_then_the_last_record(tmp_path):
    out = tmp_path / "reports" / "p"
    (out / ".stamps").mkdir(parents=True)
    assert pipeline.expected_seconds(out) == ({}, [])
    (out / "run.json").write_text(json.dumps({"steps": [
        {"name": "a", "status": "ran", "seconds": 5.0},
        {"name": "b", "status": "cached", "seconds": 6.0},
        {"name": "c", "status": "failed", "seconds": 99.0},  # a failed step's seconds say nothing of its length
        {"name": "d", "status": "cached", "seconds": None},
    ]}))
    (out / ".stamps" / "b.json").write_text(json.dumps({"key": "k", "seconds": 7.0}))
    (out / ".stamps" / "e.json").write_text("{half")  # unreadable: the step only runs again, untimed
    timings = tmp_path / "earlier.json"
    timings.write_text(json.dumps({"steps": [{"name": "a", "status": "ran", "seconds": 50.0}]}))
    assert pipeline.expected_seconds(out) == ({"a": 5.0, "b": 7.0}, [str(out / ".stamps"), str(out / "run.json")])
    expected, sources = pipeline.expected_seconds(out, timings)
    assert expected == {"a": 50.0, "b": 7.0} and sources[0] == str(timings)
    timings.write_text(json.dumps({"profile": "p"}))
    with pytest.raises(ProfileError, match=r"timings .*earlier.json: not a readable run.json"):
        pipeline.expected_seconds(out, timings)


def test_a_cluster_starts_untimed_steps_first_then_the_longest_ties_in_profile_order():
    class Run:
        def __init__(self, name: str) -> None:
            self.step = pipeline.Step(notebook="n", name=name)

    order = {n: i for i, n in enumerate("abcde")}
    runs = [Run(n) for n in "edcba"]
    names = [r.step.name for r in pipeline.submission_order(runs, {"a": 1.0, "b": 9.0, "c": 9.0, "e": 3.0}, order)]
    assert names == ["d", "b", "c", "e", "a"]
    assert [r.step.name for r in pipeline.submission_order(runs, {}, order)] == list("abcde")


def test_timings_need_the_dask_executor(project):
    write_profile(project, "demo", "steps:\n  - {notebook: a, params: {marker: MARKER}}\n")
    with pytest.raises(ProfileError, match="local executor runs them in profile order"):
        run(project, "demo", timings=project["reports"] / "run.json")
    assert not project["marker"].exists()
