#!/usr/bin/env bash
# The GPU checks of a task that is lent a device machine (TESTING.md, "On a real GPU"), run there
# in one go from the repository root. Nothing is compiled there (no Rust toolchain, no network):
# BIN_DIR holds what was built here, optionally xz-compressed:
#   vipllava     `cargo build --release --features wgpu --bin vipllava`
#   integration  the integration test binary of a `--features wgpu` build (`cargo test --no-run`),
#                built in the checkout at BUILT_AT (its fixtures are found through that path).
# Steps, each under its own time limit, each logging into $OUT as it goes (six files at most:
# steps.log, parity.log, fixtures.md, bench-1b.md, ab.md, errors.log):
#   1. the wgpu parity tests (`wgpu::`) with VIPLLAVA_REQUIRE_WGPU=1: no adapter is a failure;
#   2. cpu vs wgpu on every model fixture (f32, f16, q8): logits against cpu/f32;
#   3. the random 1.1B benchmark model (scripts/make_bench_checkpoint.py, with the machine's
#      PyTorch) and `vipllava bench --devices cpu,wgpu --dtypes f32,f16 --quantize q8` on it
#      (BENCH_ARGS replaces those arguments; cpu/f32, the reference, always runs);
#   4. with BASELINE=PATH (another vipllava binary, e.g. the commit before a change), the same
#      model's wgpu f32/f16 rows by that binary, then by this one again: an A/B in one window.
# Usage: OUT=DIR BUILT_AT=PATH [BASELINE=PATH] [BENCH_ARGS=...] scripts/gpu_check.sh BIN_DIR [NEW_TOKENS]
set -u -o pipefail

bin_dir=${1:?usage: scripts/gpu_check.sh BIN_DIR [NEW_TOKENS]}
new_tokens=${2:-32}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$out/steps.log"; }
# A carried binary, unpacked from FILE.xz where only that came.
unpack() {
    [ -e "$1.xz" ] && [ ! -e "$1" ] && xz -d -k -T0 "$1.xz"
    chmod +x "$1" 2>/dev/null
}
# `section LIMIT LABEL FILE COMMAND...`: the command's table appended to FILE under LABEL.
section() {
    local limit=$1 label=$2 file=$3
    shift 3
    log "$label"
    timeout "$limit" "$@" >"$out/section.md" 2>>"$out/errors.log"
    local rc=$?
    { echo "## $label"; cat "$out/section.md"; echo; } | tee -a "$file"
    rm -f "$out/section.md"
    log "$label: exit $rc"
}

vipllava=$bin_dir/vipllava
unpack "$vipllava"
unpack "$bin_dir/integration"
[ -x "$vipllava" ] || { log "no $vipllava"; exit 1; }

# Vulkan's loader, where the image lacks it (debs downloaded beforehand into .gl/).
if ! ldconfig -p | grep -q libvulkan.so.1 && [ -d .gl ]; then
    for deb in .gl/*.deb; do dpkg -x "$deb" /; done
    ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -e "$icd" ] && export VK_DRIVER_FILES=$icd
log "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
log "cpu: $(nproc) threads, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"

# 1. Parity tests. The binary reads its fixtures below the checkout it was built in.
if [ -x "$bin_dir/integration" ]; then
    if [ -n "${BUILT_AT:-}" ] && [ ! -e "$BUILT_AT" ]; then
        mkdir -p "$(dirname "$BUILT_AT")" && ln -s "$PWD" "$BUILT_AT"
    fi
    log "parity tests on wgpu"
    VIPLLAVA_REQUIRE_WGPU=1 timeout 300 "$bin_dir/integration" wgpu --test-threads 1 --nocapture \
        >"$out/parity.log" 2>&1
    log "parity tests: exit $? ($(grep -E '^test result' "$out/parity.log"))"
fi

# 2. Every model fixture, cpu against wgpu.
for fixture in tests/fixtures/tiny-*; do
    section 120 "fixture $(basename "$fixture")" "$out/fixtures.md" "$vipllava" bench --model "$fixture" \
        --image tests/fixtures/images/astronaut.png --devices cpu,wgpu --dtypes f32,f16 --quantize q8 \
        --repeats 1 --new-tokens 8
done

# 3. The 1.1B benchmark model.
data=/tmp/bench-data
log "writing the 1.1B benchmark checkpoint"
timeout 300 python3 scripts/make_bench_checkpoint.py --out "$data" --dtypes f32 >>"$out/steps.log" 2>&1 \
    || { log "checkpoint failed"; exit 1; }
model_1b=(--model "$data/clip-l-llama-1b-f32" --image "$data/astronaut.png" --repeats 1 --new-tokens "$new_tokens")
# shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
section 480 "bench 1.1B" "$out/bench-1b.md" "$vipllava" bench "${model_1b[@]}" \
    ${BENCH_ARGS:---devices cpu,wgpu --dtypes f32,f16 --quantize q8}

# 4. A/B against a baseline binary: baseline, then this binary, wgpu only.
if [ -n "${BASELINE:-}" ]; then
    unpack "$BASELINE"
    section 300 "A/B 1.1B: baseline" "$out/ab.md" "$BASELINE" bench "${model_1b[@]}" --devices wgpu --dtypes f32,f16
    section 300 "A/B 1.1B: current" "$out/ab.md" "$vipllava" bench "${model_1b[@]}" --devices wgpu --dtypes f32,f16
fi
