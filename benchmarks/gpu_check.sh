#!/usr/bin/env bash
# One prepared check of the GPU path, for a machine with an NVIDIA GPU (never run by CI):
#   1. the device-independent tests on the GPU,
#   2. the fusion step against the GPU's own copy bandwidth (same run),
#   3. the train step at the paper's configuration (1 x 128^3 x 4 and 2 x 64^3, base 16) with the
#      native convolution, float32 and bfloat16 activations, interleaved,
#   4. with several GPUs, the data-parallel steps on 1, 2, ... of them.
# Everything is printed and written to $OUT/gpu_check.md (default benchmarks/gpu_check.md) in the
# format of benchmarks/README.md, headed by the card's name; paste it there.
#
#   bash benchmarks/gpu_check.sh            # installs .[test,gpu] into .venv first if needed
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks}/gpu_check.md"
mkdir -p "$(dirname "$out")"
py=.venv/bin/python
if ! $py -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  test -x $py || python3 -m venv .venv
  $py -m pip install --quiet --upgrade pip
  $py -m pip install --quiet -e '.[test,gpu]' || exit 1
fi
export JAX_PLATFORMS=cuda XLA_FLAGS="" XLA_PYTHON_CLIENT_PREALLOCATE=false
card=$($py -c "import jax; d = jax.devices(); print(f'{len(d)} x {d[0].device_kind}')")
ngpu=$($py -c "import jax; print(len(jax.devices()))")
{
  echo "## GPU check: $card ($(date -u +%Y-%m-%d), \`benchmarks/gpu_check.sh\`)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $py -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
  echo '```'
  echo
  echo "### Device-independent tests on the GPU"
  echo
  echo '```'
  # the CPU-kernel tests and the forced-host-device tests are CPU-only by construction
  $py -m pytest -q -p no:cacheprovider tests/test_merge.py tests/test_fisher.py tests/test_losses.py \
    tests/test_partition.py tests/test_steps.py tests/test_inference.py tests/test_model.py \
    tests/test_training.py -k "not direct and not devices and not cpu_kernel" 2>&1 | tail -n 5
  echo '```'
  echo
  echo "### Fusion step vs the GPU's copy bandwidth (\`bench_merge.py --repeats 30\`)"
  echo
  $py benchmarks/bench_merge.py --repeats 30 2>&1
  echo
  echo "### Train step, paper configuration (\`bench_precision.py --impl native --repeats 10\`)"
  echo
  $py benchmarks/bench_precision.py --impl native --repeats 10 2>&1
  if [ "$ngpu" -gt 1 ]; then
    echo
    echo "### Data-parallel steps on 1..$ngpu GPUs (\`bench_devices.py\`)"
    echo
    sizes=$($py -c "n=$ngpu; print(','.join(str(2**i) for i in range(8) if 2**i <= n))")
    $py benchmarks/bench_devices.py --devices "$sizes" --impls native --base 16 --patch 64 \
      --batch "${sizes##*,}" --repeats 10 2>&1
  fi
} | tee "$out"
echo "written: $out"
