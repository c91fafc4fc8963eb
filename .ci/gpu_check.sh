#!/bin/bash
# Everything the lesson measures and checks on a GPU, in one go, for a GPU machine that is
# lent for minutes: the benchmark behind the "Making it fast" page first, then the GPU tests.
#
#   .ci/gpu_check.sh OUT_DIR [pytest -k expression]
#
# Run it from the repository's top folder on the GPU machine; it writes into OUT_DIR:
#   env.txt           the card, the driver, the versions
#   benchmark/        results.json, results.csv, results.svg (for content/benchmark/ and the performance page)
#   benchmark.log     what benchmark.py printed
#   gpu-tests.log     pytest -v of the GPU tests (tests/test_gpu.py and the pages' GPU commands)
# Each part has its own time limit, so a slow part cannot eat the next one's time.
set -u
out=${1:?usage: .ci/gpu_check.sh OUT_DIR [pytest -k expression]}
select=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nproc
    python3 -c 'import platform, torch, torchvision, lightning, torchmetrics as tm
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "lightning", lightning.__version__, "torchmetrics", tm.__version__)'
} > "$out/env.txt" 2>&1

# Without a GPU every part below would skip or fall back to --small and still exit 0.
if ! python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "error: PyTorch sees no GPU here; see $out/env.txt" | tee -a "$out/env.txt" >&2
    exit 1
fi

# PARTS="benchmark tests" (the default) runs both; one of them alone lets two calls on a
# lent machine share the time, e.g. PARTS=benchmark BENCHMARK_SECONDS=450, then PARTS=tests.
# BENCHMARK_ARGS: what benchmark.py leaves out. max-autotune searches kernels for minutes (on an
# H200 it had not finished after 200 s), more than a 15-minute booking can spare; set it empty
# for the full run.
parts=${PARTS:-benchmark tests}
if [[ $parts == *benchmark* ]]; then
    # shellcheck disable=SC2086  # BENCHMARK_ARGS holds several words on purpose
    timeout -k 10 "${BENCHMARK_SECONDS:-360}" python3 examples/benchmark.py ${BENCHMARK_ARGS---skip max-autotune} \
        --out "$out/benchmark" > "$out/benchmark.log" 2>&1
    echo "benchmark.py exit status $?" >> "$out/benchmark.log"
    tail -n 3 "$out/benchmark.log"
fi

if [[ $parts == *tests* ]]; then
    # The performance page's GPU command is left out: it is the benchmark run above.
    # -rs lists every skipped test and why (one that needs more GPUs than this machine has).
    # The tests share the GPU four at a time (their runs are tiny); a page's commands stay in order.
    # On one H200 (2026-11-28): the benchmark's rows before max-autotune took about 3.5 minutes
    # (the larger batches, added since, about 1 more), and these tests 2.5.
    timeout -k 10 "${TESTS_SECONDS:-180}" python3 -m pytest -v -rs -p no:cacheprovider -m gpu \
        -n "${TEST_WORKERS:-4}" --dist loadgroup \
        -k "not performance ${select:+and ($select)}" tests/test_gpu.py tests/test_page_commands.py \
        > "$out/gpu-tests.log" 2>&1
    echo "pytest exit status $?" >> "$out/gpu-tests.log"
    tail -n 3 "$out/gpu-tests.log"
fi
