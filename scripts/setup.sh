#!/usr/bin/env bash
# Create .venv, install the pinned environment, register the Jupyter kernel, enable nbdime for git.
# Idempotent: re-running with nothing changed only re-checks; `make setup` skips it entirely via a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
KERNEL=${KERNEL:-cxrstudy}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
# The environment takes about 7 GB (torch's x86_64 wheel is a CUDA build): say so before pip runs out of disk.
FREE_MB=$(df -Pm "$(dirname "$VENV")" | awk 'NR==2 {print $4}')
if [ -n "$FREE_MB" ] && [ "$FREE_MB" -lt 8000 ]; then
  echo "setup: warning: only ${FREE_MB} MB free beside $VENV; the environment needs about 7,000 MB" >&2
fi
export PIP_NO_CACHE_DIR=1   # nothing kept in ~/.cache/pip: the wheels are installed once per venv
"$VENV/bin/python" -m pip install --quiet --upgrade pip

# torch/torchvision pins depend on the machine (pyproject.toml carries the same markers).
case "$(uname -m)" in
  aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *)             TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
echo "setup: installing $TORCH and the pinned project (pyproject.toml) into $VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet $TORCH -e ".[dev]"

# A fixed kernel name inside the venv: papermill then always runs notebooks in this environment.
# The kernel spec carries the allocator settings of cxrstudy.config.RUNTIME_ENV (JupyterLab kernels get them too).
# shellcheck disable=SC2046
"$VENV/bin/python" -m ipykernel install --sys-prefix --name "$KERNEL" --display-name "Python ($KERNEL)" \
  $("$VENV/bin/python" -c 'from cxrstudy.config import RUNTIME_ENV; print(" ".join(f"--env {k} {v}" for k, v in RUNTIME_ENV.items()))') >/dev/null
echo "setup: Jupyter kernel '$KERNEL' -> $("$VENV/bin/python" -c 'import sys; print(sys.executable)')"

# nbdime's git drivers, with absolute paths so `git diff` works without activating the venv.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  BIN="$(cd "$VENV/bin" && pwd)"
  git config diff.jupyternotebook.command "$BIN/git-nbdiffdriver diff"
  git config merge.jupyternotebook.driver "$BIN/git-nbmergedriver merge %O %A %B %L %P"
  git config merge.jupyternotebook.name "jupyter notebook merge driver"
  git config difftool.nbdime.cmd "$BIN/git-nbdifftool diff \"\$LOCAL\" \"\$REMOTE\" \"\$BASE\""
  git config mergetool.nbdime.cmd "$BIN/git-nbmergetool merge \"\$BASE\" \"\$LOCAL\" \"\$REMOTE\" \"\$MERGED\""
  echo "setup: nbdime enabled for git in this repository (git diff shows notebooks cell by cell)"
fi
"$VENV/bin/python" -m pip check >/dev/null || { echo "setup: pip check failed" >&2; "$VENV/bin/python" -m pip check; exit 1; }
echo "setup: done"
