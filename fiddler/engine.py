"""The engine: prefill, decode steps, the KV cache and beam reordering, CUDA graphs for decode.

Contract: an ``Engine`` wraps a ``MixtralModel`` (dense weights + an expert executor). A
generation calls ``begin(batch, seq_len)``, ``prefill`` once for the prompt (one sequence),
``expand(batch)`` to give every beam the prompt's cache, then ``decode`` once per new token,
and ``reorder`` whenever beams are re-selected. Logits come back as float32 on the model's
device. On CUDA, when the executor is capturable, each decode batch size is recorded once as a
CUDA graph and replayed (the cache and inputs are static buffers); otherwise steps run eagerly.
The engine knows nothing about tokenization or sampling.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fiddler.config import ModelConfig
from fiddler.cost_model import LatencyModel
from fiddler.cpu_experts import CpuExpertKernel
from fiddler.loading import load_dense, load_expert_stack, load_host_weights
from fiddler.model import KVCache, MixtralModel
from fiddler.moe import ResidentExperts, Routing
from fiddler.orchestrator import THREAD, FiddlerExecutor
from fiddler.placement import Placement
from fiddler.weights import WeightSource

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRAPH_WARMUP_STEPS = 2  # eager runs on a side stream before capture, as torch's graph docs ask


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class DecodeGraph:
    """One decode step for a fixed batch size, recorded as a CUDA graph over static buffers."""

    def __init__(self, model: MixtralModel, cache: KVCache, tokens: torch.Tensor, position: int):
        device = model.device
        self.tokens = tokens.detach().clone().view(-1, 1)
        self.positions = torch.tensor([position], device=device, dtype=torch.long)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):  # rewrites the same cache slot with the same values
                model.forward(self.tokens, self.positions, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.forward(self.tokens, self.positions, cache)

    def run(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        self.positions.fill_(position)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the static output


class PiecewiseDecode:
    """One decode step for a fixed batch size when the experts cannot be recorded (they read
    the routing on the host): everything else is recorded as CUDA graphs, one per layer (the
    previous layer's expert output added, then attention and routing) and one for the head,
    replayed around the executor's eager calls. Static buffers carry values between them.
    With ``record`` false the same segments run eagerly (how CPU tests check the plumbing)."""

    def __init__(self, model: MixtralModel, cache: KVCache, tokens: torch.Tensor, position: int, record: bool):
        self.model, self.cache, self.record = model, cache, record
        device, layers = model.device, model.config.num_layers
        self.tokens = tokens.detach().clone().view(-1, 1)
        self.positions = torch.tensor([position], device=device, dtype=torch.long)
        rows, hidden = self.tokens.numel(), model.config.hidden_size
        self.moe_out = [torch.zeros(rows, hidden, device=device, dtype=model.dtype) for _ in range(layers)]
        self.outputs: list = [None] * (layers + 1)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.first_logits = self.step()  # eager: warms every kernel up, and is this step's result
        if record:
            pool = torch.cuda.graph_pool_handle()
            for index in range(layers + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[index] = self._segment(index)
                self.graphs.append(graph)

    def _segment(self, index: int):
        model = self.model
        if index == 0:
            x = F.embedding(self.tokens, model.dense.embed)
        else:
            previous = self.outputs[index - 1][0]
            x = previous + self.moe_out[index - 1].view_as(previous)
        if index == model.config.num_layers:
            return (model.head(x),)
        span = model.attention_span(self.positions, self.cache, None)  # the whole cache, masked
        x, hidden, routing = model.before_experts(index, x, self.positions, span, self.cache)
        return x, hidden, routing.experts, routing.weights

    def step(self) -> torch.Tensor:
        layers = self.model.config.num_layers
        for index in range(layers + 1):
            if self.graphs:
                self.graphs[index].replay()
            else:
                self.outputs[index] = self._segment(index)
            if index < layers:
                _, hidden, experts, weights = self.outputs[index]
                self.moe_out[index].copy_(self.model.experts(index, hidden, Routing(experts, weights)))
        return self.outputs[layers][0].clone()

    def run(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        self.positions.fill_(position)
        return self.step()


class Engine:
    def __init__(self, model: MixtralModel, cuda_graphs: bool = True, piecewise: bool | None = None):
        """``cuda_graphs``: record decode steps where the executor allows (whole steps), or else
        (``piecewise``, default on CUDA for models with static weights) everything but the
        experts. ``piecewise=True`` on the CPU runs the same segments eagerly."""
        self.model = model
        self.config: ModelConfig = model.config
        self.device = model.device
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and model.experts.capturable
        if piecewise is None:
            piecewise = cuda_graphs and self.device.type == "cuda" and model.static_weights
        self.piecewise = piecewise and not self.use_graphs and model.static_weights
        self._pieces: dict[int, PiecewiseDecode] = {}
        self.cache: KVCache | None = None  # the rows of _full_cache this generation uses
        self._full_cache: KVCache | None = None
        self.length = 0  # filled cache positions
        self.batch = 0
        self._graphs: dict[int, DecodeGraph] = {}
        self._graph_failure: str | None = None

    @classmethod
    def resident(
        cls,
        source: WeightSource,
        device: torch.device | str,
        dtype: torch.dtype,
        max_seq_len: int,
        expert_strategy: str = "auto",
        cuda_graphs: bool = True,
    ) -> Engine:
        """The whole model on ``device`` (the upper bound when it fits)."""
        dense = load_dense(source, device, dtype)
        stacks = [load_expert_stack(source, layer, device, dtype) for layer in range(source.config.num_layers)]
        experts = ResidentExperts([s[0] for s in stacks], [s[1] for s in stacks], strategy=expert_strategy)
        model = MixtralModel(source.config, dense, experts, max_seq_len=max_seq_len)
        return cls(model, cuda_graphs=cuda_graphs)

    @classmethod
    def fiddler(
        cls,
        source: WeightSource,
        device: torch.device | str,
        dtype: torch.dtype,
        max_seq_len: int,
        placement: Placement,
        latency: LatencyModel,
        policy: str,
        cpu_kernel: CpuExpertKernel,
        staging_slots: int = 2,
        layer_timing: bool = False,
        piecewise: bool | None = None,
        cpu_mode: str = THREAD,
        adapt_paths: bool = False,
    ) -> Engine:
        """Dense weights and the placement's experts on ``device``; every expert also in
        page-locked host memory, where the CPU path reads it and copies start from."""
        device = torch.device(device)
        dense = load_dense(source, device, dtype)
        host = load_host_weights(source, dtype, pin=device.type == "cuda")
        resident = {
            (layer, expert): tuple(t.to(device) for t in host.experts[layer][expert])
            for layer, expert in sorted(placement.resident)
        }
        executor = FiddlerExecutor(
            source.config,
            device,
            host,
            resident,
            placement,
            latency,
            policy,
            cpu_kernel,
            staging_slots,
            layer_timing,
            cpu_mode=cpu_mode,
            adapt_paths=adapt_paths,
        )
        model = MixtralModel(source.config, dense, executor, max_seq_len=max_seq_len)
        return cls(model, piecewise=piecewise)

    def set_executor(self, executor) -> None:
        """Swap the MoE executor (e.g. wrap it); recorded graphs belong to the old one."""
        self.model.experts = executor
        self._graphs.clear()
        self._pieces.clear()
        self.use_graphs = self.use_graphs and executor.capturable

    # ---- one generation ----------------------------------------------------------------

    def begin(self, batch: int, seq_len: int) -> None:
        """Make room for ``batch`` sequences of up to ``seq_len`` tokens (prompt + new)."""
        limit = min(self.model.max_seq_len, self.config.max_position_embeddings)
        if seq_len > limit:
            raise ValueError(
                f"prompt + new tokens = {seq_len} exceeds this model's context of {limit} tokens; "
                "shorten the prompt or lower --max-new-tokens"
            )
        # One cache for the model's longest sequence and the largest batch seen; smaller batches
        # use its first rows, so recorded graphs stay valid across generations of any length.
        if self._full_cache is None or self._full_cache.batch < batch:
            self._graphs.clear()  # graphs point at the old cache
            self._pieces.clear()
            self.cache = self._full_cache = None
            self._full_cache = KVCache.allocate(self.config, batch, limit, self.device, self.model.dtype)
        full = self._full_cache
        self.cache = full if full.batch == batch else full.rows(batch)
        self.batch = batch
        self.length = 0
        self.model.experts.reset_stats()

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt: [T] token ids for one sequence (row 0) -> logits [1, V]."""
        assert self.cache is not None, "call begin() first"
        tokens = prompt.to(self.device).view(1, -1)
        num_tokens = tokens.shape[1]
        positions = torch.arange(self.length, self.length + num_tokens, device=self.device)
        row0 = self.cache.rows(1)
        logits = self.model.forward(tokens, positions, row0, kv_len=self.length + num_tokens)
        self.length += num_tokens
        return logits

    def expand(self, batch: int) -> None:
        """Copy row 0's cache into rows 1..batch-1 (every beam starts from the prompt)."""
        assert self.cache is not None and batch == self.cache.batch
        if batch > 1:
            self.cache.copy_rows_(torch.zeros(batch, dtype=torch.long, device=self.device))

    def reorder(self, source_rows: torch.Tensor) -> None:
        assert self.cache is not None
        self.cache.copy_rows_(source_rows.to(self.device))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] the last token of each sequence -> logits [B, V]."""
        assert self.cache is not None
        tokens = tokens.to(self.device)
        position = self.length
        self.length += 1
        if self.use_graphs and self._graph_failure is None:
            logits = self._decode_graph(tokens, position)
            if logits is not None:
                return logits
        if self.piecewise and self._graph_failure is None:
            logits = self._decode_piecewise(tokens, position)
            if logits is not None:
                return logits
        positions = torch.tensor([position], device=self.device)
        return self.model.forward(tokens.view(-1, 1), positions, self.cache, kv_len=position + 1)

    def _decode_piecewise(self, tokens: torch.Tensor, position: int) -> torch.Tensor | None:
        batch = tokens.shape[0]
        pieces = self._pieces.get(batch)
        if pieces is None:
            try:
                pieces = PiecewiseDecode(self.model, self.cache, tokens, position, self.device.type == "cuda")
            except RuntimeError as err:  # an op that cannot be recorded: decode eagerly from now on
                self._graph_failure = str(err).splitlines()[0]
                log.warning("piecewise CUDA graph capture failed, decoding eagerly: %s", self._graph_failure)
                return None
            self._pieces[batch] = pieces
            return pieces.first_logits
        return pieces.run(tokens, position)

    def _decode_graph(self, tokens: torch.Tensor, position: int) -> torch.Tensor | None:
        batch = tokens.shape[0]
        graph = self._graphs.get(batch)
        if graph is None:
            try:
                graph = DecodeGraph(self.model, self.cache, tokens, position)
            except RuntimeError as err:  # an op that cannot be captured: fall back to eager, once
                self._graph_failure = str(err).splitlines()[0]
                log.warning("CUDA graph capture failed, decoding eagerly: %s", self._graph_failure)
                return None
            self._graphs[batch] = graph
        return graph.run(tokens, position)

    def close(self) -> None:
        """Release the executor's threads and host memory; the engine is unusable afterwards."""
        self._graphs.clear()
        self._pieces.clear()
        self.cache = self._full_cache = None
        self.model.experts.close()

    def stats(self) -> dict[str, object]:
        return {
            "cuda_graphs": ("whole step" if self.use_graphs else "piecewise" if self.piecewise else False)
            if self._graph_failure is None
            else False,
            "cuda_graph_failure": self._graph_failure,
            **self.model.experts.stats(),
        }
