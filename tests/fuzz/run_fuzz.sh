#!/usr/bin/env bash
# run_fuzz.sh -- build cdimover's libFuzzer targets with AddressSanitizer and UBSan, make
# seed corpora of small images with qemu-img/qemu-io (and gzip, xz, zstd), and fuzz for a
# bounded time, split between the targets:
#   fuzz_qcow2   the random-access QCOW2 reader and converter (tests/fuzz/fuzz_qcow2.c)
#   fuzz_stream  the sequential-stream pipeline: detection, gzip/xz/zstd, RAW sink, streaming
#                QCOW2 converter (tests/fuzz/fuzz_stream.c)
# Exits non-zero when a fuzzer finds a crash, a leak, a timeout or an out-of-memory.
#
#   tests/fuzz/run_fuzz.sh [SECONDS] [WORKDIR]     (defaults: 60, a fresh temporary directory)
#
# Needs clang with the libFuzzer runtime (Debian: apt-get install clang), qemu-utils, gzip,
# xz-utils and zstd.  A finding is left in WORKDIR/TARGET.d/ as crash-*, leak-*, timeout-* or
# oom-*; reproduce it with WORKDIR/TARGET FILE.
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
need gzip "apt-get install gzip"
need xz "apt-get install xz-utils"
need zstd "apt-get install zstd"
mkdir -p "$WORK/seed" "$WORK/corpus" "$WORK/stream-seed" "$WORK/stream-corpus"

# The same optional libraries as csrc/build_ffi.py.
DEFS=() LIBS=(-lz -llzma -lcurl -lcrypto)
probe() {
    printf '#include <%s>\nint main(void){return 0;}\n' "$1" |
        "$CC" -x c - -o /dev/null "-l$2" 2>/dev/null
}
if probe zstd.h zstd; then DEFS+=(-DCDM_HAVE_ZSTD); LIBS+=(-lzstd); fi
if probe libdeflate.h deflate; then DEFS+=(-DCDM_HAVE_LIBDEFLATE); LIBS+=(-ldeflate); fi

build() {   # build TARGET: tests/fuzz/TARGET.c with the whole core into $WORK/TARGET
    echo "+ building $WORK/$1 (${DEFS[*]:-no optional codecs})"
    "$CC" -g -O1 -std=gnu11 -Wall -Wextra -pthread -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 \
        "${DEFS[@]}" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
        -fno-omit-frame-pointer -I"$ROOT/csrc" "$HERE/$1.c" "$ROOT"/csrc/*.c -o "$WORK/$1" \
        "${LIBS[@]}"
}
build fuzz_qcow2
build fuzz_stream

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
# Compressed clusters of text: their bytes are packed across host clusters.
head -c 65536 /etc/services > "$WORK/text.raw" 2>/dev/null || seq 12000 > "$WORK/text.raw"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k "$WORK/text.raw" "$WORK/seed/text-c4k"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512 "$WORK/text.raw" \
    "$WORK/seed/text-c512"

# Seed corpus of the stream target: two option bytes (see fuzz_stream.c: memory limit, digest,
# target size, known zeros; the seed of the piece sizes), then a stream.
stream_seed() {   # stream_seed NAME OPTIONS-BYTE FILE...: the option bytes, then the FILEs
    local name=$1 opt=$2
    shift 2
    { printf "\\x$opt\\x5a"; cat "$@"; } > "$WORK/stream-seed/$name"
}
opts=(0f 02 84 13 09)   # limits from 256 KiB to 4 MiB, each digest, 16 MiB targets, zero or not
i=0
for img in "$WORK"/seed/*; do
    name=$(basename "$img")
    [ "$name" = magic-only ] && continue
    o=${opts[$((i % ${#opts[@]}))]}
    i=$((i + 1))
    stream_seed "$name" "$o" "$img"
    gzip -c -1 < "$img" > "$WORK/tmp.gz" && stream_seed "$name.gz" "$o" "$WORK/tmp.gz"
    xz -c -0 < "$img" > "$WORK/tmp.xz" && stream_seed "$name.xz" "$o" "$WORK/tmp.xz"
    zstd -q -c -1 < "$img" > "$WORK/tmp.zst" && stream_seed "$name.zst" "$o" "$WORK/tmp.zst"
done
# Larger than max_len uncompressed: L2 tables naming 16384 clusters ahead (beyond 256 KiB of
# references); RAW of 5 MiB (more than one piece of the RAW sink), in a 1 MiB target too.
qemu-img create -q -f qcow2 -o cluster_size=512,preallocation=metadata "$WORK/tmp.big" 8M
qemu-io -c "write -P 0x5a 1M 4k" -c "write -P 0x5b 7M 4k" "$WORK/tmp.big" >/dev/null
xz -c -0 < "$WORK/tmp.big" > "$WORK/tmp.xz"
stream_seed prealloc-512.xz 0c "$WORK/tmp.xz"
stream_seed prealloc-512-4m.xz 03 "$WORK/tmp.xz"
{ cat "$WORK/text.raw"; head -c 5M /dev/zero; cat "$WORK/text.raw"; } | zstd -q -c > "$WORK/tmp.zst"
stream_seed raw-5m.zst 0c "$WORK/tmp.zst"
stream_seed raw-5m-small.zst 20 "$WORK/tmp.zst"
cp "$WORK/text.raw" "$WORK/tmp.raw"
stream_seed raw 0c "$WORK/tmp.raw"
stream_seed raw-small 41 "$WORK/tmp.raw"
stream_seed raw-declared-qcow2 0c "$WORK/tmp.raw"
printf '\xfc' | dd of="$WORK/stream-seed/raw-declared-qcow2" bs=1 seek=1 conv=notrunc 2>/dev/null
xz -c -0 < "$WORK/tmp.raw" > "$WORK/tmp.xz"
head -c $(($(stat -c %s "$WORK/tmp.xz") / 2)) "$WORK/tmp.xz" > "$WORK/tmp.cut.xz"
stream_seed raw-truncated.xz 04 "$WORK/tmp.cut.xz"
gzip -c < "$WORK/tmp.raw" > "$WORK/tmp.a.gz"
gzip -c < "$WORK/seed/v3-512" > "$WORK/tmp.b.gz"
stream_seed members.gz 08 "$WORK/tmp.a.gz" "$WORK/tmp.b.gz"
printf '\x1f\x8b' > "$WORK/tmp.magic"
stream_seed gzip-magic-only 00 "$WORK/tmp.magic"
# Container layers (second option byte 10xxxxxx): ustar, GNU sparse, pax sparse, gzip.
mkdir -p "$WORK/layer/disk" "$WORK/layer/etc"
cp "$WORK/seed/v3-512" "$WORK/layer/disk/disk.qcow2"
echo x > "$WORK/layer/etc/hostname"
tar_seed() {   # tar_seed NAME TAR-OPTIONS...
    local name=$1
    shift
    tar -C "$WORK/layer" "$@" -cf "$WORK/tmp.tar" . &&
        { printf '\x0c\x9a'; cat "$WORK/tmp.tar"; } > "$WORK/stream-seed/$name"
}
tar_seed layer-ustar --format=ustar
truncate -s 64k "$WORK/layer/disk/disk.qcow2"
rm "$WORK/layer/disk/disk.qcow2"
head -c 3000 "$WORK/text.raw" > "$WORK/layer/disk/disk.img"
truncate -s 40k "$WORK/layer/disk/disk.img"
printf Z >> "$WORK/layer/disk/disk.img"
tar_seed layer-gnu-sparse --format=gnu --sparse
tar_seed layer-pax-sparse --format=pax --sparse
tar_seed layer-pax01-sparse --format=pax --sparse --sparse-version=0.1
touch "$WORK/layer/disk/.wh..wh..opq"
tar -C "$WORK/layer" -czf "$WORK/tmp.tgz" . && { printf '\x0c\x9a'; cat "$WORK/tmp.tgz"; } \
    > "$WORK/stream-seed/layer-gz"
rm -rf "$WORK/layer"
rm -f "$WORK"/tmp.* "$WORK/text.raw"

# Fuzz each target for half the time, in its own directory (findings land there).
fuzz() {   # fuzz TARGET SECONDS MAX-LEN CORPUS SEED
    local target=$1 secs=$2 max_len=$3 corpus=$4 seeds=$5
    echo "+ fuzzing $target for ${secs}s in $WORK/$target.d"
    mkdir -p "$WORK/$target.d"
    ( cd "$WORK/$target.d" &&
      ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1} \
      UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
          "$WORK/$target" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
          -max_len="$max_len" -print_final_stats=1 "$corpus" "$seeds" 2>&1 |
          tee "$WORK/$target.log" ) || return $?
}
status=0
fuzz fuzz_qcow2 $((SECS - SECS / 2)) 131072 "$WORK/corpus" "$WORK/seed" || status=$?
fuzz fuzz_stream $((SECS / 2)) 524288 "$WORK/stream-corpus" "$WORK/stream-seed" || status=$?
findings=$(find "$WORK"/fuzz_*.d -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' \
    -o -name 'timeout-*' -o -name 'oom-*' \) 2>/dev/null)
if [ -n "$findings" ]; then
    echo "run_fuzz.sh: findings in $WORK:" >&2
    ls -l $findings >&2
    exit 1
fi
exit "$status"
