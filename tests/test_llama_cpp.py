"""llama.cpp as a compared system: GGUF conversion round trip, the budget -> --n-cpu-moe
mapping, parsing of the server's stream, and (where llama.cpp is built) greedy tokens equal to
the reference's. Needs llama.cpp's tree (``make llama-cpp`` or ``$FIDDLER_LLAMA_CPP``); without
it the tests that need it skip, saying so."""

import http.server
import json
import socket
import sys
import tempfile
import threading
import types
from typing import ClassVar

import pytest
import torch
from conftest import PROMPT

from baselines import SystemOptions, llama_cpp, load_system
from baselines.llama_cpp import (
    LlamaCpp,
    LlamaServer,
    convert_to_gguf,
    find_program,
    llama_tree,
    n_cpu_moe_for,
    parse_stream,
    place_streamed_tokens,
)
from fiddler.config import ModelConfig
from fiddler.engine import Engine
from fiddler.generate import GenerationSettings, generate
from fiddler.weights import EMBED, RandomWeights, expert_name, load

TINY = ModelConfig.preset("mixtral-tiny")
NO_TREE = "llama.cpp not built here: run 'make llama-cpp' or set $FIDDLER_LLAMA_CPP"


def options(**kw) -> SystemOptions:
    return SystemOptions(config=TINY, max_seq_len=64, device="cpu", dtype=torch.float32, seed=5, **kw)


def test_budget_to_n_cpu_moe():
    mixtral = ModelConfig.preset("mixtral-8x7b")
    at = lambda gb: n_cpu_moe_for(SystemOptions(config=mixtral, max_seq_len=768, gpu_memory_gb=gb))  # noqa: E731
    assert at(None) == 0
    assert at(24.0) == 32 - 56 // 8  # Fiddler keeps 56 experts: 7 layers' worth stay on the GPU
    assert at(48.0) == 32 - 124 // 8
    assert at(200.0) == 0


def test_parse_stream():
    lines = [
        b'data: {"content": "a", "tokens": [5], "stop": false}\n',
        b"\n",
        b'data: {"content": "", "tokens": [], "stop": true, "timings": {"predicted_n": 1}}\n',
        b"data: [DONE]\n",
    ]
    events = parse_stream(lines)
    assert [e["tokens"] for e in events] == [[5], []] and events[-1]["timings"]["predicted_n"] == 1


def test_a_stalled_stream_raises_with_the_server_log(monkeypatch):
    """On the GPU host a llama-server stream stopped mid-way and the harness waited until its
    call ran out; a stall now ends the request with what the server logged."""
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()

    def stalling_server() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        event = b'data: {"tokens": [7], "tokens_predicted": 1, "stop": false}\n\n'
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        connection.sendall(head + f"{len(event):x}\r\n".encode() + event + b"\r\n")
        release.wait(10)  # then nothing more, as the stuck server did
        connection.close()

    thread = threading.Thread(target=stalling_server)
    thread.start()
    server = object.__new__(LlamaServer)  # the stream and log of a server, without the program
    server.port, server.log = listener.getsockname()[1], tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    server.log.write(b"... ggml_cuda_init: found 1 CUDA devices\nslot update_slots: stuck here\n")
    system = object.__new__(LlamaCpp)
    system.options, system.server = options(), server
    monkeypatch.setattr(llama_cpp, "STREAM_STALL_S", 0.5)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)stopped after 1 of 4 tokens.*stuck here"):
            system.generate([1, 5, 6], GenerationSettings(max_new_tokens=4, ignore_eos=True))
    finally:
        release.set()
        thread.join()
        listener.close()
        server.log.close()


def test_withheld_tokens_arrive_with_the_next_event():
    # positions 2 and 5 were withheld (byte tokens): each reached the client with the next event
    streamed = place_streamed_tokens([(1, [11], 0.1), (3, [13], 0.3), (4, [14], 0.4)], 5, end_time=0.6)
    assert streamed.ids == [11, None, 13, 14, None]
    assert streamed.times == [0.1, 0.3, 0.3, 0.4, 0.6] and streamed.late == 2
    with pytest.raises(RuntimeError, match=r"positions 6\.\.6 of 5"):
        place_streamed_tokens([(6, [1], 0.1)], 5, end_time=0.2)


def test_an_event_without_its_position_is_a_clear_error():
    system = object.__new__(LlamaCpp)
    system.server = types.SimpleNamespace(log_tail=lambda: "server says hello")
    assert system._position({"tokens_predicted": 3}) == 3
    with pytest.raises(RuntimeError, match=r"lack 'tokens_predicted'.*make llama-cpp.*server says hello"):
        system._position({"tokens": [5]})


class FakeLlamaServer(http.server.BaseHTTPRequestHandler):
    """Answers /completion as llama-server does when token 3 of 4 ends inside a UTF-8
    character: the stream names tokens 1, 2 and 4 only; the unstreamed answer has all four."""

    tokens: ClassVar[list[int]] = [101, 102, 3, 104]

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()
        if not payload["stream"]:
            self.wfile.write(json.dumps({"tokens": self.tokens, "stop": True}).encode())
            return
        for position, token in enumerate(self.tokens, start=1):
            if token != 3:
                self.wfile.write(f'data: {{"tokens": [{token}], "tokens_predicted": {position}}}\n\n'.encode())
        self.wfile.write(b'data: {"tokens": [], "tokens_predicted": 4, "stop": true}\n\n')

    def log_message(self, *args) -> None:
        pass


def test_a_withheld_token_is_recovered_by_one_unstreamed_repeat():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeLlamaServer)
    thread = threading.Thread(target=httpd.serve_forever)
    thread.start()
    server = object.__new__(LlamaServer)  # the stream of a server, without the program
    server.port, server.command = httpd.server_address[1], ["llama-server", "-m", "x.gguf"]
    system = object.__new__(LlamaCpp)
    system.options, system.server, system.n_cpu_moe = options(), server, 0
    try:
        result = system.generate([1, 5, 6], GenerationSettings(max_new_tokens=4, ignore_eos=True))
    finally:
        httpd.shutdown()
        thread.join()
        httpd.server_close()
    assert result.token_ids == FakeLlamaServer.tokens and result.stats["tokens_delivered_late"] == 1
    assert len(result.step_times_s) == 3 and result.step_times_s[2] == 0.0  # token 3 came with token 4


def test_gguf_round_trip(tmp_path, monkeypatch):
    tree = llama_tree()
    if tree is None:
        pytest.skip(NO_TREE)
    monkeypatch.setattr("baselines.llama_cpp.CACHE", tmp_path)
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    path = convert_to_gguf(options(), tree)
    reader = GGUFReader(str(path))
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    source = RandomWeights(TINY, seed=5)
    assert torch.equal(
        tensors["token_embd.weight"].reshape(TINY.vocab_size, -1), load(source, EMBED, "cpu", torch.float32)
    )
    gate = tensors["blk.1.ffn_gate_exps.weight"].reshape(TINY.num_experts, TINY.intermediate_size, -1)
    assert torch.equal(gate[2], load(source, expert_name(1, 2, "w1"), "cpu", torch.float32))
    down = tensors["blk.0.ffn_down_exps.weight"].reshape(TINY.num_experts, TINY.hidden_size, -1)
    assert torch.equal(down[3], load(source, expert_name(0, 3, "w2"), "cpu", torch.float32))


@pytest.mark.parametrize("name", ["llama-cpp", "llama-cpp-cpu-moe"])
def test_greedy_tokens_agree_with_the_reference(name, tmp_path, monkeypatch):
    if llama_tree() is None or find_program("llama-server") is None:
        pytest.skip(NO_TREE + " (with llama-server)")
    monkeypatch.setattr("baselines.llama_cpp.CACHE", tmp_path)
    system = load_system(name, options())
    settings = GenerationSettings(max_new_tokens=12)
    try:
        result = system.generate(PROMPT, settings)
    finally:
        system.close()
    reference = Engine.resident(RandomWeights(TINY, seed=5), "cpu", torch.float32, 64)
    assert result.token_ids == generate(reference, PROMPT, settings).token_ids
    assert result.ttft_s > 0 and len(result.step_times_s) == settings.max_new_tokens - 1
