"""``llama-cpp`` and ``llama-cpp-cpu-moe``: llama.cpp, the tool most users would pick instead,
run through its own server program on the run's model.

Contract:
- The model (a preset with seeded random weights, or a checkpoint) is exported as a
  checkpoint (``fiddler.export``), converted to GGUF with llama.cpp's own converter
  (``convert_hf_to_gguf.py``, bf16, or f32 for float32 runs) and cached under
  ``$FIDDLER_CACHE/gguf`` (default ``~/.cache/fiddler``), keyed by model, layers, seed and dtype.
- llama.cpp is found in ``$FIDDLER_LLAMA_CPP`` (a llama.cpp tree with ``build/bin``), else in
  ``third_party/llama.cpp`` (``make llama-cpp`` builds it there), else ``llama-server`` on
  PATH; without it the system refuses, saying how to get it.
- The weights load into memory at start (``--load-mode none``: no mmap). The GPU budget maps to llama.cpp's
  knobs as a capable user would set them: all layers on
  the GPU (``-ngl 99``) with the routed experts of the first ``--n-cpu-moe N`` layers kept in
  host memory, N chosen so the GPU holds about as many experts as Fiddler's placement does
  (``llama-cpp``); or every expert in host memory (``-ot exps=CPU``, ``llama-cpp-cpu-moe``).
- Generation: one ``/completion`` request per prompt with the prompt's token ids, greedy,
  EOS ignored, streamed; the project's clock reads the time at every streamed token (TTFT is
  the first), and the server returns the token ids, so agreement with the reference is exact.
  The server withholds a token whose text ends inside a UTF-8 character (a byte token) and
  streams its text, not its id, with the next one: such a token counts as delivered when the
  server sent it (``tokens_delivered_late`` in the stats), and its id comes from one repeat of
  the request without streaming (greedy, so the same tokens; checked).
  Beam search and sampling are unsupported. A request that streams nothing for
  ``STREAM_STALL_S``, or a server that dies, raises with the tail of the server's log.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from baselines.base import SystemOptions, SystemRefused, Unsupported, device_peak_memory, register, require_greedy
from fiddler.config import ModelConfig
from fiddler.export import export_checkpoint
from fiddler.generate import GenerationResult, GenerationSettings
from fiddler.placement import plan_placement
from fiddler.timing import Clock
from fiddler.tokenizer import preset_tokenizer_file
from fiddler.weights import open_weights

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
TREE_ENV = "FIDDLER_LLAMA_CPP"
DEFAULT_TREE = REPO / "third_party" / "llama.cpp"
CACHE = Path(os.environ.get("FIDDLER_CACHE", Path.home() / ".cache" / "fiddler")) / "gguf"
SERVER_START_TIMEOUT_S = 600.0  # loading a large GGUF into memory takes a while
# A streamed completion with no event for this long is stuck (the slowest legitimate wait is
# the prefill before the first token: seconds on the GPU host even at 8192 tokens on the CPU).
STREAM_STALL_S = 300.0
SERVER_LOG_TAIL_LINES = 3  # what an error quotes of the server's own log (its last lines)
ALL_LAYERS_ON_GPU = 99  # llama.cpp's idiom for "every layer"


def llama_tree() -> Path | None:
    for candidate in (os.environ.get(TREE_ENV), DEFAULT_TREE):
        if candidate and (Path(candidate) / "convert_hf_to_gguf.py").exists():
            return Path(candidate)
    return None


def find_program(name: str) -> Path | None:
    tree = llama_tree()
    if tree is not None and (tree / "build" / "bin" / name).exists():
        return tree / "build" / "bin" / name
    found = shutil.which(name)
    return Path(found) if found else None


def gguf_type(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "f32", torch.float16: "f16"}[dtype]


def convert_to_gguf(options: SystemOptions, tree: Path) -> Path:
    """The run's model as a GGUF file (cached; built atomically)."""
    cfg = options.config
    if options.checkpoint:
        source_key = "ckpt-" + hashlib.sha1(str(options.checkpoint.resolve()).encode()).hexdigest()[:12]
    else:
        source_key = f"seed{options.seed}"
    generator = torch.device(options.device).type
    path = CACHE / f"{cfg.name}-{source_key}-{generator}-{gguf_type(options.dtype)}.gguf"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    source = open_weights(cfg, options.checkpoint, options.seed, generator_device=generator)
    tokenizer = options.checkpoint / "tokenizer.model" if options.checkpoint else preset_tokenizer_file()
    if tokenizer is None or not tokenizer.exists():
        raise SystemRefused(
            "llama.cpp's converter needs a tokenizer.model: install mistral-common, or set $FIDDLER_TOKENIZER"
        )
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        checkpoint = export_checkpoint(source, Path(work) / "checkpoint", options.dtype, tokenizer)
        tmp = Path(work) / "model.gguf"
        command = [
            sys.executable,
            str(tree / "convert_hf_to_gguf.py"),
            str(checkpoint),
            "--outtype",
            gguf_type(options.dtype),
            "--outfile",
            str(tmp),
        ]
        env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
        clock = Clock("cpu")
        start = clock.now()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp's converter failed: {done.stderr[-800:]}")
        os.replace(tmp, path)
    log.info("converted %s to GGUF in %.0f s: %s", cfg.name, clock.now() - start, path)
    return path


def n_cpu_moe_for(options: SystemOptions) -> int:
    """Layers whose experts stay in host memory, so the GPU holds about as many experts as
    Fiddler's placement under the same budget (whole layers: llama.cpp moves experts by layer)."""
    cfg: ModelConfig = options.config
    if options.gpu_memory_gb is None:
        return 0
    placement = plan_placement(cfg, options.gpu_memory_gb, options.dtype, options.max_seq_len, options.beam_width)
    return cfg.num_layers - min(cfg.num_layers, placement.num_resident // cfg.num_experts)


def parse_stream(lines) -> list[dict]:
    """The events of a llama-server streamed completion (``data: {...}`` lines)."""
    events = []
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        line = line.strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: ") :]))
    return events


@dataclass
class StreamedTokens:
    """What a stream delivered: each generated token's id (None where the server sent only its
    text) and the time it reached the client."""

    ids: list[int | None]
    times: list[float]
    late: int  # tokens that arrived with a later event than their own


def place_streamed_tokens(arrivals: list[tuple[int, list[int], float]], total: int, end_time: float) -> StreamedTokens:
    """Tokens by position from ``arrivals`` (each event's ``tokens_predicted``, its token ids, the
    time it arrived). A position no event names was withheld by the server: it reached the
    client with the next event that did arrive (the final one, at ``end_time``, for the last)."""
    ids: list[int | None] = [None] * total
    arrived: list[float | None] = [None] * total
    for predicted, tokens, time in arrivals:
        first = predicted - len(tokens)
        if first < 0 or predicted > total:
            raise RuntimeError(f"llama-server streamed token positions {first + 1}..{predicted} of {total}")
        for offset, token in enumerate(tokens):
            ids[first + offset], arrived[first + offset] = token, time
    times, late, next_time = [0.0] * total, 0, end_time
    for position in reversed(range(total)):
        if arrived[position] is None:
            late += 1
        else:
            next_time = arrived[position]
        times[position] = next_time
    return StreamedTokens(ids, times, late)


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """One llama-server process on a free local port, for the life of a system."""

    def __init__(self, program: Path, gguf: Path, args: list[str], context: int, threads: int):
        self.port = _free_port()
        command = [
            str(program),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-c",
            str(context),
            "-t",
            str(threads),
            "-np",
            "1",
            *args,
        ]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - open for the server's whole life, closed in close()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.command = command
        self._wait_ready()

    def log_tail(self) -> str:
        """The server log's last lines, on one line (a failed row keeps one line)."""
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-SERVER_LOG_TAIL_LINES:])

    def _wait_ready(self) -> None:
        clock = Clock("cpu")
        start = clock.now()
        while clock.now() - start < SERVER_START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.log_tail()}")
            health = f"http://127.0.0.1:{self.port}/health"
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(health, timeout=1) as response,
            ):
                if response.status == 200:
                    log.info("llama-server ready in %.0f s: %s", clock.now() - start, " ".join(self.command))
                    return
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.2)
        self.close()
        raise RuntimeError(f"llama-server did not start within {SERVER_START_TIMEOUT_S} s")

    def stream(self, payload: dict, timeout: float | None = None):
        """The open response of a ``/completion`` request (a stream when ``payload`` asks);
        ``timeout`` (default ``STREAM_STALL_S``) bounds each read, not the whole response."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/completion",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        return urllib.request.urlopen(request, timeout=STREAM_STALL_S if timeout is None else timeout)

    def complete(self, payload: dict, timeout: float) -> dict:
        """The whole answer of a ``/completion`` request without streaming (it sends nothing
        until the generation is over: ``timeout`` must cover all of it)."""
        with self.stream({**payload, "stream": False}, timeout) as response:
            return json.loads(response.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


class LlamaCpp:
    name = "llama-cpp"

    def __init__(self, options: SystemOptions, experts_on_cpu: bool):
        self.options = options
        tree, program = llama_tree(), find_program("llama-server")
        if tree is None or program is None:
            raise SystemRefused(
                f"llama.cpp not found: run 'make llama-cpp' (CUDA=1 for a GPU build) or set ${TREE_ENV} to a "
                "llama.cpp tree with build/bin/llama-server"
            )
        self.gguf = convert_to_gguf(options, tree)
        on_gpu = torch.device(options.device).type == "cuda"
        if experts_on_cpu:
            placement_args, self.n_cpu_moe = ["-ot", "exps=CPU"], options.config.num_layers
        else:
            self.n_cpu_moe = n_cpu_moe_for(options)
            placement_args = ["--n-cpu-moe", str(self.n_cpu_moe)] if self.n_cpu_moe else []
        # --load-mode none (no mmap): the weights are read into memory while the server starts,
        # not paged in from disk by the first requests (a fresh GGUF of a large model need not
        # stay in the page cache, and a measured request would then time the disk).
        args = ["-ngl", str(ALL_LAYERS_ON_GPU if on_gpu else 0), *placement_args, "--load-mode", "none", "--no-warmup"]
        threads = options.cpu_threads or os.cpu_count() or 1
        self.server = LlamaServer(program, self.gguf, args, options.max_seq_len, threads)

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> GenerationResult:
        require_greedy(self.name, settings, beams=False)
        if not settings.ignore_eos:
            raise Unsupported("llama-cpp runs here with EOS ignored only (benchmark setting)")
        payload = {
            "prompt": prompt_ids,
            "n_predict": settings.max_new_tokens,
            "temperature": 0.0,
            "top_k": 1,
            "ignore_eos": True,
            "stream": True,
            "return_tokens": True,
            "cache_prompt": False,
        }
        clock = Clock(self.options.device)
        start = clock.now()
        arrivals, timings, total, end_time = [], {}, None, None
        try:
            with self.server.stream(payload) as response:
                for raw in response:
                    events = parse_stream([raw])
                    if not events:  # the blank line between events
                        continue
                    now = clock.now()
                    for event in events:
                        if event.get("tokens"):
                            arrivals.append((self._position(event), event["tokens"], now))
                        if event.get("stop"):
                            total, end_time = self._position(event), now
                        timings = event.get("timings", timings)
        except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
            received = arrivals[-1][0] if arrivals else 0
            raise RuntimeError(
                f"llama-server stopped after {received} of {settings.max_new_tokens} tokens ({err!r}); "
                f"its log ends: {self.server.log_tail()}"
            ) from err
        if end_time is None:
            what = f"ended its stream after {arrivals[-1][0]} tokens without" if arrivals else "sent no tokens and no"
            raise RuntimeError(f"llama-server {what} a final event; its log ends: {self.server.log_tail()}")
        if not total:
            raise RuntimeError(f"llama-server generated no tokens; its log ends: {self.server.log_tail()}")
        streamed = place_streamed_tokens(arrivals, total, end_time)
        # the unstreamed repeat takes about as long as the stream did; allow that on top of a stall
        repeat_timeout = STREAM_STALL_S + (end_time - start)
        tokens = streamed.ids if not streamed.late else self._ids_by_repeat(payload, streamed.ids, repeat_timeout)
        steps = [b - a for a, b in itertools.pairwise(streamed.times)]
        return GenerationResult(
            len(prompt_ids),
            tokens,
            streamed.times[0] - start,
            steps,
            {
                "executor": "llama.cpp",
                "n_cpu_moe": self.n_cpu_moe,
                "tokens_delivered_late": streamed.late,
                "server_timings": timings,
                "command": " ".join(self.server.command[:1] + self.server.command[3:]),
            },
        )

    def _position(self, event: dict) -> int:
        """The event's token position (llama-server's ``tokens_predicted``)."""
        if "tokens_predicted" not in event:
            raise RuntimeError(
                "llama-server's stream events lack 'tokens_predicted' (another server version?): build the "
                f"llama.cpp that 'make llama-cpp' builds; its log ends: {self.server.log_tail()}"
            )
        return int(event["tokens_predicted"])

    def _ids_by_repeat(self, payload: dict, streamed: list[int | None], timeout: float) -> list[int]:
        """The ids of a stream that withheld some, from the same greedy request unstreamed."""
        try:
            ids = self.server.complete(payload, timeout)["tokens"]
        except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
            raise RuntimeError(
                f"llama-server did not answer the unstreamed repeat ({err!r}); its log ends: {self.server.log_tail()}"
            ) from err
        known_agree = all(a is None or a == b for a, b in zip(streamed, ids, strict=False))
        if len(ids) != len(streamed) or not known_agree:
            raise RuntimeError(
                f"llama-server answered the same greedy request with other tokens ({len(ids)} tokens: {ids[:8]}...; "
                f"streamed {streamed[:8]}...)"
            )
        return ids

    def peak_gpu_memory(self) -> dict[str, float | None]:
        # llama.cpp allocates in its own process: only the device's total in use says anything
        return device_peak_memory(self.options.device) | {"peak_allocated_gb": None}

    def close(self) -> None:
        self.server.close()


@register("llama-cpp")
def llama_cpp(options: SystemOptions) -> LlamaCpp:
    return LlamaCpp(options, experts_on_cpu=False)


@register("llama-cpp-cpu-moe")
def llama_cpp_cpu_moe(options: SystemOptions) -> LlamaCpp:
    return LlamaCpp(options, experts_on_cpu=True)
