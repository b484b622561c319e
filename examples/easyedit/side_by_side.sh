#!/usr/bin/env bash
# EasyEdit's examples/run_AlphaEdit_editing.py, unchanged, one run per alg_name, one after
# another (docs/easyedit.md). Writes OUT_DIR/<alg>/ (the script's own results JSON),
# OUT_DIR/<alg>.log and one line per finished run to OUT_DIR/times.tsv (alg, edits, wall
# seconds, exit code); examples/easyedit/table.py OUT_DIR prints the table.
#
#   examples/easyedit/side_by_side.sh EASYEDIT_DIR WORK_DIR OUT_DIR [ALG:N ...]
#
# EASYEDIT_DIR is an EasyEdit checkout. WORK_DIR holds yaml/<ALG>.yaml, cf/counterfact.json and
# the statistics the YAMLs name (what examples/easyedit/run_recipe.sh writes). The script runs
# directly for the names its --editing_method switch loads (MEMIT, AlphaEdit and their plugin
# names), through examples/easyedit/run_example.py for the others (MEMIT-FE, PMET, EMMET, ...).
# Each run gets its own empty plugin anchor cache (OUT_DIR/anchors/<alg>), so every run
# optimizes every anchor and wall times do not depend on the order of the runs.
# Python: $EASYEDIT_PYTHON (default python), with EasyEdit's requirements and the plugin installed.
set -u
if [ $# -lt 3 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
EE=$(cd "$1" && pwd) || exit 2
WORK=$(cd "$2" && pwd) || exit 2
OUT=$(mkdir -p "$3" && cd "$3" && pwd) || exit 2
shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${EASYEDIT_PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
RUNS=("$@")
if [ ${#RUNS[@]} -eq 0 ]; then
  RUNS=(MEMIT:4 MEMIT_REPLAY:4)
fi
for spec in "${RUNS[@]}"; do
  if [ ! -f "$WORK/yaml/${spec%%:*}.yaml" ]; then
    echo "side_by_side.sh: no $WORK/yaml/${spec%%:*}.yaml (runs are ALG:N with a YAML per ALG)" >&2
    exit 2
  fi
done
cd "$EE/examples" || exit 2
for spec in "${RUNS[@]}"; do
  alg=${spec%%:*}
  n=${spec##*:}
  case $alg in
    MEMIT|MEMIT_*) launch=("$PY" run_AlphaEdit_editing.py --editing_method MEMIT) ;;
    AlphaEdit|AlphaEdit_*) launch=("$PY" run_AlphaEdit_editing.py --editing_method AlphaEdit) ;;
    *) launch=("$PY" "$HERE/run_example.py" run_AlphaEdit_editing.py --editing_method MEMIT) ;;
  esac
  echo "side_by_side.sh: $alg, $n edits (log: $OUT/$alg.log)"
  start=$(date +%s%N)
  EASYEDIT_REPLAY_ANCHOR_CACHE="$OUT/anchors/$alg" nice -n 10 "${launch[@]}" --hparams_dir "$WORK/yaml/$alg.yaml" \
    --data_dir "$WORK/cf" --data_type CF --ds_size "$n" --output_dir "$OUT/$alg" > "$OUT/$alg.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%s\t%s\t%d.%d\t%s\n' "$alg" "$n" $((ms / 1000)) $((ms % 1000 / 100)) "$rc" >> "$OUT/times.tsv"
  if [ $rc -ne 0 ]; then
    echo "side_by_side.sh: $alg exited $rc; the end of $OUT/$alg.log:" >&2
    tail -n 5 "$OUT/$alg.log" >&2
  fi
done
