#!/usr/bin/env bash
# The GPU check of kdexp's CUDA paths, as one command of a few minutes on a machine with a GPU:
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from the repository root
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # the same steps on the CPU, small: checks the script
#   bash scripts/gpu_check.sh wheels     # beforehand, where pip reaches a registry: .whl/ (see below)
#
# Writes to $OUT (or ./gpu_check_out), one file per step, and a summary line per step to summary.txt:
#   gpu.txt      nvidia-smi and what torch sees (name, capability, memory, versions)
#   tests.txt    pytest -m cuda (tests/test_cuda.py: GPU = CPU run, cached = online, fused = separate,
#                AMP and channels_last, resume; the KD node's formula in tests/test_teacher_cache.py)
#   bench.txt    scripts/bench.py --device cuda ((h): resnet32x4 -> resnet8x4 on CIFAR-100-shaped data,
#                bf16 AMP, channels_last: KD epoch / CE epoch, images/s); bench.json its numbers
#   presets.txt  a few steps (debug=limit) of the CIFAR-100 and ImageNet presets with AMP on fake data
#                of their shapes (no dataset is reachable from such a machine)
# kdexp's pure-Python dependencies that a machine lacks (hydra-core, omegaconf, antlr4-python3-runtime
# on the lent GPU machines, which reach no registry) are installed from wheels in .whl/ when that
# folder exists: `wheels` puts them there (ignored by git; the device tool carries it: carry=[".whl"]).
# Every step runs even when one fails; the exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = wheels ]; then
    set -e
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist on PyPI: built here
    ls .whl
    exit 0
fi
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # kdexp and its Hydra plugin from this checkout
WORK=$(mktemp -d)
export KDEXP_CACHE_DIR=$WORK/cache
DEVICE=${GPU_CHECK_DEVICE:-cuda}
failed=0

step() {  # step NAME FILE COMMAND...: run, keep its output, one summary line
    local name=$1 file=$2
    shift 2
    local t0=$SECONDS
    "$@" >"$OUT/$file" 2>&1
    local rc=$?
    echo "$name: rc=$rc, $((SECONDS - t0)) s ($file)" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}

gpu_info() {
    if [ "$DEVICE" = cuda ]; then nvidia-smi; fi
    python3 - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("gpu: none visible to torch")
EOF
}

presets() {
    local hw=() cifar=() imagenet=()
    if [ "$DEVICE" = cuda ]; then
        hw=(hardware=auto_amp)
        cifar=(dataset.train_size=2048 dataset.val_size=512)
        imagenet=(dataset.shape=[3,224,224] dataset.train_size=2560 dataset.val_size=512)
    else  # the script's own check: the same commands, small enough for a CPU
        hw=(hardware=cpu)
        cifar=(dataset.train_size=128 dataset.val_size=64 debug.train_batches=2)
        imagenet=(dataset.shape=[3,64,64] dataset.train_size=64 dataset.val_size=32 batch_size=16 eval_batch_size=16
                  debug.train_batches=2)
    fi
    local common=(dataset=fake dataset.augment=none epochs=1 debug=limit progress=false "paths.cache_dir=$WORK/cache"
                  "paths.data_dir=$WORK/data")
    echo "== CIFAR-100 preset: resnet32x4 -> resnet8x4, kd, ${hw[*]}"
    python3 -m kdexp.train experiment=cifar100_resnet32x4_resnet8x4 method=kd teacher.epochs=1 "${common[@]}" \
        dataset.shape=[3,32,32] dataset.num_classes=100 "${cifar[@]}" "${hw[@]}" "hydra.run.dir=$WORK/cifar100" || return 1
    # the ImageNet preset's teacher comes from a file: torchvision's resnet34 with random weights
    python3 -c "import sys, torch, torchvision; torch.save(torchvision.models.resnet34().state_dict(), sys.argv[1])" \
        "$WORK/resnet34.pt" || return 1
    echo "== ImageNet preset: resnet34 -> resnet18, kd, ${hw[*]}"
    python3 -m kdexp.train experiment=imagenet_resnet34_resnet18 method=kd "teacher.checkpoint=$WORK/resnet34.pt" \
        "${common[@]}" dataset.num_classes=1000 "${imagenet[@]}" "${hw[@]}" "hydra.run.dir=$WORK/imagenet" || return 1
    python3 - "$WORK" <<'EOF'
import json, sys
for name in ("cifar100", "imagenet"):
    m = json.load(open(f"{sys.argv[1]}/{name}/metrics.json"))
    h = m["history"][-1]
    print(f"{name}: status {m['status']}, {m['hardware']}, train/loss {h['train/loss']:.4f}, "
          f"{h['time/samples_per_s']:,.0f} samples/s")
EOF
}

rm -f "$OUT/summary.txt"
step gpu gpu.txt gpu_info
step tests tests.txt python3 -m pytest -m cuda -n 0 -p no:cacheprovider tests  # on the CPU: all skipped
if [ "$DEVICE" = cuda ]; then
    step bench bench.txt python3 scripts/bench.py --device cuda --threads 0 --json "$OUT/bench.json" --workdir "$WORK/bench"
else
    step bench bench.txt python3 scripts/bench.py --pair cifar100 --quick --samples 128 --epochs 1 --workdir "$WORK/bench"
fi
step presets presets.txt presets
rm -rf "$WORK"
exit $failed
