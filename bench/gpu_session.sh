#!/usr/bin/env bash
# One GPU-host session: GPU tests, TVM bundle check, tuning, module end-to-end. Run from the repo root on the
# GPU host with the wheels in .whl (optuna, sqlalchemy, ...) and, optionally, a TVM bundle in tvm_bundle/.
# Usage: bash bench/gpu_session.sh STEP...   (steps: info host tests ktests gtests batchk tvm tune e2e cs4a kernels ncu
#        opcost realinf)
# ncu profiles NCU_CASES ("tag|kind|config-json;..."), one Nsight Compute report each, into $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
GPU=$(python3 -c "import torch; from sparvar_compiler.planner.gpus import gpu_from_device_name as g; p=torch.cuda.get_device_properties(0); print(g(p.name, p.multi_processor_count).name)")
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case $step in
    info) nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
          python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.backends.cudnn.version())" ;;
    host) grep PRETTY_NAME /etc/os-release; ldd --version | head -1; id nobody; id postgres 2>&1; nproc; free -g | head -2 ;;
    ktests) timeout ${KTESTS_S:-200} python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py 2>&1 | tail -15 ;;
    tests) timeout ${TESTS_S:-240} python3 -m pytest -v -x -p no:cacheprovider -o faulthandler_timeout=200 tests/test_gpu_module.py 2>&1 | tail -60
           timeout 90 python3 -m pytest -v -p no:cacheprovider tests/test_cubin_launcher.py -k "probe_runs or graph_capturable or another_thread or device_limits or triton_cubin" 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed" | tail -12 ;;
    gtests) timeout ${GTESTS_S:-420} python3 -m pytest -v -x -p no:cacheprovider -m gpu tests/test_gpu_module.py 2>&1 | grep -E "PASS|FAIL|ERROR|Error|assert|passed|failed" | tail -40 ;;
    batchk) timeout ${BATCHK_S:-200} python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py -k "any_batch or cubins_scale" 2>&1 | tail -8 ;;
    opcost) timeout ${OPCOST_S:-200} python3 bench/op_overhead.py --module "${MODULE:-out/8b-h200}" --out "$OUT/op-overhead-$GPU.json" 2>&1 | tail -12 ;;
    realinf) timeout ${REALINF_S:-500} python3 bench/real_infinity.py --infinity "${INFINITY_SRC:-out/infinity-src}" --module "${MODULE:-out/8b-h200}" \
               --model "${MODEL:-infinity-8b}" --images "${IMAGES:-5}" ${REALINF_ARGS:-} --out "$OUT/real-infinity-$GPU.json" 2>&1 | tail -40 ;;
    tvm) [ -d tvm_bundle ] && timeout 100 python3 -X faulthandler -c "import faulthandler,sys,runpy; faulthandler.dump_traceback_later(80); sys.argv=['x','verify','tvm_bundle','--out','$OUT/tvm-verify.json']; runpy.run_module('sparvar_compiler.codegen.tvm_backend', run_name='__main__')" 2>&1 | tail -60 ;;
    tune) timeout ${TUNE_S:-300} python3 -m sparvar_compiler tune --model "${MODEL:-infinity-8b}" --gpu "$GPU" --trials "${TRIALS:-10}" \
            --block-sizes "${BLOCKS:-64,128}" --db "$OUT/tune.sqlite" 2>&1 | grep -v "^  \[" | tail -30 ;;
    e2e) timeout ${E2E_S:-240} python3 bench/module_e2e.py ${DB:+--db $DB} --out "$OUT/e2e-$GPU.json" 2>&1 | tail -30 ;;
    cs4a) timeout ${CS4A_S:-400} python3 bench/cs4a.py ${DB:+--db $DB} --out "$OUT/cs4a-$GPU.json" 2>&1 | tail -60 ;;
    kernels) timeout ${KERNELS_S:-400} python3 bench/kernels.py ${KERNEL_ARGS:-} --out "$OUT/kernels-$GPU.json" 2>&1 | tail -45 ;;
    ncu) NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
         if [ -z "$NCU" ]; then echo "no ncu on this host"; continue; fi
         IFS=';' read -ra items <<< "${NCU_CASES:-}"
         for item in "${items[@]}"; do
           IFS='|' read -r tag kind cfg <<< "$item"
           f="$OUT/ncu-$(echo "$tag-$kind" | tr '/' '_').txt"
           timeout 150 "$NCU" --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
             --section WarpStateStats --section LaunchStats -k regex:sparvar -s 1 -c 1 \
             python3 bench/ncu_case.py "$tag" "$kind" "$cfg" > "$f" 2>&1
           echo "--- $tag $kind"; grep -E "error|Throughput|Duration|Achieved Occupancy|Theoretical Occupancy|Hit Rate|Registers|Block Limit|Stall|Warp Cycles" "$f" | head -40
         done ;;
  esac
done
