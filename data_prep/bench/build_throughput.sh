#!/usr/bin/env bash
# Throughput of `data_prep build` (all three passes: scan, tokenizer training, encoding) on the
# TinyStories sample: prints one JSON line with MB/s = input bytes / wall seconds.
#
# Usage (from anywhere): data_prep/bench/build_throughput.sh
#   SAMPLE=path/to/stories.txt  input file (default ../shared/data/tinystories/sample.txt,
#                               relative to the repository root)
#   VOCAB=16384                 requested vocabulary size
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SAMPLE=${SAMPLE:-../shared/data/tinystories/sample.txt}
VOCAB=${VOCAB:-16384}

if [[ ! -f "$SAMPLE" ]]; then
    echo "build_throughput: $SAMPLE not found, skipping" >&2
    printf '{"bench":"data_prep_build_throughput","skipped":true,"reason":"input %s not found"}\n' "$SAMPLE"
    exit 0
fi

cargo build --release -p data_prep --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/data_prep"

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

BYTES=$(wc -c <"$SAMPLE" | tr -d ' ')
START=$(date +%s.%N)
"$BIN" build --input "$SAMPLE" --out "$OUT/build" --vocab-size "$VOCAB" --quiet >/dev/null
END=$(date +%s.%N)

# Numbers from meta.json without needing jq or python.
meta_field() { # $1 = split, $2 = field
    tr -d ' \n' <"$OUT/build/meta.json" | grep -o "\"$1\":{[^}]*}" | grep -o "\"$2\":[0-9]*" | cut -d: -f2
}
VOCAB_ACTUAL=$(tr -d ' \n' <"$OUT/build/meta.json" | grep -o '"vocab_size":[0-9]*' | head -1 | cut -d: -f2)
TRAIN_TOKENS=$(meta_field train tokens)
VAL_TOKENS=$(meta_field val tokens)

awk -v bytes="$BYTES" -v start="$START" -v end="$END" -v input="$SAMPLE" -v vocab="$VOCAB" \
    -v vocab_actual="$VOCAB_ACTUAL" -v train="$TRAIN_TOKENS" -v val="$VAL_TOKENS" \
    -v threads="$(nproc 2>/dev/null || echo 1)" 'BEGIN {
    wall = end - start
    printf "{\"bench\":\"data_prep_build_throughput\",\"input\":\"%s\",\"input_bytes\":%d,\"vocab_size_requested\":%d,\"vocab_size\":%d,\"train_tokens\":%d,\"val_tokens\":%d,\"threads\":%d,\"wall_s\":%.3f,\"mb_per_s\":%.3f}\n",
        input, bytes, vocab, vocab_actual, train, val, threads, wall, bytes / 1e6 / wall
}'
