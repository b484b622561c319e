#!/usr/bin/env bash
# EasyEdit's examples/run_AlphaEdit_editing.py, one run per alg_name, one after another
# (README "Use with EasyEdit"). Writes OUT/<alg>/ (the script's own results JSON),
# OUT/<alg>.log and one line per finished run to OUT/times.tsv (alg, edits, wall seconds, exit code).
#
#   tools/easyedit_side_by_side.sh EASYEDIT_DIR OUT_DIR [ALG:N ...]
#
# EASYEDIT_DIR is an EasyEdit checkout holding yaml/<ALG>.yaml, cf/counterfact.json and the
# statistics the YAMLs name (README steps 1-4). The script runs unchanged: directly for the
# names its --editing_method switch loads (MEMIT, AlphaEdit and their plugin names), through
# tools/run_easyedit_example.py for the others (MEMIT-FE, PMET, EMMET, ...). Each run gets a
# fresh plugin anchor cache, so every run optimizes every anchor. Python: $EASYEDIT_PYTHON
# (default python), with the plugin importable and its .pth hook active.
set -u
EE=$(cd "$1" && pwd)
OUT=$(mkdir -p "$2" && cd "$2" && pwd)
shift 2
PLUGIN=$(cd "$(dirname "$0")/.." && pwd)
PY=${EASYEDIT_PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
RUNS=("$@")
if [ ${#RUNS[@]} -eq 0 ]; then
  RUNS=(MEMIT-FE:8 MEMIT:8 MEMIT_REPLAY:8 MEMIT_SPREAD:8 AlphaEdit:8 AlphaEdit_REPLAY:8
        PMET:4 PMET_REPLAY:4 EMMET:4 EMMET_REPLAY:4)
fi
cd "$EE/examples" || exit 1
for spec in "${RUNS[@]}"; do
  alg=${spec%%:*}
  n=${spec##*:}
  case $alg in
    MEMIT|MEMIT_*) launch=("$PY" run_AlphaEdit_editing.py --editing_method MEMIT) ;;
    AlphaEdit|AlphaEdit_*) launch=("$PY" run_AlphaEdit_editing.py --editing_method AlphaEdit) ;;
    *) launch=("$PY" "$PLUGIN/tools/run_easyedit_example.py" run_AlphaEdit_editing.py --editing_method MEMIT) ;;
  esac
  start=$(date +%s.%N)
  EASYEDIT_REPLAY_ANCHOR_CACHE="$OUT/anchors/$alg" nice -n 10 "${launch[@]}" --hparams_dir "$EE/yaml/$alg.yaml" \
    --data_dir "$EE/cf" --data_type CF --ds_size "$n" --output_dir "$OUT/$alg" > "$OUT/$alg.log" 2>&1
  rc=$?
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  printf '%s\t%s\t%.1f\t%s\n' "$alg" "$n" "$secs" "$rc" >> "$OUT/times.tsv"
done
