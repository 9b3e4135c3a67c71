"""Run the study's notebooks in order with papermill, from a parameter profile, caching finished steps.

A profile (``params/<name>.yaml``) lists steps; each step is one papermill run of a notebook with
parameters. ``common`` parameters go to every notebook that declares them; a step's own parameters
must be declared by its notebook, and a common parameter that no notebook declares is an error.
Each notebook declares what it reads and writes (``STEP_IO``). A step is skipped when its key matches the
stamp of its last successful run and what it writes exists; a step that ends without writing it fails. The
key covers the notebook, its parameters, the package modules it imports and the current content of what it
reads (the outputs of earlier steps), not the previous step's key: changing one training run's epochs
re-runs that run and the evaluation, not the other trainings. The steps run in order in this process
(``--executor local``) or as tasks on a Dask cluster (``--executor dask``), each as soon as the earlier steps that
write what it reads have finished (``step_dependencies``).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from cxrstudy import config
from cxrstudy.fileio import atomic_write_text, sha256_file, write_json
from cxrstudy.runspec import RunSpec

KERNEL_NAME = "cxrstudy"
PROFILE_KEYS = {"description", "common", "variants", "steps"}
STEP_KEYS = {"notebook", "name", "params", "per_fold"}
#: The parameter that restricts a transfer step to one fold (of every repeat); ``per_fold: true`` sets it.
ONLY_FOLD = "only_fold"
#: How steps run: ``local`` in order in this process, ``dask`` as tasks on a Dask cluster (``cxrstudy.executor``).
EXECUTORS = ("local", "dask")
#: The variants every profile shares (beside the profiles); a profile's own ``variants:`` add to or override them.
VARIANTS_FILE = "variants.yaml"
#: The analysis plan beside the profiles (``cxrstudy.plan``), not a profile.
PLAN_FILE = "plan.yaml"


class ProfileError(ValueError):
    """A profile that cannot be run as written (unknown key, undeclared parameter, missing notebook)."""


class StepFailed(RuntimeError):
    """A notebook raised; carries the step name, the cell's error and where the partial notebook is."""


@dataclass
class Step:
    """One papermill run: a notebook, a unique name for its outputs, and its parameters."""

    name: str
    notebook: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Profile:
    """A named set of steps and the parameters shared by them."""

    name: str
    description: str
    common: dict[str, Any]
    steps: list[Step]
    path: Path | None = None


def profile_names(params_dir: Path = config.PARAMS_DIR) -> list[str]:
    """The profiles in ``params_dir``: every YAML file but the shared variants and the analysis plan."""
    return sorted(p.stem for p in params_dir.glob("*.yaml") if p.name not in (VARIANTS_FILE, PLAN_FILE))


def _per_fold(step: Step, common: dict[str, Any], where: str) -> list[Step]:
    """A transfer step as one step per fold (``<name>_fold<k>``, parameter :data:`ONLY_FOLD` = k), each training
    that fold of every repeat: tasks a cluster can spread. The fold count comes from the step's or common's
    ``folds``."""
    if step.notebook != "04_transfer":
        raise ProfileError(f"{where} ({step.name}): per_fold applies to 04_transfer steps only")
    folds = step.params.get("folds", common.get("folds"))
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 1:
        raise ProfileError(f"{where} ({step.name}): per_fold needs 'folds' (an integer >= 1) in its params or common")
    if ONLY_FOLD in step.params:
        raise ProfileError(f"{where} ({step.name}): per_fold sets {ONLY_FOLD!r} itself; remove it from params")
    return [Step(f"{step.name}_fold{k}", step.notebook, {**step.params, ONLY_FOLD: k}) for k in range(folds)]


def load_profile(name: str, params_dir: Path = config.PARAMS_DIR) -> Profile:
    """Read ``params/<name>.yaml`` (or a path to a YAML file) and check its shape."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else params_dir / f"{name}.yaml"
    if not path.is_file() or path.name in (VARIANTS_FILE, PLAN_FILE):
        known = profile_names(params_dir)
        raise ProfileError(f"profile {name!r}: no file {path} (known profiles: {', '.join(known) or 'none'})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping at the top level")
    unknown = set(raw) - PROFILE_KEYS
    if unknown:
        raise ProfileError(
            f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(PROFILE_KEYS)}"
        )
    shared = path.parent / VARIANTS_FILE
    variants = {
        **(_variants(yaml.safe_load(shared.read_text()) or {}, shared) if shared.is_file() else {}),
        **_variants(raw.get("variants") or {}, path),
    }
    steps: list[Step] = []
    for i, entry in enumerate(raw.get("steps") or []):
        if isinstance(entry, str):
            entry = {"notebook": entry}
        if not isinstance(entry, dict) or "notebook" not in entry:
            raise ProfileError(f"{path}: step {i + 1} needs a 'notebook'")
        bad = set(entry) - STEP_KEYS
        if bad:
            raise ProfileError(f"{path}: step {i + 1} ({entry['notebook']}): unknown key(s) {sorted(bad)}")
        params = _with_variant(dict(entry.get("params") or {}), variants, f"{path}: step {i + 1}")
        step = Step(entry.get("name") or entry["notebook"], entry["notebook"], params)
        steps += _per_fold(step, raw.get("common") or {}, f"{path}: step {i + 1}") if entry.get("per_fold") else [step]
    if not steps:
        raise ProfileError(f"{path}: no steps")
    names = [s.name for s in steps]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ProfileError(f"{path}: step names must be unique; repeated: {dupes} (give each run a 'name')")
    stem = path.stem
    return Profile(stem, str(raw.get("description", "")), dict(raw.get("common") or {}), steps, path)


def _variants(raw: object, path: Path) -> dict[str, dict[str, Any]]:
    """Variants as written in ``path``: name -> parameter set (each a mapping without a ``variant`` key)."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: 'variants' must map variant names to parameter sets")
    for name, params in raw.items():
        if (
            not isinstance(name, str)
            or not config.VARIANT_NAME.match(name)
            or name == config.BASELINE_VARIANT
        ):
            raise ProfileError(
                f"{path}: variant name {name!r} must be lower-case letters, digits and underscores, "
                f"and not {config.BASELINE_VARIANT!r} (the baseline is the notebooks' defaults)"
            )
        if not isinstance(params, dict) or "variant" in params:
            raise ProfileError(
                f"{path}: variant {name!r} must be a mapping of parameters (without 'variant')"
            )
    return {name: dict(params) for name, params in raw.items()}


def _with_variant(params: dict[str, Any], variants: dict[str, dict[str, Any]], where: str) -> dict[str, Any]:
    """A step's parameters with its variant's parameter set under them (the step's own win)."""
    name = params.get("variant")
    if name is None or name == config.BASELINE_VARIANT:
        return params
    if name not in variants:
        raise ProfileError(f"{where}: variant {name!r} is not in the profile's variants {sorted(variants)}")
    return {**variants[name], **params}


def notebook_path(step: Step, notebooks_dir: Path = config.NOTEBOOKS_DIR) -> Path:
    """The source notebook of a step; a clear error when it does not exist."""
    path = notebooks_dir / (step.notebook if step.notebook.endswith(".ipynb") else f"{step.notebook}.ipynb")
    if not path.is_file():
        raise ProfileError(f"step {step.name!r}: notebook {path} does not exist")
    return path


def declared_parameters(path: Path) -> dict[str, Any]:
    """Names assigned in a notebook's ``parameters``-tagged cell, with their default values.

    Parsed with ``ast`` (papermill's own inspector silently drops lines it cannot parse, such as
    some trailing comments, which would turn a typo check into a silent no-op).
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ProfileError(f"{path.name} needs exactly one cell tagged 'parameters' (found {len(cells)})")
    try:
        tree = ast.parse(cells[0].source)
    except SyntaxError as exc:
        raise ProfileError(f"{path.name}: the parameters cell is not valid Python: {exc}") from exc
    params: dict[str, Any] = {}
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    params[target.id] = ast.literal_eval(node.value) if node.value is not None else None
                except ValueError:
                    params[target.id] = ast.unparse(node.value)
    if not params:
        raise ProfileError(f"{path.name}: the parameters cell declares nothing")
    return params


def resolve_parameters(
    profile: Profile, notebooks_dir: Path = config.NOTEBOOKS_DIR
) -> list[tuple[Step, dict]]:
    """Parameters each step will get; every name must be declared by the notebook that receives it."""
    resolved = []
    used_common: set[str] = set()
    for step in profile.steps:
        declared = declared_parameters(notebook_path(step, notebooks_dir))
        undeclared = sorted(set(step.params) - set(declared))
        if undeclared:
            raise ProfileError(
                f"profile {profile.name!r}, step {step.name!r}: parameter(s) {undeclared} are not declared in "
                f"{step.notebook}'s parameters cell (declared: {sorted(declared)})"
            )
        params = {k: v for k, v in profile.common.items() if k in declared}
        used_common |= set(params)
        params.update(step.params)
        if "profile" in declared:
            params["profile"] = profile.name
        resolved.append((step, params))
    unused = sorted(set(profile.common) - used_common)
    if unused:
        raise ProfileError(
            f"profile {profile.name!r}: common parameter(s) {unused} are declared by no notebook"
        )
    return resolved


def expected_run_ids(profile: Profile, notebooks_dir: Path = config.NOTEBOOKS_DIR) -> list[str]:
    """Run ids the profile's transfer steps (notebook ``04_transfer``) produce, in step order: every
    decomposition setting and seed of each step (:meth:`RunSpec.from_params`), with the notebook's defaults where
    the profile is silent."""
    ids: list[str] = []
    for step, params in resolve_parameters(profile, notebooks_dir):
        if step.notebook != "04_transfer":
            continue
        p = {**declared_parameters(notebook_path(step, notebooks_dir)), **params}
        ids += [s.run_id for s in RunSpec.from_params(p) if s.run_id not in ids]
    return ids


#: Parameters the pipeline supplies to a notebook that declares them (a profile may not set them).
SUPPLIED_PARAMETERS = ("run_ids",)


def step_parameters(profile: Profile, notebooks_dir: Path = config.NOTEBOOKS_DIR) -> list[tuple[Step, dict]]:
    """The parameters each step runs with: the profile's (``resolve_parameters``) and, for a notebook that declares
    ``run_ids``, the runs the profile's transfer steps produce (``expected_run_ids``)."""
    resolved = resolve_parameters(profile, notebooks_dir)
    run_ids: list[str] | None = None
    out = []
    for step, params in resolved:
        if set_here := sorted(set(params) & set(SUPPLIED_PARAMETERS)):
            raise ProfileError(
                f"profile {profile.name!r}, step {step.name!r}: {set_here} are supplied by the pipeline, not the profile"
            )
        if "run_ids" in declared_parameters(notebook_path(step, notebooks_dir)):
            if run_ids is None:
                run_ids = expected_run_ids(profile, notebooks_dir)
            params = {**params, "run_ids": run_ids}
        out.append((step, params))
    return out


def _module_file(module: str) -> Path | None:
    """Source file of a ``cxrstudy`` module, or None when it is not part of the package."""
    parts = module.split(".")
    if parts[0] != "cxrstudy":
        return None
    base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(source: str, package: str = "") -> set[str]:
    """Absolute module names imported by Python source (relative imports resolved against package)."""
    names: set[str] = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def package_dependencies(notebook: Path) -> list[Path]:
    """Files of the ``cxrstudy`` package a notebook imports, directly or through other modules."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    code = "\n".join(
        c.source for c in nb.cells if c.cell_type == "code" and not c.source.lstrip().startswith(("%", "!"))
    )
    todo = {m for m in _imports(code) if m.startswith("cxrstudy")} | {"cxrstudy", "cxrstudy.config"}
    seen: dict[str, Path] = {}
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = _module_file(mod)
        if path is None:
            continue
        seen[mod] = path
        parents = mod.split(".")
        for i in range(1, len(parents)):
            todo.add(".".join(parents[:i]))
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        todo |= {m for m in _imports(path.read_text(), pkg) if m.startswith("cxrstudy")} - set(seen)
    return sorted(set(seen.values()))


@dataclass(frozen=True)
class StepIO:
    """What a notebook reads that earlier steps write, and what it writes, as path templates
    (``{processed}``: data/processed, ``{profile}``: reports/<profile>); a folder counts with all its files."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


_MANIFEST = "{processed}/manifest.csv"
#: Each notebook's declared inputs and outputs. A step's key covers the current content of its reads; a step
#: counts as done only while its writes exist, and a step that ends without writing them fails.
STEP_IO: dict[str, StepIO] = {
    "00_data": StepIO(
        writes=(_MANIFEST, "{processed}/excluded.csv", "{processed}/duplicates.csv", "{processed}/build_info.json"),
    ),
    "01_lungs": StepIO(
        reads=(_MANIFEST,),
        writes=("{profile}/lungs/summary.json", "{profile}/lungs/lungs.csv", "{profile}/lungs/model.pth"),
    ),
    "02_features": StepIO(reads=(_MANIFEST, "{profile}/lungs"), writes=("{profile}/features/summary.json",)),
    "03_decomposition": StepIO(
        reads=(_MANIFEST, "{profile}/lungs"),
        writes=("{profile}/decomposition",),
    ),
    "04_transfer": StepIO(reads=(_MANIFEST, "{profile}/lungs", "{profile}/decomposition"), writes=("{profile}/runs",)),
    "05_evaluation": StepIO(
        reads=(_MANIFEST, "{profile}/lungs", "{profile}/decomposition", "{profile}/runs"),
        writes=(
            "{profile}/results.json",
            "{profile}/model_card.md",
            "{profile}/claim_checklist.md",
            "{profile}/evaluation",
        ),
    ),
}
#: A notebook not listed in STEP_IO reads the manifest (when it exists) and declares no outputs.
DEFAULT_IO = StepIO(reads=(_MANIFEST,))
#: Package data files that count as code in a step's key (the Jinja2 templates of the written reports).
PACKAGE_DATA_SUFFIX = ".j2"


def step_io(step: Step) -> StepIO:
    """The declared inputs and outputs of a step's notebook (``STEP_IO``, else ``DEFAULT_IO``)."""
    return STEP_IO.get(Path(step.notebook).stem, DEFAULT_IO)


def _paths(templates: tuple[str, ...], profile_dir: Path) -> list[Path]:
    subs = {"processed": str(config.PROCESSED_DIR), "profile": str(profile_dir)}
    return [Path(t.format(**subs)) for t in templates]


def input_paths(step: Step, profile_dir: Path) -> list[Path]:
    """The files and folders a step reads."""
    return _paths(step_io(step).reads, profile_dir)


def output_paths(step: Step, profile_dir: Path) -> list[Path]:
    """The files and folders a step writes."""
    return _paths(step_io(step).writes, profile_dir)


def content_digest(paths: list[Path]) -> str:
    """SHA-256 over the names and contents of the given files and of every file inside the given folders.

    Names count relative to each given path (moving the project changes nothing); names starting with a
    dot (temporary files, locks, stamps) are ignored; a missing path counts as absent.
    """
    h = hashlib.sha256()
    for path in paths:
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
            entries = [(f"{path.name}/{f.relative_to(path).as_posix()}", f) for f in files]
        else:
            entries = [(path.name, path)] if path.is_file() else []
        h.update(f"{path.name}:{len(entries)}\n".encode())
        for name, f in entries:
            h.update(f"{name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def step_key(step: Step, params: dict, profile_dir: Path, notebooks_dir: Path = config.NOTEBOOKS_DIR) -> str:
    """Hash of everything a step's result depends on; equal keys mean the step need not run again."""
    nb = notebook_path(step, notebooks_dir)
    h = hashlib.sha256()
    h.update(sha256_file(nb).encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    if Path(step.notebook).stem.startswith("00_"):
        h.update(config.mirror_base().encode())  # only the data step reads the upstream sources
    root = Path(__file__).resolve().parent
    for dep in package_dependencies(nb):
        h.update(str(dep.relative_to(root)).encode())
        h.update(sha256_file(dep).encode())
        if dep.name == "__init__.py":  # package data beside a package's modules (templates)
            for data in sorted(dep.parent.glob(f"*{PACKAGE_DATA_SUFFIX}")):
                h.update(f"{data.relative_to(root)}\0{sha256_file(data)}".encode())
    h.update(content_digest(input_paths(step, profile_dir)).encode())
    return h.hexdigest()


def render_html(notebook: Path, html: Path) -> None:
    """Render an executed notebook to a standalone HTML file (atomically)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    atomic_write_text(html, body)


def check_kernel(kernel: str = KERNEL_NAME) -> None:
    """Fail early, with the fix, when the project's Jupyter kernel is not registered."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel as exc:
        raise RuntimeError(
            f"Jupyter kernel {kernel!r} is not registered for {sys.executable}; run `make setup` "
            "(it registers the project's own environment as that kernel)"
        ) from exc


def kernel_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the notebooks' kernels: ``base`` (default: this process's), with the runtime variables
    (``config.RUNTIME_ENV``) it lacks (a value the user set wins)."""
    return {**config.RUNTIME_ENV, **(os.environ if base is None else base)}


def _ipc_kernel_manager(runtime_dir: Path, env: dict[str, str]) -> type:
    """A kernel manager on local IPC sockets (no TCP ports, no ipykernel warning about plain-text TCP) whose
    connection file and sockets live in ``runtime_dir``, starting kernels with the environment ``env``."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.connection_file = str(runtime_dir / "kernel.json")
            self.ip = str(runtime_dir / "kernel-ipc")

        async def start_kernel(self, **kw: Any) -> None:
            await super().start_kernel(**{"env": env, **kw})

    return IPCKernelManager


def _execute(nb_in: Path, nb_out: Path, params: dict, kernel: str, step: Step, env: dict[str, str]) -> None:
    """Execute one notebook with papermill in a kernel with environment ``env``, its sockets in a runtime folder
    of its own (removed afterwards, also on failure); on error raise StepFailed naming the step and the cell's error."""
    import papermill
    from jupyter_core.paths import jupyter_runtime_dir
    from papermill.exceptions import PapermillExecutionError

    nb_out.parent.mkdir(parents=True, exist_ok=True)
    Path(jupyter_runtime_dir()).mkdir(parents=True, exist_ok=True)
    runtime_dir = Path(tempfile.mkdtemp(prefix="cxr-", dir=jupyter_runtime_dir()))
    try:
        papermill.execute_notebook(
            str(nb_in),
            str(nb_out),
            parameters=params,
            kernel_name=kernel,
            cwd=str(config.ROOT),
            progress_bar=False,
            log_output=False,
            report_mode=False,
            kernel_manager_class=_ipc_kernel_manager(runtime_dir, env),
        )
    except PapermillExecutionError as exc:
        raise StepFailed(
            f"step {step.name!r} ({nb_in.name}) failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
            f"  the partly executed notebook is kept at {nb_out}"
        ) from exc
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def _new_record(profile: Profile, steps: list[tuple[Step, dict]], env: dict[str, str]) -> dict[str, Any]:
    """The run record (run.json) before any step has run; ``env``: the kernels' environment."""
    from cxrstudy.reporting.record import device_info, git_info, versions

    return {
        "profile": profile.name,
        "description": profile.description,
        "profile_file": str(profile.path),
        "parameters": {s.name: p for s, p in steps},
        "git": git_info(),
        "device": device_info(str(profile.common.get("device", "auto"))),
        "versions": versions(),
        "runtime_env": {k: env.get(k) for k in config.RUNTIME_ENV},  # as the kernels get them
        "data_source": config.mirror_base(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "steps": [],
        "status": "running",
    }


@dataclass
class _Pending:
    """A step that has to run: where its notebook, HTML and stamp go, its key and its record entry so far."""

    step: Step
    params: dict
    nb_in: Path
    nb_out: Path
    html: Path
    stamp_path: Path
    key: str
    entry: dict[str, Any]


def _plan_step(step: Step, params: dict, out: Path, ctx: dict[str, Any]) -> dict[str, Any] | _Pending:
    """The record entry of a step whose key matches its stamp while its outputs exist (or that is not selected),
    else what running it needs."""
    nb_in = notebook_path(step, ctx["notebooks_dir"])
    nb_out, html = out / "notebooks" / f"{step.name}.ipynb", out / "html" / f"{step.name}.html"
    stamp_path = out / ".stamps" / f"{step.name}.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    entry = {
        "name": step.name,
        "notebook": nb_in.name,
        "notebook_out": str(nb_out.relative_to(out)),
        "html": str(html.relative_to(out)),
        "parameters": params,
    }
    key = step_key(step, params, out, ctx["notebooks_dir"])
    written = [nb_out, html, *output_paths(step, out)]
    up_to_date = not ctx["force"] and stamp.get("key") == key and all(p.exists() for p in written)
    if up_to_date or (ctx["only"] and step.name not in ctx["only"]):
        print(f"  {step.name}: unchanged, skipped", flush=True)
        return {
            **entry,
            "status": "cached",
            "seconds": stamp.get("seconds"),
            "finished": stamp.get("finished"),
        }
    return _Pending(step, params, nb_in, nb_out, html, stamp_path, key, entry)


def _begin(run: _Pending) -> None:
    """Announce a step and remove its stamp (a step that does not finish has none)."""
    print(f"  {run.step.name}: running {run.nb_in.name} ...", flush=True)
    run.stamp_path.unlink(missing_ok=True)


def _finish(run: _Pending, out: Path, seconds: float, where: dict[str, str]) -> dict[str, Any]:
    """A step whose notebook ran: check its declared outputs (StepFailed without them), render its HTML, write its
    stamp; returns its record entry."""
    if missing := [str(p) for p in output_paths(run.step, out) if not p.exists()]:
        raise StepFailed(
            f"step {run.step.name!r} ({run.nb_in.name}) finished without writing {missing}, which "
            f"pipeline.STEP_IO declares it writes"
        )
    render_html(run.nb_out, run.html)
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    write_json(run.stamp_path, {"key": run.key, "seconds": seconds, "finished": finished})
    print(f"  {run.step.name}: done in {seconds:.1f} s", flush=True)
    return {**run.entry, "status": "ran", "seconds": seconds, "finished": finished, **where}


def _failed(run: _Pending, seconds: float, where: dict[str, str]) -> dict[str, Any]:
    """The record entry of a step that failed."""
    return {**run.entry, "status": "failed", "seconds": round(seconds, 2), **where}


def _run_step(step: Step, params: dict, out: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run one step in this process unless it is up to date (or not selected); returns its record entry."""
    from cxrstudy.executor import task_location

    run = _plan_step(step, params, out, ctx)
    if isinstance(run, dict):
        return run
    _begin(run)
    where = task_location()
    t0 = time.perf_counter()
    try:
        _execute(run.nb_in, run.nb_out, params, ctx["kernel"], step, ctx["env"])
        return _finish(run, out, round(time.perf_counter() - t0, 2), where)
    except StepFailed:
        ctx["record"]["steps"].append(_failed(run, time.perf_counter() - t0, where))
        raise


def _overlap(a: Path, b: Path) -> bool:
    """Whether two paths are the same or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def step_dependencies(steps: list[Step], profile_dir: Path) -> dict[str, list[str]]:
    """Each step's dependencies: the earlier steps that write what it reads (``STEP_IO``; a path read and a path
    written depend when one is the other or lies inside it)."""
    deps: dict[str, list[str]] = {}
    for i, step in enumerate(steps):
        reads = input_paths(step, profile_dir)
        deps[step.name] = [
            e.name for e in steps[:i] if any(_overlap(r, w) for r in reads for w in output_paths(e, profile_dir))
        ]
    return deps


#: The OpenMP setting of a step's kernel started beside another step's on a host whose cores tasks share: idle
#: threads sleep instead of spinning on cores the other kernel needs (numbers unchanged: the thread count and each
#: thread's share of the work stay the local run's).
SHARED_CORES_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def project_env() -> dict[str, str]:
    """The study's own settings (``CXR_*`` variables) of this process, which every kernel of the run gets."""
    return {k: v for k, v in os.environ.items() if k.startswith("CXR_")}


def run_task(nb_in: str, nb_out: str, params: dict, kernel: str, step: Step, env: dict[str, str]) -> dict[str, Any]:
    """One step's papermill run as a cluster task: the kernel gets the worker's environment without the nanny's
    additions (``executor.worker_environ``, ``kernel_env``) with ``env`` over it; returns its seconds and where it ran (StepFailed naming the node when the notebook raised)."""
    from cxrstudy.executor import task_location, worker_environ

    where = task_location()
    t0 = time.perf_counter()
    try:
        _execute(Path(nb_in), Path(nb_out), params, kernel, step, {**kernel_env(worker_environ()), **env})
    except StepFailed as exc:
        on = " ".join(f"{k} {v}" for k, v in where.items())
        raise StepFailed(f"{exc}\n  it ran on {on}") from exc
    return {"seconds": round(time.perf_counter() - t0, 2), **where}


def worker_problems(token_path: str, token: str, manifest: str, manifest_sha: str | None, package: str, kernel: str) -> list[str]:
    """What keeps a worker from running the study's steps: the driver's token file in the profile's folder not
    readable with its content (no shared project folder), another manifest, another copy of the package, no kernel."""
    import cxrstudy

    problems = []
    try:
        if Path(token_path).read_text() != token:
            problems.append(f"{token_path} has other content than the driver wrote (not the same folder)")
    except OSError as exc:
        problems.append(f"cannot read {token_path}, which the driver just wrote ({exc}): the project folder is not shared")
    if manifest_sha is not None:
        if not Path(manifest).is_file():
            problems.append(f"the manifest {manifest} does not exist here")
        elif sha256_file(Path(manifest)) != manifest_sha:
            problems.append(f"the manifest {manifest} differs from the driver's")
    if str(Path(cxrstudy.__file__).resolve()) != package:
        problems.append(f"imports cxrstudy from {Path(cxrstudy.__file__).resolve()}, the driver from {package}")
    try:
        check_kernel(kernel)
    except RuntimeError as exc:
        problems.append(str(exc))
    return problems


def _check_cluster(pool: Any, out: Path, kernel: str) -> None:
    """Fail before any step when a worker cannot see the project folder or the manifest (``worker_problems``)."""
    import cxrstudy

    token = uuid.uuid4().hex
    token_path = out / f".cluster-check-{token[:12]}"
    atomic_write_text(token_path, token)
    manifest = config.MANIFEST_PATH
    try:
        pool.check_workers(
            worker_problems,
            str(token_path),
            token,
            str(manifest),
            sha256_file(manifest) if manifest.is_file() else None,
            str(Path(cxrstudy.__file__).resolve()),
            kernel,
        )
    finally:
        token_path.unlink(missing_ok=True)


def _recorded_seconds(path: Path) -> dict[str, float]:
    """Step name -> seconds, for the steps that ran or were cached with seconds in the run.json at ``path``;
    ProfileError naming the file when it is not such a record."""
    try:
        record = json.loads(path.read_text())
        entries = record["steps"]
        return {
            str(e["name"]): float(e["seconds"])
            for e in entries
            if e.get("status") in ("ran", "cached") and isinstance(e.get("seconds"), (int, float))
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProfileError(f"timings {path}: not a readable run.json with steps ({exc})") from exc


def expected_seconds(out: Path, timings: Path | None = None) -> tuple[dict[str, float], list[str]]:
    """Each step's expected seconds and where they came from: ``timings`` (a run.json) first, then the profile's own
    stamps, then its last run.json; a step none of them timed has none."""
    found: dict[str, float] = {}
    sources: list[str] = []
    if timings is not None:
        found.update(_recorded_seconds(timings))
        sources.append(str(timings))
    stamps = {}
    for stamp in sorted((out / ".stamps").glob("*.json")):
        try:
            seconds = json.loads(stamp.read_text()).get("seconds")
        except (OSError, ValueError):
            continue  # a stamp that cannot be read only means the step runs again
        if isinstance(seconds, (int, float)):
            stamps[stamp.stem] = float(seconds)
    if stamps:
        sources.append(str(out / ".stamps"))
    previous = _recorded_seconds(out / "run.json") if (out / "run.json").is_file() else {}
    if previous:
        sources.append(str(out / "run.json"))
    return {**previous, **stamps, **found}, sources


def submission_order(runs: list[Any], expected: dict[str, float], order: dict[str, int]) -> list[Any]:
    """Runs (``.step.name``) in the order a cluster starts them: steps never timed first, then the longest
    expected first; ties in profile order."""
    def rank(run: Any) -> tuple:
        name = run.step.name
        return (0, 0.0, order[name]) if name not in expected else (1, -expected[name], order[name])

    return sorted(runs, key=rank)


def _run_on_cluster(
    steps: list[tuple[Step, dict]], out: Path, ctx: dict[str, Any], pool: Any, timings: Path | None = None
) -> None:
    """Run the steps as tasks of ``pool`` (``executor.DaskPool``): every step whose dependencies
    (``step_dependencies``) have finished is planned here (cache, key) and queued; the driver keeps as many steps
    running as the cluster has task slots (``pool.slots()``), started in ``submission_order`` of their
    ``expected_seconds``, checks each finished task's outputs and writes its stamp. A step started while another
    runs or starts, on a cluster whose tasks share a host's cores, gets :data:`SHARED_CORES_ENV`. After a failure
    nothing more is started; the running tasks are awaited (their stamps kept), then the first failure is raised.
    Record entries stay in profile order."""
    from cxrstudy.executor import TaskLost

    deps = step_dependencies([s for s, _ in steps], out)
    shared = pool.shares_cores and not set(SHARED_CORES_ENV) & set(os.environ)  # a value the user set wins
    order = {s.name: i for i, (s, _) in enumerate(steps)}
    expected, sources = expected_seconds(out, timings)
    ctx["record"]["executor"]["order"] = {"rule": "longest expected first", "timings": sources}
    entries = ctx["record"]["steps"]
    todo, done = list(steps), set()
    queue: list[_Pending] = []
    running: dict[Any, tuple[_Pending, float]] = {}
    failure: StepFailed | None = None
    env = project_env()
    try:
        while todo or queue or running:
            ready = [] if failure else [(s, p) for s, p in todo if set(deps[s.name]) <= done]
            if ready:
                for step, params in ready:
                    todo = [(s, p) for s, p in todo if s.name != step.name]
                    run = _plan_step(step, params, out, ctx)
                    if isinstance(run, dict):
                        entries.append(run)
                        done.add(step.name)
                    else:
                        queue.append(run)
                continue  # a cached step may have made others ready
            if failure:
                queue = []  # planned but not begun: like the steps never reached
            free = pool.slots() - len(running) if queue else 0
            batch = submission_order(queue, expected, order)[: max(free, 0 if running else 1)]
            beside = shared and len(running) + len(batch) > 1  # started beside another step
            for run in batch:
                queue.remove(run)
                step_env = {**env, **SHARED_CORES_ENV} if beside else env
                run.entry.update({k.lower(): v for k, v in step_env.items() if k in SHARED_CORES_ENV})
                if run.step.name in expected:
                    run.entry["expected_seconds"] = expected[run.step.name]
                _begin(run)
                args = (str(run.nb_in), str(run.nb_out), run.params, ctx["kernel"], run.step, step_env)
                running[pool.submit(run.step.name, run_task, *args)] = (run, time.perf_counter())
            if not running:
                break
            for future in pool.wait_first(list(running)):
                run, t0 = running.pop(future)
                try:
                    try:
                        result = pool.result(future)
                    except TaskLost as exc:
                        raise StepFailed(f"step {run.step.name!r} ({run.nb_in.name}) did not finish: {exc}") from exc
                    where = {k: v for k, v in result.items() if k != "seconds"}
                    entries.append(_finish(run, out, result["seconds"], where))
                    done.add(run.step.name)
                except StepFailed as exc:
                    entries.append(_failed(run, time.perf_counter() - t0, {}))
                    failure = failure or exc
                    if running:
                        print(f"  {run.step.name}: failed; waiting for {len(running)} running step(s)", flush=True)
        if failure:
            raise failure
    finally:
        entries.sort(key=lambda e: order[e["name"]])


def run_profile(
    name: str,
    force: bool = False,
    kernel: str = KERNEL_NAME,
    only: list[str] | None = None,
    params_dir: Path = config.PARAMS_DIR,
    notebooks_dir: Path = config.NOTEBOOKS_DIR,
    reports_dir: Path = config.REPORTS_DIR,
    executor: str = "local",
    scheduler: str | None = None,
    workers: int | None = None,
    cpus_per_task: int = 1,
    timings: Path | None = None,
) -> dict[str, Any]:
    """Run a profile's steps (skipping unchanged ones) under the profile's lock; write run.json and index.html.

    ``executor="local"`` runs them in order in this process; ``"dask"`` runs them as tasks on the Dask scheduler at
    ``scheduler``, else on a cluster of this machine (``workers`` workers; ``executor.local_cluster``), longest
    expected step first by ``timings`` (a run.json) or the profile's own last record (``expected_seconds``)."""
    from cxrstudy.executor import DaskPool, task_location
    from cxrstudy.reporting.pages import write_index
    from cxrstudy.runlock import profile_lock

    profile = load_profile(name, params_dir)
    steps = step_parameters(profile, notebooks_dir)
    missing = sorted(set(only or ()) - {s.name for s, _ in steps})
    if missing:
        raise ProfileError(f"--only: no step(s) {missing} in profile {profile.name!r}")
    if executor not in EXECUTORS:
        raise ProfileError(f"executor {executor!r}: expected one of {EXECUTORS}")
    if timings is not None:
        if executor == "local":
            raise ProfileError("timings order a cluster's steps; the local executor runs them in profile order")
        _recorded_seconds(timings)  # a bad file fails before the cluster starts
    check_kernel(kernel)
    out = reports_dir / profile.name
    with profile_lock(out, f"reproduce --profile {profile.name}"):
        env = kernel_env()
        record = _new_record(profile, steps, env)
        ctx = {
            "env": env,
            "notebooks_dir": notebooks_dir,
            "force": force,
            "only": only,
            "kernel": kernel,
            "record": record,
        }
        t_start = time.perf_counter()
        print(f"reproduce: profile {profile.name!r} ({len(steps)} steps) -> {out}", flush=True)
        try:
            if executor == "local":
                record["executor"] = {"name": "local", **task_location()}
                for step, params in steps:
                    record["steps"].append(_run_step(step, params, out, ctx))
            else:
                with DaskPool.open(scheduler, workers, cpus_per_task) as pool:
                    record["executor"] = pool.describe()
                    print(f"reproduce: on the Dask scheduler {record['executor']['scheduler']}", flush=True)
                    _check_cluster(pool, out, kernel)
                    _run_on_cluster(steps, out, ctx, pool, timings)
            record["status"] = "ok"
            if any(s["status"] == "ran" for s in record["steps"]):
                cached = sum(s.get("seconds") or 0 for s in record["steps"] if s["status"] == "cached")
                record.update(reference_rate(profile, time.perf_counter() - t_start + cached))
        except StepFailed:
            record["status"] = "failed"
            raise
        finally:
            record["ended"] = datetime.now(UTC).isoformat(timespec="seconds")
            record["wall_seconds"] = round(time.perf_counter() - t_start, 2)
            write_json(out / "run.json", record)
            write_index(out, record)
    return record


#: The reference machine's bare training step (``make bench``) and the default profile's budget on it.
REFERENCE_IMG_S = 85.0
BUDGET_SECONDS = 1800.0
#: How long the run's own bare training figure is measured.
REFERENCE_SECONDS = 10.0


def reference_rate(profile: Profile, wall_seconds: float) -> dict[str, Any]:
    """``reference_train_img_s``: this machine's bare forward + backward + AdamW step (``make bench``'s, the
    profile's backbone, image size and batch), measured for :data:`REFERENCE_SECONDS`; and ``budget``: the
    profile's wall time (``wall_seconds``: this run's, plus the recorded seconds of the steps it found cached)
    scaled to the reference machine (wall x bare / :data:`REFERENCE_IMG_S`) against :data:`BUDGET_SECONDS`.
    Empty for a profile without a backbone."""
    common = profile.common
    if "backbone" not in common:
        return {}
    from cxrstudy.training import bare_train_rate

    bare = bare_train_rate(
        str(common["backbone"]), int(common.get("image_size", 160)), int(common.get("batch_size", 32)),
        str(common.get("device", "auto")), REFERENCE_SECONDS,
    )
    scaled = wall_seconds * bare["img_s"] / REFERENCE_IMG_S
    return {
        "reference_train_img_s": bare["img_s"],
        "reference_train": {**bare, "runtime_env": config.runtime_env()},
        "budget": {
            "wall_seconds": round(wall_seconds, 1),
            "reference_img_s": REFERENCE_IMG_S,
            "wall_on_reference_s": round(scaled, 1),
            "limit_on_reference_s": BUDGET_SECONDS,
            "within": bool(scaled <= BUDGET_SECONDS),
        },
    }


def rerender(name: str) -> None:
    """Re-render HTML for every executed notebook of a profile and rebuild index.html."""
    from cxrstudy.reporting.pages import write_index

    out = config.profile_dir(name)
    for nb in sorted((out / "notebooks").glob("*.ipynb")):
        render_html(nb, out / "html" / f"{nb.stem}.html")
    run_json = out / "run.json"
    record = json.loads(run_json.read_text()) if run_json.is_file() else {"profile": name, "steps": []}
    write_index(out, record)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``reproduce``, ``html`` and ``params`` (print what each step would get)."""
    parser = argparse.ArgumentParser(prog="python -m cxrstudy.pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the profile's notebooks in order")
    rep.add_argument("--profile", default="default")
    rep.add_argument("--force", action="store_true", help="re-run every step even if unchanged")
    rep.add_argument("--only", nargs="*", help="run only these step names (others count as cached)")
    rep.add_argument("--kernel", default=KERNEL_NAME)
    rep.add_argument("--executor", choices=EXECUTORS, default="local", help="local: in order here; dask: on a cluster")
    rep.add_argument("--scheduler", help="address of a running Dask scheduler (default: a cluster of this machine)")
    rep.add_argument("--workers", type=int, help="workers of this machine's cluster (default: sized to the machine)")
    rep.add_argument("--cpus-per-task", type=int, default=1, help="CPUs each step asks of a CPU worker")
    rep.add_argument(
        "--timings", type=Path,
        help="run.json whose step seconds order a cluster's steps, longest first (default: this profile's own record)",
    )
    html = sub.add_parser("html", help="re-render HTML and index.html")
    html.add_argument("--profile", default="default")
    prm = sub.add_parser("params", help="print the parameters each step gets")
    prm.add_argument("--profile", default="default")
    args = parser.parse_args(argv)
    try:
        if args.command == "reproduce":
            if args.executor == "local" and (args.scheduler or args.workers or args.timings):
                parser.error("--scheduler, --workers and --timings need --executor dask")
            config.reexec_with_runtime_env()  # the run's bare training figure needs make bench's allocator settings
            record = run_profile(
                args.profile,
                force=args.force,
                kernel=args.kernel,
                only=args.only,
                executor=args.executor,
                scheduler=args.scheduler,
                workers=args.workers,
                cpus_per_task=args.cpus_per_task,
                timings=args.timings,
            )
            out = config.profile_dir(args.profile)
            print(f"reproduce: done in {record['wall_seconds']:.1f} s; open {out / 'index.html'}")
        elif args.command == "html":
            rerender(args.profile)
        else:
            for step, params in step_parameters(load_profile(args.profile)):
                print(f"{step.name}: {json.dumps(params, default=str)}")
    except (ProfileError, StepFailed, RuntimeError) as exc:  # RunLocked is a RuntimeError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
