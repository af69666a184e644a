#!/usr/bin/env bash
# Take what one GPU-host call of experiments/gpu_campaign.sh returned into this tree, so the
# next call (which carries the tree) resumes from it: do this, and commit, after every call.
#   bash tools/take_campaign_results.sh DIR     DIR: the folder the call's files came back to
# From DIR/campaign.tar.gz it extracts results/ over the tree's own (run folders: raw rows,
# summaries, tables, env, calibration), leaving README.md and validation*.* alone (written here,
# not by the run; the tree may have newer ones); llama.cpp's prebuilt parts (DIR/llama-bin/) go into .carry/ when they fit
# beside the tree and the rest of .carry/ in the 64 MiB a call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: bash tools/take_campaign_results.sh DIR (the folder a device call returned)}"
archive="$dir/campaign.tar.gz"
[ -f "$archive" ] || { echo "no $archive: was DIR returned by a gpu_campaign.sh call?" >&2; exit 2; }
listing=$(tar -tzf "$archive")  # whole, then searched: grep -q would cut tar off (pipefail)
if grep -q '^\./results/' <<<"$listing"; then
  # wildcards kept within one path component: a run folder or file that merely starts with
  # "validation" is extracted; each folder's README and validation*.* files are not
  tar -xzf "$archive" --no-wildcards-match-slash --exclude='./results/*/README.md' \
    --exclude='./results/*/validation.*' --exclude='./results/*/validation-*.*' ./results/
else
  echo "$archive holds no results/ folder (stages such as orchestration write elsewhere: copy by hand)"
fi
# a call carries the tree and .carry/ together, 64 MiB at most: prebuilt parts go in only when
# they leave room for both (else the next fresh machine builds, ~5 minutes)
CALL_CARRY_MIB=64
MARGIN_MIB=4  # the tree grows by a few results between calls
# sizes summed by du itself (one total however many files); a file listed but gone counts 0
total_of() { { du "$1" --files0-from=- 2>/dev/null || true; } | awk '$2 == "total" {t = $1} END {print t + 0}'; }
# (a call returns at most 8 files: a set of parts may come back incomplete; xz's check says so)
if compgen -G "$dir/llama-bin/*.part-*" >/dev/null; then
  tree_mib=$(( $(git ls-files -co --exclude-standard -z | total_of -cb) / 1048576 ))
  parts_mib=$(du -cm "$dir"/llama-bin/*.part-* | tail -1 | cut -f1)
  other_carry_mib=$({ find .carry -maxdepth 1 -type f ! -name 'llama-bin-*' -print0 2>/dev/null || true; } | total_of -cm)
  room=$(( CALL_CARRY_MIB - MARGIN_MIB - tree_mib - other_carry_mib ))
  if ! cat "$dir"/llama-bin/*.part-* | tar -tJf - >/dev/null 2>&1; then
    echo "llama.cpp's prebuilt parts in $dir/llama-bin/ are incomplete or damaged: not put into .carry/"
  elif [ "$parts_mib" -gt "$room" ]; then
    echo "llama.cpp's prebuilt parts take $parts_mib MiB; the tree and .carry/ leave $room: not put into .carry/"
  else
    mkdir -p .carry
    rm -f .carry/llama-bin-*.part-*  # one set: an older one (or one of another format) goes first
    cp "$dir"/llama-bin/*.part-* .carry/
    ls -la .carry/*.part-*
  fi
fi
git status --short results
