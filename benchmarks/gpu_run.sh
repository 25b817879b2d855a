#!/usr/bin/env bash
# One prepared run on a GPU machine (issue 10): the GPU tests, the training-step benchmark and every stage of the
# default config as dvc.yaml runs it, each stage timed with nvidia-smi sampled every 0.5 s.
#
#   bash ../shared/gpu/wheels.sh                 # here: the packages a stock PyTorch image lacks, into .whl/
#   bash benchmarks/gpu_run.sh OUT_DIR           # there, from the project root, with .whl/ and data/raw/ carried
#
# One device call may run 600 s at most and the whole run takes longer on an H200: split it with STAGES="..."
# (the stage list of the loop below) and BENCH_EPOCHS.
# Writes OUT_DIR/gpu_run.tgz, refreshed after every step (a run cut short keeps what it finished): stages.csv (stage,
# exit code, wall s, mean/max GPU utilisation %, max GPU memory MiB), the logs, the benchmark's JSON (reports/bench/)
# and every stage's metrics (reports/metrics/).
set -uo pipefail
OUT=${1:-gpu_out}; RUN=$(mktemp -d); mkdir -p "$OUT"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch, lightning, xgboost; print('torch', torch.__version__, 'lightning', lightning.__version__, 'xgboost', xgboost.__version__, 'cuda', torch.version.cuda)"
} > "$RUN/machine.txt" 2>&1
echo "stage,rc,wall_s,gpu_util_mean,gpu_util_max,gpu_mem_max_mib" > "$RUN/stages.csv"

timed() {  # timed NAME COMMAND...: run, time and sample the GPU
  local name=$1; shift
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$RUN/smi_$name.csv" &
  local smi=$! start=$(date +%s.%N)
  "$@" > "$RUN/log_$name.txt" 2>&1
  local rc=$? end=$(date +%s.%N)
  kill $smi; wait $smi 2>/dev/null
  awk -F, -v n="$name" -v rc=$rc -v s="$start" -v e="$end" '{u+=$1; if ($1>um) um=$1; if ($2>mm) mm=$2; c++}
    END {printf "%s,%d,%.1f,%.1f,%d,%d\n", n, rc, e-s, c ? u/c : 0, um, mm}' "$RUN/smi_$name.csv" >> "$RUN/stages.csv"
  tail -n 3 "$RUN/log_$name.txt"; tail -n 1 "$RUN/stages.csv"
  mkdir -p "$RUN/reports"; cp -r reports/bench reports/metrics "$RUN/reports/" 2>/dev/null
  tar czf "$OUT/gpu_run.tgz" -C "$RUN" .
}
stage() { timed "$1" python3 -m aelab.stages."$1" --config-dir . --config-name params hydra.run.dir=. \
  hydra.output_subdir=null hydra/job_logging=stdout hydra/hydra_logging=none; }

timed gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_fast.py tests/test_resident.py \
  tests/test_models.py tests/test_segmentation.py tests/test_xgb_device.py -k "cuda or gpu"
timed search_tests python3 -m pytest -q -p no:cacheprovider tests/test_search.py  # the ensembles on CUDA
timed download unshare -n python3 -m aelab.stages.download --config-dir . --config-name params hydra.run.dir=. \
  hydra.output_subdir=null hydra/job_logging=stdout hydra/hydra_logging=none
stage make_segmentation_set
BENCH="--precision 32-true,bf16-mixed trainer.enable_progress_bar=false"
timed bench_ae python3 -m aelab.bench --models deep conv --epochs ${BENCH_EPOCHS:-8} $BENCH
timed bench_ae_graph python3 -m aelab.bench --models deep conv --epochs ${BENCH_EPOCHS:-8} --out reports/bench/graph \
  $BENCH trainer.fast.cuda_graph=true
timed bench_segnet python3 -m aelab.bench --models segnet $BENCH segment.max_epochs=3
for s in ${STAGES:-pretrain features denoise make_color_set colorize segment lr_search momentum_search \
         regularization tabular anomaly downstream report}; do
  stage $s
done
column -s, -t "$RUN/stages.csv"
