#!/usr/bin/env bash
# Splits a model file into pieces that fit beside the code in device calls (64 MiB per call):
#   compose/gpu/split_model.sh FILE SIZE_MB [SIZE_MB ...]   -> .m1/FILE.part00, .m2/FILE.part01, ...
# Piece k goes to folder .m(k+1) (git-ignored; carry one per call); .m1 also holds FILE.count.
# compose/gpu/call.sh joins them on the device machine once every piece has arrived.
set -euo pipefail
file=$1; shift
name=$(basename "$file"); size=$(stat -c %s "$file"); offset=0; k=0
for mb in "$@"; do
  [ "$offset" -ge "$size" ] && break
  k=$((k + 1)); mkdir -p ".m$k"; rm -f ".m$k/$name".part*
  dd if="$file" of=".m$k/$name.part$(printf %02d $((k - 1)))" bs=1M skip=$((offset / 1048576)) count="$mb" status=none
  offset=$((offset + mb * 1048576))
done
[ "$offset" -ge "$size" ] || { echo "split_model.sh: $((size - offset)) bytes left over; give more sizes" >&2; exit 1; }
echo "$k" > ".m1/$name.count"
ls -la .m*/
