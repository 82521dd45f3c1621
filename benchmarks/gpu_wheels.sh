#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on an offline GPU machine (one that has Python, torch,
# torchvision, timm and Lightning, but not fidmed's other dependencies). Run it on a machine with internet
# access, from the repository root; the target need not be this machine's platform or Python:
#
#   benchmarks/gpu_wheels.sh [DIR] [PYTHON_VERSION] [PLATFORM]     # defaults: .whl 3.12 manylinux x86-64
#
# What it fetches: fidmed's dependencies as pyproject.toml lists them, without those the GPU machine has
# (torch, torchvision, timm, lightning), plus pytest and pytest-timeout for the gpu tests, each with its own
# dependencies, resolved for the target Python and platform (binary wheels only), at the versions installed
# in the repository's .venv when there is one (the versions the test suite runs with; GPU_WHEELS_CONSTRAINTS
# names another pip freeze file). Hydra's parser runtime,
# antlr4-python3-runtime 4.9.3, exists only as a source archive: it is built here into a pure-Python wheel.
# Wheels of distributions that such a machine already has (GPU_WHEELS_SKIP: numpy, pillow, the web libraries,
# torch's own dependencies, ...) are left out to keep the folder small; gpu_check.sh skips any other wheel
# whose distribution is installed there, so a longer list does no harm. Bring DIR along as <repo>/.whl (ignored
# by git) or point FIDMED_WHEELS at it.
set -euo pipefail

out=${1:-.whl}
pyver=${2:-3.12}
platform=${3:-x86_64}
py=${PYTHON:-python3}
skip=${GPU_WHEELS_SKIP:-"numpy scipy pillow packaging pyyaml typing_extensions filelock fsspec jinja2 markupsafe
  sympy mpmath networkx setuptools requests urllib3 idna certifi charset_normalizer six tqdm huggingface_hub
  safetensors lightning_utilities torchmetrics aiohttp aiosignal attrs frozenlist multidict yarl propcache
  aiohappyeyeballs hf_xet nvidia_*"}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
plat=(--only-binary=:all: --python-version "$pyver" --implementation cp
      --platform "manylinux_2_28_$platform" --platform "manylinux_2_17_$platform" --platform "manylinux2014_$platform")

# fidmed's requirements from pyproject.toml (tomllib: Python >= 3.11 on this machine), minus what the GPU
# machine brings; Hydra's packages without their dependencies (antlr4 has no wheel: built below; submitit and
# PyYAML are fetched with the others)
reqs_of() {
  "$py" - "$repo/pyproject.toml" "$1" <<'EOF'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
have = {"torch", "torchvision", "timm", "lightning"}
hydra = {"hydra-core", "omegaconf", "hydra-submitit-launcher"}
deps = list(project["dependencies"])
deps += [r for r in project["optional-dependencies"]["test"] if r.startswith(("pytest>=", "pytest-timeout"))]
name = lambda r: re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower()
if sys.argv[2] == "hydra":
    print("\n".join(r for r in deps if name(r) in hydra))
else:
    print("\n".join([r for r in deps if name(r) not in have | hydra] + ["submitit", "PyYAML"]))
EOF
}
mapfile -t reqs < <(reqs_of others)
mapfile -t hydra < <(reqs_of hydra)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the exact versions the test suite runs with: the repository's .venv (or GPU_WHEELS_CONSTRAINTS, a pip freeze)
constraints=()
if [ -n "${GPU_WHEELS_CONSTRAINTS:-}" ]; then
  constraints=(-c "$GPU_WHEELS_CONSTRAINTS")
elif [ -x "$repo/.venv/bin/python" ]; then
  "$repo/.venv/bin/python" -m pip freeze --exclude-editable | grep -v " @ " > "$tmp/constraints.txt"
  constraints=(-c "$tmp/constraints.txt")
  echo "versions pinned to $repo/.venv's"
fi
echo "fetching for CPython $pyver ($platform): ${reqs[*]} ${hydra[*]} antlr4-python3-runtime==4.9.3"
"$py" -m pip download -q "${plat[@]}" "${constraints[@]}" -d "$tmp" "${reqs[@]}"
"$py" -m pip download -q --no-deps "${plat[@]}" "${constraints[@]}" -d "$tmp" "${hydra[@]}"
"$py" -m pip wheel -q --no-deps -w "$tmp" antlr4-python3-runtime==4.9.3
shopt -s nocasematch
for wheel in "$tmp"/*.whl; do
  dist=$(basename "$wheel")
  dist=${dist%%-*}
  for pattern in $skip; do
    # shellcheck disable=SC2053  # a pattern on purpose (nvidia_*)
    if [[ ${dist//[-.]/_} == ${pattern//[-.]/_} ]]; then
      rm -f "$wheel"
      break
    fi
  done
done
shopt -u nocasematch
mv "$tmp"/*.whl "$out"/
ls "$out"
du -sh "$out"
