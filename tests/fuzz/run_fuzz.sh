#!/usr/bin/env bash
# run_fuzz.sh -- build the libFuzzer target for cdimover's QCOW2 reader with AddressSanitizer
# and UBSan, make a seed corpus of small images with qemu-img/qemu-io, and fuzz for a bounded
# time.  Exits non-zero when the fuzzer finds a crash, a leak, a timeout or an out-of-memory.
#
#   tests/fuzz/run_fuzz.sh [SECONDS] [WORKDIR]     (defaults: 60, a fresh temporary directory)
#
# Needs clang with the libFuzzer runtime (Debian: apt-get install clang) and qemu-utils.
# A crashing input is left in WORKDIR as crash-*; reproduce it with WORKDIR/fuzz_qcow2 FILE.
set -euo pipefail

SECS=${1:-60}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${2:-$(mktemp -d /tmp/cdimover-fuzz.XXXXXX)}
CC=${FUZZ_CC:-clang}

need() { command -v "$1" >/dev/null || { echo "run_fuzz.sh: $1 not found ($2)" >&2; exit 2; }; }
need "$CC" "apt-get install clang"
need qemu-img "apt-get install qemu-utils"
need qemu-io "apt-get install qemu-utils"
mkdir -p "$WORK/seed" "$WORK/corpus"

# The same optional libraries as csrc/build_ffi.py.
DEFS=() LIBS=(-lz)
probe() {
    printf '#include <%s>\nint main(void){return 0;}\n' "$1" |
        "$CC" -x c - -o /dev/null "-l$2" 2>/dev/null
}
if probe zstd.h zstd; then DEFS+=(-DCDM_HAVE_ZSTD); LIBS+=(-lzstd); fi
if probe libdeflate.h deflate; then DEFS+=(-DCDM_HAVE_LIBDEFLATE); LIBS+=(-ldeflate); fi

echo "+ building $WORK/fuzz_qcow2 (${DEFS[*]:-no optional codecs})"
"$CC" -g -O1 -std=gnu11 -Wall -Wextra -pthread -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 "${DEFS[@]}" \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
    -I"$ROOT/csrc" "$HERE/fuzz_qcow2.c" "$ROOT"/csrc/*.c -o "$WORK/fuzz_qcow2" "${LIBS[@]}"

# Seed corpus: small images covering each feature (small clusters keep the files small).
seed() {   # seed NAME CREATE-OPTIONS SIZE [qemu-io commands...]
    local name=$1 opts=$2 size=$3
    shift 3
    qemu-img create -q -f qcow2 -o "$opts" "$WORK/seed/$name" "$size"
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    if [ ${#args[@]} -gt 0 ]; then qemu-io "${args[@]}" "$WORK/seed/$name" >/dev/null; fi
}
seed v3-512 cluster_size=512 64k "write -P 0x11 0 3k" "write -c -P 0x22 4k 512" "write -z 8k 1k"
seed v2-1k compat=0.10,cluster_size=1k 128k "write -P 0x33 0 4k" "write -c -P 0x44 8k 1k"
seed v3-4k cluster_size=4k 1M "write -P 0x55 0 12k" "write -c -P 0x66 64k 4k" \
    "write -z 128k 8k" "write -P 0 200k 4k"
seed extl2-16k cluster_size=16k,extended_l2=on 512k "write -P 0x77 1k 2k" \
    "write -c -P 0x12 32k 16k" "write -z 64k 4k"
if [[ " ${DEFS[*]:-} " == *CDM_HAVE_ZSTD* ]]; then
    seed zstd-4k cluster_size=4k,compression_type=zstd 256k "write -c -P 0x21 0 4k" \
        "write -c -P 0x23 8k 4k"
fi
seed snap-4k cluster_size=4k 256k "write -P 1 0 4k"
qemu-img snapshot -c s1 "$WORK/seed/snap-4k"
qemu-io -c "write -P 2 0 4k" "$WORK/seed/snap-4k" >/dev/null
seed backing-4k cluster_size=4k,backing_file=/etc/passwd,backing_fmt=raw 64k
seed odd-2k cluster_size=2k $((64 * 1024 + 512)) "write -P 9 64k 512"
printf 'QFI\xfb' > "$WORK/seed/magic-only"

echo "+ fuzzing for ${SECS}s in $WORK"
cd "$WORK"
status=0
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
    ./fuzz_qcow2 -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -max_len=131072 \
    -print_final_stats=1 corpus seed 2>&1 | tee fuzz.log || status=$?
if ls crash-* leak-* timeout-* oom-* >/dev/null 2>&1; then
    echo "run_fuzz.sh: findings in $WORK:" >&2
    ls -l crash-* leak-* timeout-* oom-* 2>/dev/null >&2 || true
    exit 1
fi
exit "$status"
