#!/usr/bin/env bash
# The GPU check: one command that, on one CUDA GPU (sized for an H100 or H200: at most 8 minutes, see the
# budget below), runs the gpu-marked tests and measures what a CPU cannot, then writes ONE Markdown report.
#
#   benchmarks/gpu_check.sh [--out FILE.md] [--budget SECONDS]   # on the GPU machine, from anywhere
#   benchmarks/gpu_check.sh --dry-run [--out FILE.md]             # on a CPU: every section at tiny sizes
#
# Sections, in this order (each one in its own process group, with a time limit):
#   install      wheels from .whl/ (when the folder exists), see below
#   environment  GPU, driver, CUDA, torch, Python, CPU
#   tests        every gpu-marked test of tests/ (pytest -m gpu): fp16 blocks vs fp32, the reference's pinned
#                outputs on CUDA, a CUDA training step, sharded evaluation, the evaluator's forward paths
#   training     s/kimg of model=stylegan2 at 256 px, eager (benchmarks/train.py, fidmed only; a few iterations
#                of batch 32)
#   extractors   images/s of every registered extractor at batch 64, fp32 (contiguous and channels_last) and
#                bf16, with the deviations of channels_last and bf16 (RANDOM-INIT; benchmarks/extractors.py)
#   evaluation   the study's eleven extractors: bf16 FD deviation (a), single pass vs one extractor at a time
#                (b), the pipeline's images/s as a share of the forward-pass bound (d) (benchmarks/evaluate.py)
#   memory       peak GPU memory of a whole evaluation with precision/recall/density/coverage at N = 50,000
#                generated images (benchmarks/evaluate.py section e, inception_tf: the widest feature)
#   compiled     s/kimg eager and compiled, and compiled vs eager after one iteration (benchmarks/train.py
#                --modes eager compiled): last, with what is left of the budget, because compiling the study's
#                networks takes minutes (the dry run leaves the compiled mode out: on a CPU it takes ~8 minutes)
# The report (default benchmarks/results/gpu_check.md) is rewritten after every section, so a run cut short
# keeps what it finished; a run stopped early (a signal, Ctrl-C) prints the sections done and their durations.
# Each section gets min(its own limit, what is left of the budget); a section with under 10 s left is not run.
# The full logs stay in the folder the script prints at the end.
#
# Offline GPU machines: fidmed's pure-Python dependencies (hydra-core, omegaconf, wandb, optuna, h5py, pytest,
# ...) may be missing where torch, timm and Lightning are installed. Prepare the wheels on a machine with
# internet access, from the repository root:
#
#   benchmarks/gpu_wheels.sh .whl 3.12        # the target machine's Python version
#
# and bring .whl/ along (it is ignored by git). This script then installs the wheels of every distribution the
# machine does not have yet, without their dependencies and without touching its environment:
# pip install --no-index --no-deps --target "$FIDMED_SITE" (default /tmp/fidmed-site), put first on PYTHONPATH
# with the repository (nothing is pip-installed into the environment itself).
#
# Environment: PYTHON (default python3), FIDMED_WHEELS (default <repo>/.whl), FIDMED_SITE, GPU_CHECK_BUDGET
# (seconds, default 480; --budget), GPU_CHECK_TRAIN_ARGS (extra arguments of benchmarks/train.py, default
# "--augment noaug": ADA's pipeline would double the training section), TMPDIR (the logs' folder).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=${FIDMED_WHEELS:-$REPO/.whl}
SITE=${FIDMED_SITE:-/tmp/fidmed-site}
BUDGET=${GPU_CHECK_BUDGET:-480}
TRAIN_ARGS=${GPU_CHECK_TRAIN_ARGS:---augment noaug}
DRY=0
OUT=""

usage() { sed -n '2,40p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check.dry-run.md}
  [ -n "${GPU_CHECK_BUDGET:-}" ] || BUDGET=1800
else
  OUT=${OUT:-$REPO/benchmarks/results/gpu_check.md}
fi
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fidmed-gpu-check.XXXXXX")
mkdir -p "$WORK/parts"
export HF_HUB_OFFLINE=1 FIDMED_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 2

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T0=$(now)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
COMMAND="benchmarks/gpu_check.sh$([ "$DRY" = 1 ] && echo " --dry-run") --out $OUT"

NAMES=(install environment tests training extractors evaluation memory compiled)
declare -A STATUS SECS LIMIT TITLE
TITLE=([install]="Install" [environment]="Environment" [tests]="gpu-marked tests"
       [training]="Training speed" [extractors]="Extractors: images/s and forward-path deviations"
       [evaluation]="Evaluation pipeline: bf16 FD deviation, single pass, share of the forward-pass bound"
       [memory]="Peak memory with precision/recall/density/coverage"
       [compiled]="Training speed, eager and compiled")
for n in "${NAMES[@]}"; do STATUS[$n]="not run"; SECS[$n]="-"; LIMIT[$n]="-"; done
CURRENT=""
CURRENT_START=""
CHILD=""
FINISHED=0
STOP_REASON=""

# ------------------------------------------------------------------------------------------------ report
demote() {  # Markdown headings one level down, outside code fences
  awk '/^```/ { fence = !fence } !fence && /^#/ { print "#" $0; next } { print }' "$1"
}

write_report() {
  local tmp="$OUT.tmp" n
  {
    echo "# GPU check"
    echo
    if [ "$DRY" = 1 ]; then
      echo "**DRY RUN on $(uname -n): tiny sizes on the CPU, to check that every section runs. This is not a GPU measurement: no number here says anything about speed or memory.**"
      echo
    fi
    echo "- command: \`$COMMAND\`"
    echo "- started $STARTED; total $(since "$T0") s of a $BUDGET s budget"
    [ -f "$WORK/parts/environment.md" ] && cat "$WORK/parts/environment.md"
    echo
    echo "| section | status | seconds | limit s |"
    echo "|---|---|---|---|"
    for n in "${NAMES[@]}"; do echo "| $n | ${STATUS[$n]} | ${SECS[$n]} | ${LIMIT[$n]} |"; done
    for n in "${NAMES[@]}"; do
      [ "$n" = environment ] && continue
      [ -f "$WORK/parts/$n.md" ] || [ -f "$WORK/$n.log" ] || continue
      echo
      if [ -s "$WORK/parts/$n.md" ] && head -n 1 "$WORK/parts/$n.md" | grep -q "^# "; then
        demote "$WORK/parts/$n.md"  # a part with its own title (a benchmark's report)
      else
        echo "## ${TITLE[$n]}"
        echo
        [ -s "$WORK/parts/$n.md" ] && demote "$WORK/parts/$n.md"
      fi
      case "${STATUS[$n]}" in
        ok|"not run") ;;
        *)
          echo
          echo "${STATUS[$n]}: the last lines of its log:"
          echo
          echo '```text'
          tail -n 40 "$WORK/$n.log" 2>/dev/null
          echo '```'
          ;;
      esac
    done
  } > "$tmp" && mv "$tmp" "$OUT"
}

where_the_time_went() {
  local n
  for n in "${NAMES[@]}"; do printf '  %-12s %-12s %s s\n' "$n" "${STATUS[$n]}" "${SECS[$n]}"; done
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$CURRENT" ]; then
    [ -n "$CHILD" ] && kill -TERM -- "-$CHILD" 2>/dev/null
    STATUS[$CURRENT]="stopped"
    SECS[$CURRENT]=$(since "$CURRENT_START")
  fi
  write_report
  if [ "$FINISHED" != 1 ]; then
    echo
    echo "gpu_check stopped early (${STOP_REASON:-exit status $rc})${CURRENT:+ during section $CURRENT} after" \
         "$(since "$T0") s; where the time went:"
    where_the_time_went
    echo "partial report: $OUT; logs: $WORK"
    [ "$rc" = 0 ] && rc=1
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'STOP_REASON="SIGTERM"; exit 143' TERM
trap 'STOP_REASON="SIGINT"; exit 130' INT

# ------------------------------------------------------------------------------------------------ sections
# run_section NAME CAP CMD...: the command in its own process group, output to $WORK/NAME.log, limited to
# min(CAP, the budget left).
run_section() {
  local name=$1 cap=$2 left limit rc
  shift 2
  left=$(awk -v b="$BUDGET" -v e="$(since "$T0")" 'BEGIN { printf "%d", b - e - 5 }')
  limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 10 ]; then
    STATUS[$name]="not run (budget)"
    echo "== $name: not run, ${left} s of the budget left"
    write_report
    return 0
  fi
  LIMIT[$name]=$limit
  echo "== $name (limit $limit s)"
  CURRENT=$name
  CURRENT_START=$(now)
  setsid timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1 < /dev/null &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  SECS[$name]=$(since "$CURRENT_START")
  CURRENT=""
  case $rc in
    0) STATUS[$name]="ok" ;;
    124|137) STATUS[$name]="timed out" ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
  tail -n 12 "$WORK/$name.log" | sed 's/^/   /'
  echo "   -> ${STATUS[$name]} in ${SECS[$name]} s"
  write_report
}

install_wheels() {  # prints what it did; exports PYTHONPATH with the site folder first
  local w
  if [ ! -d "$WHEELS" ]; then
    echo "No wheels folder ($WHEELS): nothing installed; the machine's own packages are used."
    return 0
  fi
  mapfile -t missing < <("$PY" - "$WHEELS" 2>"$WORK/install.present" <<'EOF'
import importlib.metadata as md
import pathlib
import sys

for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        print(f"already installed: {name} {md.version(name)} (its wheel {wheel.name} not used)", file=sys.stderr)
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
  rm -rf "$SITE" && mkdir -p "$SITE" || return 1
  if [ "${#missing[@]}" -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${missing[@]}" || return 1
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
  echo "From $WHEELS into $SITE (first on PYTHONPATH):"
  echo
  for w in "${missing[@]}"; do echo "- installed: $(basename "$w")"; done
  sed 's/^/- /' "$WORK/install.present"
}

section_install() {
  local rc
  CURRENT=install
  CURRENT_START=$(now)
  echo "== install"
  install_wheels > "$WORK/install.log" 2>&1
  rc=$?
  cp "$WORK/install.log" "$WORK/parts/install.md"
  SECS[install]=$(since "$CURRENT_START")
  CURRENT=""
  if [ "$rc" = 0 ]; then STATUS[install]="ok"; else STATUS[install]="failed (exit $rc)"; fi
  sed 's/^/   /' "$WORK/install.log" | tail -n 12
  echo "   -> ${STATUS[install]} in ${SECS[install]} s"
  write_report
}

ENV_PY='
import os, platform, subprocess, sys
import torch
lines = [f"- Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
         f"cuDNN {torch.backends.cudnn.version()}; host {platform.node()}, {os.cpu_count()} CPUs"]
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"- GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        lines.append(f"- nvidia-smi (driver, power limit, max SM clock): {smi}")
    except (OSError, subprocess.SubprocessError) as e:
        lines.append(f"- nvidia-smi: not available ({e})")
else:
    lines.append("- no CUDA device visible: the CPU ran every section")
try:
    with open("/proc/cpuinfo") as f:
        cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    lines.append(f"- CPU: {cpu}; load average {os.getloadavg()[0]:.2f}")
except (OSError, StopIteration):
    pass
print("\n".join(lines))
'

if [ "$DRY" = 1 ]; then
  DEV=cpu
  # tiny networks on a shared CPU: one thread each (several threads can make them many times slower)
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  TRAIN=(--device cpu --models stylegan2_small --resolution 32 --batch 4 --augment noaug --modes eager
         --repeats 1 --no-reference)
  COMPILED=("${TRAIN[@]}")  # the compiled mode left out: compiling takes minutes on a CPU
  EXTRACTORS=(--device cpu --only resnet --batch 4 --input-size 32 --repeats 1)
  EVALUATION=(--device cpu --only a b d --extractor resnet --input-size 32 --num 6 --batch-size 3)
  MEMORY=(--device cpu --only e --extractor resnet --input-size 32 --mem-num 8 --mem-real 8 --mem-resolution 32
          --batch-size 4 --mem-metrics fd,rfd,prdc)
  CAP_TESTS=600 CAP_TRAIN=600 CAP_EXTRACTORS=600 CAP_EVALUATION=600 CAP_MEMORY=600 CAP_COMPILED=600
else
  DEV=cuda
  # shellcheck disable=SC2206  # GPU_CHECK_TRAIN_ARGS is a list of words on purpose
  TRAIN=(--device cuda --models stylegan2 --resolution 256 --modes eager --no-reference $TRAIN_ARGS)
  # shellcheck disable=SC2206
  COMPILED=(--device cuda --models stylegan2 --resolution 256 --modes eager compiled --no-reference $TRAIN_ARGS)
  EXTRACTORS=(--device cuda --batch 64 --repeats 3 --modes fp32-contiguous fp32 bf16)
  EVALUATION=(--device cuda --only a b d --num 300 --batch-size 64)
  MEMORY=(--device cuda --only e --extractor inception_tf --mem-num 50000 --mem-real 10000 --batch-size 64
          --mem-metrics fd,rfd,prdc)
  # expected on an H100 (estimates from FLOPs: no GPU was available when this was written): tests ~60-90 s,
  # training ~30 s, extractors ~60 s, evaluation ~70 s, memory ~100 s; compiled gets the rest (~2 minutes)
  CAP_TESTS=120 CAP_TRAIN=90 CAP_EXTRACTORS=120 CAP_EVALUATION=150 CAP_MEMORY=150 CAP_COMPILED=300
fi
GPU_TEST_FILES=()
while IFS= read -r f; do GPU_TEST_FILES+=("$f"); done < <(grep -l "pytest.mark.gpu" tests/test_*.py)

echo "GPU check$([ "$DRY" = 1 ] && echo " (DRY RUN on the CPU)"): report $OUT, logs $WORK, budget $BUDGET s"
section_install
run_section environment 60 "$PY" -c "$ENV_PY"
cp "$WORK/environment.log" "$WORK/parts/environment.md" 2>/dev/null
write_report
run_section tests "$CAP_TESTS" "$PY" -m pytest -q -m gpu -rA -p no:cacheprovider "${GPU_TEST_FILES[@]}"
{
  echo "\`pytest -q -m gpu -rA ${GPU_TEST_FILES[*]}\`$([ "$DRY" = 1 ] && echo " (no CUDA here: skipped)"):"
  echo
  echo '```text'
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|^=+ .*(passed|failed|skipped|error|deselected)" \
    "$WORK/tests.log"
  echo '```'
} > "$WORK/parts/tests.md"
run_section training "$CAP_TRAIN" "$PY" benchmarks/train.py "${TRAIN[@]}" --out "$WORK/parts/training.md"
run_section extractors "$CAP_EXTRACTORS" "$PY" benchmarks/extractors.py "${EXTRACTORS[@]}" \
  --out "$WORK/parts/extractors.md"
run_section evaluation "$CAP_EVALUATION" "$PY" benchmarks/evaluate.py "${EVALUATION[@]}" --workdir "$WORK/eval" \
  --out "$WORK/parts/evaluation.md"
run_section memory "$CAP_MEMORY" "$PY" benchmarks/evaluate.py "${MEMORY[@]}" --out "$WORK/parts/memory.md"
run_section compiled "$CAP_COMPILED" "$PY" benchmarks/train.py "${COMPILED[@]}" --out "$WORK/parts/compiled.md"
FINISHED=1
write_report
echo
echo "GPU check done in $(since "$T0") s ($DEV); where the time went:"
where_the_time_went
echo "report: $OUT; logs: $WORK"
for n in "${NAMES[@]}"; do [ "${STATUS[$n]}" = ok ] || exit 1; done
exit 0
