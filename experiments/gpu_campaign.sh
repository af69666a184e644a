#!/usr/bin/env bash
# The pending GPU-host measurements, stage by stage (each stage's failure is logged and the next
# one runs); one device call runs at most 10 minutes, so give each call the stages that fit
# (kernels + orchestration ~6 min; baselines ~8 min; quick ~8 min). Results are packed into $OUT/campaign.tar.gz (the device tool
# returns at most 8 files). Usage, on the GPU host from the repository root:
#   bash experiments/gpu_campaign.sh kernels orchestration baselines quick
# What is left (plan of 2026-12-02, nineteenth session; ~30 GPU minutes a session, a fresh machine
# costs ~1 minute of it, and a machine goes back 30 s after a call: take the results and commit
# at once). Done: orchestration runs 10-16 (15: threads-rounds, the thread/stream x 16/15 variants
# interleaved: the defaults stay; 16: paths-ab, adapt_paths loses: it stays off), prefill24 and
# beam24 (whole), llama v1 and v3 (v2 on a disturbed calibration), cpu-sustained, sweep24 (whole,
# 108 of 108), sweep48 (whole, 48 of 48), stream24 (paused at 12 of 24: its question went to run
# 15), acc-mem24 and acc-trace (accelerate-offload's excess is transformers' decode step copying
# the routed experts' weights, batched_mm: fixed in baselines/accelerate_offload.py), acc24-again
# round 0 (4 of 12 rows). After each call run
# `bash tools/take_campaign_results.sh DIR` (DIR: the folder its files came back to) and commit
# BEFORE the next call: the tree travels with each call, and a sweep resumes from the rows it
# carries (the seventh session re-measured a piece for want of this). Pass carry [".carry"]
# (the tokenizer; llama.cpp's CUDA programs as xz parts, unpacked instead of the ~6-minute build).
# Pass the full commit, written out here (FIDDLER_GIT_COMMIT=<40 hex digits>): rows name it; a
# `$(git rev-parse ...)` runs on the device, whose copy of .git is not this session's.
# Sweeps count SWEEP_SECONDS from the script's start, so stages chain within one call; a resumed
# sweep calibrates its machine first (~15 s, machine-calibrations/ in the run folder). Next:
#   1. `acc24-again` (a call a round, ~6.5 min as round 0 took: 2 calls; SWEEP_SECONDS=565, the
#      stage stops itself between rounds when time is short): sweep24's accelerate-offload rows
#      of rounds 1-2 with the fixed reservation (round 0's four: peak 21.24-21.27 GB, within 24).
#      Then the sweep24 README's and the top README's accelerate-offload figures and memory line,
#      and sweep24 re-validated.
#      The first call (SWEEP_SECONDS=565) measures round 1 and starts round 2 (finished rows
#      stay); give the second `acc24-again window-bound` (SWEEP_SECONDS=565; the sweep ends when
#      its rows are done, ~5 min, then window-bound runs).
#   2. `window-bound` (~3 min) where a call has the time: whether the host gives both paths their
#      calibrated rates at once (the README's decode breakdown: together ~130 GB/s in decode
#      against the bound's 154); every machine calibration of step 1 records the one-window
#      copy rate too. Then the decode target's closing note.
#   Optional: the cause of the prefill CPU job's 1.06-1.28x over decode's (results/orchestration-h200/
#      run 11): time the kernel at 32-64 tokens from the engine's worker on its pinned expert pool.
# Stages (in the order given):
#   kernels        issue 6: CPU expert paths x tokens x threads, alone and beside copies
#   orchestration  issues 3/6: calibration (kernel chosen by measurement), correctness, every
#                  policy at 24 GB (hybrid decode with the chosen CPU kernel)
#   orchestration-prefill  issue 7: the timed prefill (layer timelines against the plan) of every
#                  policy at 24 GB for each of PREFILL_LENS prompt tokens (128,256), ~1.5 min a
#                  length on a calibrated machine; into $OUT/prefill-N/orchestration.json
#   orchestration-beam  issue 7: hybrid and paper in beam search of width 8 at 24 GB, with the
#                  layer timelines of beam steps (~4 min: its own calibration, the 2-layer
#                  correctness check, 24 new tokens), where the simulator misses most; into
#                  $OUT/orchestration-beam (python experiments/orchestration_report.py renders it)
#   baselines      issue 4: every system on one prompt at 24 GB (resumable)
#   lru            issue 4: expert-lru(-prefetch) again, with the cache spread over the whole budget
#   threads-ab     issue 3: hybrid and paper under three CPU thread settings, each calibrated
#                  under its own and each with the CPU rows on the worker thread and on the main
#                  thread (~8 min): torch's OpenMP threads spin after every parallel region
#                  (libgomp: GOMP_SPINCOUNT 300000 pauses, milliseconds), so 16 kernel threads
#                  may keep all 16 cores busy between CPU jobs while the engine's main thread
#                  and CPU worker wait for a core; default / OMP_WAIT_POLICY=PASSIVE / 15
#                  threads; layer timelines in each orchestration.json
#                  (python experiments/orchestration_report.py DIR renders them side by side)
#   handoff-ab     issue 8: the stream mode's CUDA tests (~1 min, handoff-tests.log), then
#                  hybrid and paper with the main thread waiting for the CPU rows on the
#                  host (thread) and with the stream waiting on a host counter the CPU worker sets
#                  (stream: the layer's tail and the next layer's attention queued while the CPU
#                  computes), each checked for correctness on 2 layers and timed layer by layer,
#                  share of the decode bound recorded (~5 min, at most HANDOFF_SECONDS=420); into
#                  results/orchestration-h200/handoff-ab/ (take_campaign_results.sh takes it in;
#                  python experiments/orchestration_report.py renders it)
#   handoff-threads  issue 8: hybrid in the thread and stream CPU modes at 16 and at 15 kernel
#                  threads (one core left to the main thread, which in stream mode queues the next
#                  layer while the CPU computes), correctness exact between modes; ~6 min, into
#                  results/orchestration-h200/handoff-threads/ab-threads{16,15}/
#   threads-rounds issue 8: hybrid in the thread and stream CPU modes at 16 and 15 kernel threads
#                  (each calibrated under its own) on one engine, in ROUNDS=4 interleaved rounds of
#                  48 tokens (~5-6 min): run 14 compared them in two processes minutes apart,
#                  within this host's drift; into results/orchestration-h200/threads-rounds/
#   quick          issue 5: make reproduce-quick (measured cells for issue 7's validation)
#   cpu-sustained  issue 7: the CPU kernels (AMX, AVX512-BF16) in calibration's bursts against
#                  seconds of back-to-back calls and of calls with idle gaps (~1 min, CPU only):
#                  do prefill's and beam's CPU jobs run slower than calibrated because they last?
#                  Into results/cpu-sustained-h200/
#   llama          issue 9: CUDA build of llama.cpp (~5 min), then llama-cpp vs Fiddler and the
#                  baselines on Mixtral-8x7B truncated to 8 layers, 14 of 64 experts resident,
#                  resumable like the sweeps (results/h200-llama-8layers/; LLAMA_RUN_DIR=DIR
#                  measures into another folder, e.g. after an engine change)
#   llama-build    the build alone: give it to one call and `llama` to the next while the
#                  machine is still warm (third_party/ survives between calls on one machine).
#                  The built programs come back in $OUT/llama-bin/ (xz, parts of 15 MiB) unless
#                  .carry/ holds them; take_campaign_results.sh puts them into .carry/, and later
#                  machines unpack them instead of building
#   sweep24        issue 8: the paper-v3 single-batch grid at 24 GB, every system (in rounds of
#                  prompts, and in order of importance within a round, so a sweep cut short has
#                  whole tables on fewer prompts, the main comparison first), 3 prompts per
#                  cell, into results/h200-paper-v3-24gb/ (see sweep() below: each call
#                  resumes it; commit what comes back before the next call)
#   sweep48        the same grid at 48 GB: Fiddler's policies and the two strongest baselines
#                  (expert-lru and expert-lru-prefetch)
#   acc24-again    issue 8: sweep24's 12 accelerate-offload rows measured again after its fix (room
#                  for transformers' decode-step expert copies; old rows to raw-replaced.csv), a
#                  round a call (ROUNDS=1 measures one round and stops)
#   acc-mem24      issue 8: accelerate-offload at 24 GB, 32 and 256 prompt tokens, 4 new tokens, one
#                  prompt: its peak allocation against loading's (results/h200-accelerate-memory-24gb/)
#   paths-ab       issue 8: hybrid with and without the executor learning where its CPU and copy
#                  paths end (adapt_paths: offsets in the planning model, so the division follows
#                  the measured ends), thread and stream modes at 15 threads, ROUNDS=3 interleaved
#                  rounds of 48 tokens (~6 min), into results/orchestration-h200/paths-ab/
#   window-bound   issue 8: hybrid in stream mode at 15 threads, calibrated under them (the
#                  calibration now times the copies in the CPU's window too), 2 rounds of 48 tokens
#                  (~3 min): decode against the calibration's bound and the one-window bound
#                  (fiddler.bounds.same_window_model), into results/orchestration-h200/window-bound/
#   acc-trace      issue 8: where accelerate-offload's generation peak comes from at 24 GB: the allocation
#                  at every hook around its device map's units and two levels inside them, 256
#                  prompt tokens, 2 new (~3 min; experiments/module_memory.py), into
#                  results/h200-accelerate-memory-24gb/trace-in256/module_memory.json
#   stream24       issue 8: the paper-v3 grid at 24 GB for fiddler-hybrid-stream (the stream CPU mode)
#                  and fiddler-hybrid side by side, into results/h200-paper-v3-24gb-stream/ (its
#                  tables' bound table holds both against the 85% target; ~1 call a round)
#   prefill24      long-prefill TTFT (512-8192 tokens) at 24 GB: Fiddler, layer-streaming, expert-lru
#   beam24         beam search (widths 4, 8, 16) at 24 GB: Fiddler and the strongest baselines
# Pass FIDDLER_GIT_COMMIT=<sha> so run records name the commit, written out in the command (the
# command runs on the GPU host, where a $(git ...) reads whatever .git its copy holds, not this
# session's: the sixteenth session's piece 20 named a wrong commit so); add -dirty when the
# carried tree holds uncommitted changes.
# The GPU host lacks mistral-common and network: carry .carry/ (`make carry` writes it:
# tokenizer.model from mistral-common, llama.cpp-src.tar.gz from PyPI's llama-cpp-python).
set -u
SWEEP24_SYSTEMS=fiddler-hybrid,expert-lru,fiddler-paper,layer-streaming,cpu-only,accelerate-offload,expert-lru-prefetch,fiddler-cpu-experts,fiddler-copy-experts
PREFILL_LENS="${PREFILL_LENS:-128,256}"
MACHINE_CALIBRATION=""  # this machine's steady calibration, once a sweep has measured one
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
[ -f .carry/tokenizer.model ] && export FIDDLER_TOKENIZER="$PWD/.carry/tokenizer.model"
OUT="${OUT:-/tmp/campaign}"
mkdir -p "$OUT"
stage() {
  local name="$1"; shift
  echo "=== $name: $*" | tee -a "$OUT/campaign.log"
  local start=$SECONDS
  ( while sleep 60; do pack; done ) &  # a call cut short by its time limit keeps what was written
  local packer=$!
  local status rc=0
  "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then status=ok; else status="failed ($rc)"; fi
  # the packer's own children first (a tar cut off mid-way), then the packer; no partial
  # archive may stay in $OUT, where it would take one of the few files that come back
  pkill -P "$packer" 2>/dev/null; kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null
  rm -f "$OUT"/.campaign.*.tar.gz
  echo "=== $name: $status after $((SECONDS - start)) s" | tee -a "$OUT/campaign.log"
  tail -5 "$OUT/$name.log"
  pack
  return "$rc"  # the command's status, for a caller that acts on it (no set -e here)
}
steady() {  # the calibration FILE records nothing that disturbed its measurement
  python3 -c "import json, sys; from fiddler.steadiness import recorded_problems
sys.exit(bool(recorded_problems(json.load(open(sys.argv[1])))))" "$1" 2>/dev/null
}
pack() {  # into a file of its own, renamed when complete: a packer killed mid-way renames nothing
  local tmp
  tmp=$(mktemp "$OUT/.campaign.XXXXXX.tar.gz")
  tar -czf "$tmp" -C "$OUT" --exclude='*.tar.gz' --exclude=./llama-bin . 2>/dev/null
  mv "$tmp" "$OUT/campaign.tar.gz"
}
# sweep NAME DIR HARNESS-ARGS...: (HARNESS-ARGS come last, so they override the defaults here) resume the tracked run folder DIR (carried here with the tree)
# until $SWEEP_SECONDS after this script started (the device call's limit is 600 s). The run
# works on its copy under $OUT, so the packer returns whatever it finished; SIGINT stops it
# between runs' atomic writes of raw.csv. DIR's calibration is measured once and reused, so
# every piece plans with the same latencies; a piece that resumes it on another machine also
# calibrates that machine, for the record (`--calibrate-machine`: DIR/machine-calibrations/,
# named in its rows; `harness validate --per-machine` prices each row there). Each generation runs at most $RUN_TIME_LIMIT s (60;
# pieces 1-2 of sweep24 ran at 120): longer cells are extrapolated from the steps measured, marked.
sweep() {
  local name="$1" dir="$2"
  shift 2
  mkdir -p "$dir"
  local resume=()
  [ -f "$dir/calibration.json" ] && resume=(--calibrate-machine)  # a resumed folder: another machine
  # rows during which the hypervisor or other processes took cores are measured again, once
  # (the replaced ones kept in DIR/raw-disturbed.csv); REMEASURE_DISTURBED=0 keeps them
  [ "${REMEASURE_DISTURBED:-1}" != 0 ] && resume+=(--remeasure-disturbed)
  # a new run folder takes this machine's calibration when the orchestration stage just measured
  # one (the same `calibrate`, same kernel choice): it saves the minute a second one costs
  if [ ! -f "$dir/calibration.json" ] && [ -f "$OUT/orchestration/calibration.json" ]; then
    cp "$OUT/orchestration/calibration.json" "$dir/calibration.json"
    echo "=== $name: calibration from the orchestration stage of this call" | tee -a "$OUT/campaign.log"
  fi
  # a calibration measured on a disturbed host misleads every Fiddler row of the folder (the
  # eighth session's llama v2): calibrate (up to 3 attempts) and, if every attempt was disturbed,
  # once more after a pause; the last file stays either way, and its tables say if disturbed
  if [ ! -f "$dir/calibration.json" ]; then
    for try in 1 2; do
      stage "$name-calibration" python3 -m fiddler.cli calibrate --model mixtral-8x7b --require-steady \
        --out "$dir/calibration.json" && break
      [ "$try" = 1 ] && echo "=== $name: calibration disturbed; again in ${CALIBRATION_PAUSE:-20} s" \
        | tee -a "$OUT/campaign.log" && sleep "${CALIBRATION_PAUSE:-20}"
    done
    if steady "$dir/calibration.json"; then MACHINE_CALIBRATION="$dir/calibration.json"; fi
  fi
  mkdir -p "$OUT/$dir" && cp -r "$dir/." "$OUT/$dir/"
  local left=$(( ${SWEEP_SECONDS:-480} - SECONDS )) margin=${SYSTEM_MARGIN:-150}
  if [ "$left" -lt $(( margin + 60 )) ]; then  # too little to load and run a system
    echo "=== $name: only ${left} s left, not started" | tee -a "$OUT/campaign.log"
    return
  fi
  # no system is loaded in the last $margin s: a load, warm-up and first generation
  # that cannot finish would only spend device time (the call then ends early)
  local before
  before=$(ls "$OUT/$dir/machine-calibrations" 2>/dev/null)
  stage "$name" timeout -k 30 --signal=INT "$left" python3 -m harness run --model mixtral-8x7b \
    --prompts-per-cell 3 --reference '' --run-time-limit "${RUN_TIME_LIMIT:-60}" --calibration "$dir/calibration.json" \
    --no-new-system-after $(( left - margin )) --out "$OUT/$dir" "${resume[@]}" ${ROUNDS:+--rounds "$ROUNDS"} "$@"
  # this machine's calibration, for later stages of the call (the folder also holds other
  # machines'), unless the hypervisor or other processes disturbed it
  local new
  new=$(comm -13 <(echo "$before") <(ls "$OUT/$dir/machine-calibrations" 2>/dev/null) | tail -1)
  if [ -n "$new" ] && steady "$OUT/$dir/machine-calibrations/$new"; then
    MACHINE_CALIBRATION="$OUT/$dir/machine-calibrations/$new"
  fi
}
for name in "$@"; do
  case "$name" in
    # the torch paths were measured in full before (results/cpu-kernels-h200/); torch-split stays as
    # the side-by-side reference for the native kernels
    kernels) stage kernels python3 experiments/cpu_kernels.py --out "$OUT/kernels" --threads 16,12 --with-copies --in-worker --beside-busy-core \
               --paths torch-split,native,amx ;;
    orchestration) stage orchestration python3 experiments/orchestration_gpu.py --out "$OUT/orchestration" \
                     --gpu-memory-gb 24 --new-tokens 24 --repeats 2 ;;
    orchestration-beam) stage orchestration-beam python3 experiments/orchestration_gpu.py \
                     --out "$OUT/orchestration-beam" --gpu-memory-gb 24 --new-tokens 24 --repeats 1 \
                     --beam-width 8 --policies hybrid,paper ;;
    orchestration-prefill)
      # issue 7: the timed prefill at each of $PREFILL_LENS prompt tokens, every policy, no
      # correctness check; a steady calibration of this call's machine is reused (the
      # orchestration stage's, a sweep's, or the first length's own), so the lengths share one
      # plan basis
      prefill_calibration=$(ls "$OUT/orchestration/calibration.json" 2>/dev/null || echo "$MACHINE_CALIBRATION")
      for len in ${PREFILL_LENS//,/ }; do
        stage "orchestration-prefill-$len" python3 experiments/orchestration_gpu.py --out "$OUT/prefill-$len" \
          --gpu-memory-gb 24 --prompt-len "$len" --new-tokens 8 --repeats 2 --check-layers 0 \
          ${prefill_calibration:+--calibration "$prefill_calibration"}
        if [ -z "$prefill_calibration" ] && steady "$OUT/prefill-$len/calibration.json"; then
          prefill_calibration="$OUT/prefill-$len/calibration.json"
        fi
      done ;;
    baselines)
      calibration=()  # reuse the orchestration stage's calibration when it ran in this machine
      [ -f "$OUT/orchestration/calibration.json" ] && calibration=(--calibration "$OUT/orchestration/calibration.json")
      stage baselines python3 experiments/baselines_gpu.py --out "$OUT/baselines" --gpu-memory-gb 24 "${calibration[@]}" ;;
    lru) stage lru python3 experiments/baselines_gpu.py --out "$OUT/lru" --gpu-memory-gb 24 \
           --systems expert-lru,expert-lru-prefetch ;;
    threads-ab)
      for variant in default passive threads15; do
        settings=(); threads=()
        case "$variant" in
          passive) settings=(OMP_WAIT_POLICY=PASSIVE) ;;
          threads15) threads=(--cpu-threads 15) ;;
        esac
        stage "ab-$variant" env ${settings[@]+"${settings[@]}"} python3 experiments/orchestration_gpu.py \
          --out "$OUT/ab-$variant" --gpu-memory-gb 24 --new-tokens 24 --repeats 2 --policies hybrid,paper \
          --cpu-modes thread,inline ${threads[@]+"${threads[@]}"}
      done ;;
    # bounded: a stream that never passed its wait would otherwise hold the call to its end.
    # First the CUDA-only tests of the stream mode (a stream held by host memory; layer calls
    # returning before their slowed CPU jobs end, same tokens), ~1 min; their log comes back
    handoff-ab) stage handoff-tests timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider \
                  tests/test_host_signal.py tests/test_orchestrator.py -k "stream or cuda"
                stage handoff-ab timeout -k 10 "${HANDOFF_SECONDS:-420}" python3 experiments/orchestration_gpu.py \
                  --out "$OUT/results/orchestration-h200/handoff-ab" --gpu-memory-gb 24 --new-tokens 48 --repeats 2 \
                  --policies hybrid,paper --cpu-modes thread,stream ;;
    # both CPU modes at the default 16 kernel threads and at 15, one core left to the main thread
    # (which queues the accelerator's work while the CPU computes, and in stream mode the next
    # layer's too); the untimed decode's CPU job is recorded per mode, so each mode's CPU speed is
    # compared without the timing's synchronisation; each run calibrates under its own threads
    # (orchestration_report.py renders the two side by side)
    handoff-threads)
      for threads in 16 15; do
        check=()  # the exact correctness check between modes once, at the default threads
        [ "$threads" = 16 ] || check=(--check-layers 0)
        stage "handoff-threads$threads" timeout -k 10 "${HANDOFF_SECONDS:-230}" python3 experiments/orchestration_gpu.py \
          --out "$OUT/results/orchestration-h200/handoff-threads/ab-threads$threads" --gpu-memory-gb 24 \
          --new-tokens 48 --repeats 2 --policies hybrid --cpu-modes thread,stream --cpu-threads "$threads" \
          ${check[@]+"${check[@]}"}
      done ;;
    threads-rounds)
      stage threads-rounds timeout -k 10 "${ROUNDS_SECONDS:-420}" python3 experiments/orchestration_gpu.py \
        --out "$OUT/results/orchestration-h200/threads-rounds" --gpu-memory-gb 24 --new-tokens 48 --repeats 1 \
        --rounds "${ROUNDS:-4}" --policies hybrid --cpu-modes thread,stream --ab-threads 16,15 --check-layers 0 ;;
    # issue 8's decode target: the executor learning where its two paths end (adapt_paths), off
    # and on, in both CPU modes at 15 kernel threads (the best setting of runs 14-15), in
    # interleaved rounds on one engine; its CUDA test first
    paths-ab)
      stage paths-tests timeout -k 10 120 python3 -m pytest -q -p no:cacheprovider tests/test_orchestrator.py \
        -k "path_offsets or cuda"
      stage paths-ab timeout -k 10 "${PATHS_SECONDS:-420}" python3 experiments/orchestration_gpu.py \
        --out "$OUT/results/orchestration-h200/paths-ab" --gpu-memory-gb 24 --new-tokens 48 --repeats 1 \
        --rounds "${ROUNDS:-3}" --policies hybrid --cpu-modes thread,stream --ab-threads 15 --adapt-paths off,on \
        --check-layers 0 ;;
    quick) stage quick python3 -m harness.reproduce --quick --results "$OUT/runs" ;;
    cpu-sustained) stage cpu-sustained python3 experiments/cpu_sustained.py --out "$OUT/results/cpu-sustained-h200" \
                     --kernels amx-bf16,avx512-bf16 --tokens 1,4,16,128 --seconds 3 ;;
    llama-build | llama)
      if [ ! -f third_party/llama.cpp/convert_hf_to_gguf.py ] && [ -f .carry/llama.cpp-src.tar.gz ]; then
        mkdir -p third_party && tar -xzf .carry/llama.cpp-src.tar.gz -C third_party
      fi
      # incremental: a machine still warm from a call that built it rebuilds nothing. A build
      # returns its programs in parts ($OUT/llama-bin/), unless .carry/ already holds a whole set
      # of this version; put into .carry/, they spare the next fresh machine the build
      stage llama-build env CUDA=1 bash tools/build_llama_cpp.sh --pack-binaries "$OUT/llama-bin"
      [ "$name" = llama-build ] && continue
      # 8 layers keep Mixtral-8x7B's expert sizes; the budget keeps 14 of 64 experts (56/256)
      budget=$(python3 -c "from fiddler.config import ModelConfig; from fiddler.placement import budget_breakdown; import torch; c=ModelConfig.preset('mixtral-8x7b').with_layers(8); b=budget_breakdown(c,0,torch.bfloat16,2048+32,1,2); print((b.dense+b.kv_cache+b.staging+b.workspace+14.5*b.expert)/1e9)")
      sweep llama "${LLAMA_RUN_DIR:-results/h200-llama-8layers}" --systems llama-cpp,llama-cpp-cpu-moe,fiddler-paper,fiddler-hybrid,expert-lru,cpu-only \
        --scenario single-batch --inputs 32,128,512,2048 --outputs 32 --layers 8 \
        --gpu-memory-gb "$budget" --prompts-per-cell 2 --dataset random --reference cpu-only ;;
    sweep24) sweep sweep24 results/h200-paper-v3-24gb --scenario single-batch --grid paper-v3 --gpu-memory-gb 24 \
               --systems "$SWEEP24_SYSTEMS" ;;
    # accelerate-offload's rows of sweep24 measured again with room kept for the expert copies
    # transformers' decode step makes (its peak was 0.17 GB over the budget); disturbed rows of
    # the other systems stay as they are (one load a round, ~8 min a round)
    acc24-again) REMEASURE_DISTURBED=0 sweep acc24-again results/h200-paper-v3-24gb --scenario single-batch \
                   --grid paper-v3 --gpu-memory-gb 24 --systems "$SWEEP24_SYSTEMS" --remeasure-systems accelerate-offload ;;
    # the two strongest baselines at 24 GB (round 0): expert-lru, then expert-lru-prefetch (2.4
    # tokens/s against cpu-only's 2.0-2.3); cpu-only keeps nothing on the GPU, so a 48 GB run of
    # it would measure its 24 GB rows again
    sweep48) sweep sweep48 results/h200-paper-v3-48gb --scenario single-batch --grid paper-v3 --gpu-memory-gb 48 \
               --systems fiddler-hybrid,fiddler-paper,expert-lru,expert-lru-prefetch ;;
    # issue 8's decode target with the stream CPU mode: fiddler-hybrid-stream beside fiddler-hybrid
    # on the same machines and calibration, the paper-v3 grid at 24 GB (round 0: 8 generations)
    stream24) sweep stream24 results/h200-paper-v3-24gb-stream --scenario single-batch --grid paper-v3 \
               --gpu-memory-gb 24 --systems fiddler-hybrid-stream,fiddler-hybrid ;;
    # issue 8's memory target: accelerate-offload's peak at 24 GB (0.17 GB over in sweep24), its
    # loading's peak recorded apart (row telemetry), on two prompt lengths (one load, ~5 min)
    acc-mem24) sweep acc-mem24 results/h200-accelerate-memory-24gb --scenario single-batch --inputs 32,256 \
               --outputs 4 --prompts-per-cell 1 --gpu-memory-gb 24 --systems accelerate-offload ;;
    window-bound) stage window-bound timeout -k 10 "${WINDOW_SECONDS:-240}" python3 experiments/orchestration_gpu.py \
                    --out "$OUT/results/orchestration-h200/window-bound" --gpu-memory-gb 24 --new-tokens 48 \
                    --repeats 1 --rounds 2 --policies hybrid --cpu-modes stream --ab-threads 15 --check-layers 0 ;;
    acc-trace) stage acc-trace timeout -k 10 "${TRACE_SECONDS:-300}" python3 experiments/module_memory.py \
                 --out "$OUT/results/h200-accelerate-memory-24gb/trace-in256" --system accelerate-offload \
                 --gpu-memory-gb 24 --input-tokens 256 --new-tokens 2 ;;
    prefill24) sweep prefill24 results/h200-long-prefill-24gb --scenario long-prefill --gpu-memory-gb 24 \
               --systems fiddler-hybrid,fiddler-paper,layer-streaming,expert-lru ;;
    beam24) sweep beam24 results/h200-beam-search-24gb --scenario beam-search --beam-widths 4,8,16 --gpu-memory-gb 24 \
               --systems fiddler-hybrid,fiddler-paper,expert-lru,layer-streaming ;;
    *) echo "unknown stage $name" | tee -a "$OUT/campaign.log" ;;
  esac
done
pack && ls -la "$OUT"
