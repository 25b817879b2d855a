#!/usr/bin/env bash
# One prepared run on a GPU machine (issue 10): the GPU tests, the training-step benchmark and every stage of the
# default config as dvc.yaml runs it, each stage timed with nvidia-smi sampled every 0.5 s.
#
#   bash ../shared/gpu/wheels.sh                 # here: the packages a stock PyTorch image lacks, into .whl/
#   bash benchmarks/gpu_run.sh OUT_DIR           # there, from the project root, with .whl/ and data/raw/ carried
#
# Resumable: every step leaves a marker in .gpu_run/ (ignored by git), so a second call on the same warm machine
# with the same command goes on where a call cut short by its time limit stopped. STAGES="..." picks stages.
# The stages run with trainer.fast.cuda_graph=auto when the GPU test of the graphed step passes, false otherwise;
# a stage that fails with the graph is run again without it (as STAGE_eager).
# Writes OUT_DIR/gpu_run.tgz, refreshed after every step: stages.csv (stage, exit code, wall s, mean/max GPU
# utilisation %, max GPU memory MiB), machine.txt, the logs, the benchmark's JSON (reports/bench/) and every stage's
# metrics (reports/metrics/).
set -uo pipefail
OUT=${1:-gpu_out}; RUN=.gpu_run; mkdir -p "$OUT" "$RUN"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db
[ -f "$RUN/machine.txt" ] || { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch, lightning, xgboost; print('torch', torch.__version__, 'lightning', lightning.__version__, 'xgboost', xgboost.__version__, 'cuda', torch.version.cuda)"
} > "$RUN/machine.txt" 2>&1
[ -f "$RUN/stages.csv" ] || echo "stage,rc,wall_s,gpu_util_mean,gpu_util_max,gpu_mem_max_mib" > "$RUN/stages.csv"

timed() {  # timed NAME COMMAND...: run, time and sample the GPU, unless an earlier call finished NAME
  local name=$1; shift
  [ -f "$RUN/done_$name" ] && return "$(cat "$RUN/done_$name")"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$RUN/smi_$name.csv" &
  local smi=$! start=$(date +%s.%N)
  "$@" > "$RUN/log_$name.txt" 2>&1
  local rc=$? end=$(date +%s.%N)
  kill $smi; wait $smi 2>/dev/null
  awk -F, -v n="$name" -v rc=$rc -v s="$start" -v e="$end" '{u+=$1; if ($1>um) um=$1; if ($2>mm) mm=$2; c++}
    END {printf "%s,%d,%.1f,%.1f,%d,%d\n", n, rc, e-s, c ? u/c : 0, um, mm}' "$RUN/smi_$name.csv" >> "$RUN/stages.csv"
  echo $rc > "$RUN/done_$name"
  tail -n 3 "$RUN/log_$name.txt"; tail -n 1 "$RUN/stages.csv"
  mkdir -p "$RUN/reports"; cp -r reports/bench reports/metrics "$RUN/reports/" 2>/dev/null
  tar czf "$OUT/gpu_run.tgz" --exclude='done_*' -C "$RUN" .
  return $rc
}
HYDRA="--config-dir . --config-name params hydra.run.dir=. hydra.output_subdir=null hydra/job_logging=stdout \
  hydra/hydra_logging=none"

if timed graph_test python3 -m pytest -q -p no:cacheprovider tests/test_fast.py -k cuda_graph_step; then
  GRAPH=auto; else GRAPH=false; fi
grep -q cuda_graph "$RUN/machine.txt" || echo "stages ran with trainer.fast.cuda_graph=$GRAPH" >> "$RUN/machine.txt"
timed gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_fast.py tests/test_resident.py \
  tests/test_models.py tests/test_segmentation.py tests/test_xgb_device.py tests/test_search.py -k "cuda or gpu"
BENCH="--epochs ${BENCH_EPOCHS:-5} --precision 32-true,bf16-mixed trainer.enable_progress_bar=false"
timed bench_ae python3 -m aelab.bench --models deep conv $BENCH trainer.fast.cuda_graph=false
timed bench_ae_graph python3 -m aelab.bench --models deep conv $BENCH --out reports/bench/graph \
  trainer.fast.cuda_graph=true
timed download unshare -n python3 -m aelab.stages.download $HYDRA
timed import_probe python3 -X importtime -c "import aelab.stages.pretrain"  # where a stage's fixed cost goes
for s in ${STAGES:-make_segmentation_set make_color_set pretrain features denoise colorize segment lr_search \
         momentum_search regularization anomaly tabular downstream report}; do
  timed "$s" python3 -m aelab.stages."$s" $HYDRA trainer.fast.cuda_graph=$GRAPH ||
    [ $GRAPH = false ] || timed "${s}_eager" python3 -m aelab.stages."$s" $HYDRA trainer.fast.cuda_graph=false
done
timed bench_segnet python3 -m aelab.bench --models segnet $BENCH segment.max_epochs=3
column -s, -t "$RUN/stages.csv"
