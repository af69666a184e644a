#!/usr/bin/env bash
# Take what one GPU-host call of experiments/gpu_campaign.sh returned into this tree, so the
# next call (which carries the tree) resumes from it: do this, and commit, after every call.
#   bash tools/take_campaign_results.sh DIR     DIR: the folder the call's files came back to
# From DIR/campaign.tar.gz it extracts results/ over the tree's own (run folders: raw rows,
# summaries, tables, env, calibration), leaving README.md and validation.* alone (written here,
# not by the run; the tree may have newer ones); llama.cpp's prebuilt parts (DIR/llama-bin/) go into .carry/.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: bash tools/take_campaign_results.sh DIR (the folder a device call returned)}"
archive="$dir/campaign.tar.gz"
[ -f "$archive" ] || { echo "no $archive: was DIR returned by a gpu_campaign.sh call?" >&2; exit 2; }
listing=$(tar -tzf "$archive")  # whole, then searched: grep -q would cut tar off (pipefail)
if grep -q '^\./results/' <<<"$listing"; then
  tar -xzf "$archive" --exclude='*/README.md' --exclude='*/validation.*' ./results/
else
  echo "$archive holds no results/ folder (stages such as orchestration write elsewhere: copy by hand)"
fi
# a call carries the tree and .carry/ together, 64 MiB at most: prebuilt parts that would leave
# too little room for the rest stay out (the next fresh machine then builds, ~5 minutes)
CARRY_PARTS_MAX_MIB=40
# (a call returns at most 8 files: a set of parts may come back incomplete; gzip's check says so)
if compgen -G "$dir/llama-bin/*.part-*" >/dev/null; then
  mib=$(du -cm "$dir"/llama-bin/*.part-* | tail -1 | cut -f1)
  if ! cat "$dir"/llama-bin/*.part-* | tar -tzf - >/dev/null 2>&1; then
    echo "llama.cpp's prebuilt parts in $dir/llama-bin/ are incomplete or damaged: not put into .carry/"
  elif [ "$mib" -gt "$CARRY_PARTS_MAX_MIB" ]; then
    echo "llama.cpp's prebuilt parts take $mib MiB, more than $CARRY_PARTS_MAX_MIB: not put into .carry/"
  else
    mkdir -p .carry
    for part in "$dir"/llama-bin/*.part-aa; do  # one set per archive name: an older set goes first
      rm -f ".carry/$(basename "${part%.part-aa}")".part-*
    done
    cp "$dir"/llama-bin/*.part-* .carry/
    ls -la .carry/*.part-*
  fi
fi
git status --short results
