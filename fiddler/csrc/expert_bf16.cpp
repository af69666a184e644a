// One Mixtral expert (or a run of its blocks) for a few tokens on the CPU, in bf16, reading the
// weights once at memory bandwidth: AVX512-BF16 dot products (VDPBF16PS, fp32 accumulation),
// threads from torch's intra-op pool, weights streamed in address order by every thread.
//
// Layout (fiddler/expert_layout.py), k blocks of G intermediate rows:
//   w13b [2kG, D]: block after block, G gate rows then the same G up rows;
//   w2b  [k, D, G]: block b holds w2's columns [bG, bG + G), row-major.
// x [n, D] bf16, 1 <= n <= kMaxTokens.
//   y1[t, r] = dot(x[t, :], w13b[r, :])                      (rows split across threads)
//   h[t, bG + j] = bf16(silu(gate) * up)                       (gate, up from y1)
//   y[t, d] = sum_b dot(h[t, bG : bG + G], w2b[b, d, :])       (rows d split across threads;
//                                                               each thread walks b in order)
//
// Two paths compute this. `expert`: AVX512-BF16 dot products, for 1-16 tokens; memory-bound at
// one or two tokens, compute-bound in VDPBF16PS from about four. `expert_amx`: AMX tiles
// (TDPBF16PS), any token count in passes of up to 64; the weights are the A operand, read
// straight from the split layout (16 rows x 32 columns per tile), and the tokens the B
// operand, packed once per call into the pair-interleaved (VNNI) form the instruction needs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int kChunksPerThread = 8;  // work handed out in pieces: see shared_for

// Like at::parallel_for over [begin, end), but every thread takes the next chunk (a multiple of
// `grain`) until none is left, instead of one fixed share each. A thread that loses its core
// for a while (the engine's main thread issuing GPU work, a sampler, a driver thread: the
// kernel runs on every core) then delays its chunk, not a sixteenth of the weights: with fixed
// shares the whole call waits for the slowest thread.
template <typename F>
void shared_for(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t pieces = threads * kChunksPerThread;
  const int64_t chunk = std::max<int64_t>(grain, (end - begin + pieces - 1) / pieces / grain * grain);
  std::atomic<int64_t> next{begin};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t start = next.fetch_add(chunk); start < end; start = next.fetch_add(chunk))
      fn(start, std::min(end, start + chunk));
  });
}

constexpr int kMaxTokens = 16;  // beyond this oneDNN's AMX path (torch) is the better tool
constexpr int64_t kRowGrain = 8;

inline uint16_t to_bf16(float value) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// Rows handled together so that every activation load feeds R rows: R * N accumulators,
// R weight vectors and one activation vector must fit the 32 vector registers.
template <int N>
constexpr int rows_together() {
  return N >= 16 ? 1 : N >= 8 ? 2 : N >= 4 ? 4 : 8;
}

// acc[i][t] += x[t, 0:len] . w[i * len + 0:len] for R consecutive rows, weights loaded once.
template <int N, int R>
inline void dot_group(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t len, __m512 (&acc)[R][N]) {
  int64_t k = 0;
  for (; k + 32 <= len; k += 32) {
    __m512bh wk[R];
    for (int i = 0; i < R; ++i) wk[i] = (__m512bh)_mm512_loadu_si512(w + i * len + k);
    for (int t = 0; t < N; ++t) {
      __m512bh xk = (__m512bh)_mm512_loadu_si512(x + t * x_stride + k);
      for (int i = 0; i < R; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], wk[i], xk);
    }
  }
  if (k < len) {  // a tail shorter than 32 elements: masked loads read zeros beyond it
    const __mmask32 mask = (1u << (len - k)) - 1u;
    __m512bh wk[R];
    for (int i = 0; i < R; ++i) wk[i] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + i * len + k);
    for (int t = 0; t < N; ++t) {
      __m512bh xk = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t * x_stride + k);
      for (int i = 0; i < R; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], wk[i], xk);
    }
  }
}

template <int N, int R>
inline void dot_rows_of(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t len, float* out,
                        int64_t out_stride, int64_t r) {
  __m512 acc[R][N];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < N; ++t) acc[i][t] = _mm512_setzero_ps();
  dot_group<N, R>(x, x_stride, w + r * len, len, acc);
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < N; ++t) out[t * out_stride + r + i] += _mm512_reduce_add_ps(acc[i][t]);
}

// out[t, r] = sum_s x[t, s*len : s*len + len] . w[s*seg_stride + r*len : + len], r in [r0, r1).
// Segment-major loops: each thread reads every segment's rows [r0, r1) as one contiguous run.
template <int N>
void dot_rows(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t segments, int64_t seg_stride,
              int64_t len, float* out, int64_t out_stride, int64_t r0, int64_t r1) {
  constexpr int R = rows_together<N>();
  for (int64_t r = r0; r < r1; ++r)
    for (int t = 0; t < N; ++t) out[t * out_stride + r] = 0.0f;
  for (int64_t s = 0; s < segments; ++s) {
    const uint16_t* xs = x + s * len;
    const uint16_t* ws = w + s * seg_stride;
    int64_t r = r0;
    for (; r + R <= r1; r += R) dot_rows_of<N, R>(xs, x_stride, ws, len, out, out_stride, r);
    for (; r < r1; ++r) dot_rows_of<N, 1>(xs, x_stride, ws, len, out, out_stride, r);
  }
}

template <int N>
torch::Tensor expert_n(const torch::Tensor& x, const torch::Tensor& w13b, const torch::Tensor& w2b) {
  const int64_t d = x.size(1), rows = w13b.size(0), blocks = w2b.size(0), g = w2b.size(2);
  const int64_t f = blocks * g;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* w13p = reinterpret_cast<const uint16_t*>(w13b.data_ptr<at::BFloat16>());
  const auto* w2p = reinterpret_cast<const uint16_t*>(w2b.data_ptr<at::BFloat16>());

  // y1 and h are written whole before they are read (dot_rows clears its rows): no serial zero fill
  std::unique_ptr<float[]> y1(new float[N * rows]);
  shared_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    dot_rows<N>(xp, d, w13p, 1, 0, d, y1.get(), rows, r0, r1);
  });

  std::unique_ptr<uint16_t[]> h(new uint16_t[N * f]);
  at::parallel_for(0, f, 256, [&](int64_t f0, int64_t f1) {
    for (int t = 0; t < N; ++t) {
      for (int64_t i = f0; i < f1; ++i) {
        const int64_t b = i / g, j = i % g;
        const float gate = y1[t * rows + 2 * b * g + j], up = y1[t * rows + 2 * b * g + g + j];
        h[t * f + i] = to_bf16(gate / (1.0f + std::exp(-gate)) * up);
      }
    }
  });

  auto y = torch::empty({N, d}, x.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  shared_for(0, d, kRowGrain, [&](int64_t r0, int64_t r1) {
    dot_rows<N>(h.get(), f, w2p, blocks, d * g, g, yp, d, r0, r1);
  });
  return y.to(torch::kBFloat16);
}

template <int N = 1>
torch::Tensor dispatch(const torch::Tensor& x, const torch::Tensor& w13b, const torch::Tensor& w2b) {
  if constexpr (N > kMaxTokens) {
    TORCH_CHECK(false, "at most ", kMaxTokens, " tokens");
  } else {
    if (x.size(0) == N) return expert_n<N>(x, w13b, w2b);
    return dispatch<N + 1>(x, w13b, w2b);
  }
}


#ifndef FIDDLER_NO_AMX  // a compiler without AMX support builds the rest (native.py retries so)
// ---------------------------------------------------------------------------------------------
// AMX path.

constexpr int kTile = 16;          // rows of a tile, and tokens of a B tile
constexpr int kTileK = 32;         // bf16 elements of a tile row (64 bytes)
constexpr int kTileElems = kTile * kTileK;
constexpr int kMaxTokenTiles = 4;  // C tiles 0-3 hold up to 64 tokens per pass over the weights
constexpr int kAmxPassTokens = kTile * kMaxTokenTiles;
// GCC's tile intrinsics paste the tile number into the instruction: literals, not constants.
#define TILE_A 4
#define TILE_B 5
constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // Linux: ask to use AMX state

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return permitted;
}

void configure_tiles() {
  TileConfig config;
  for (int t = 0; t <= TILE_B; ++t) {
    config.rows[t] = kTile;
    config.colsb[t] = kTileK * sizeof(uint16_t);
  }
  _tile_loadconfig(&config);
}

inline int64_t chunks_of(int64_t len) { return (len + kTileK - 1) / kTileK; }

// Tokens as B tiles: dst[c][p][t][e] = src[t, c*32 + 2p + e] for token tile (t0 .. t0+15), zero
// beyond `tokens` and `len`; one tile per 32-element chunk c of the row.
// A pair (2p, 2p+1) of one token is one 32-bit word, so with an even `len` (every model's) the
// packing is a transpose of words, without the per-element index arithmetic of the general path.
void pack_tokens(const uint16_t* src, int64_t src_stride, int tokens, int64_t len, uint16_t* dst) {
  const int64_t chunks = chunks_of(len);
  std::memset(dst, 0, sizeof(uint16_t) * kTileElems * chunks);
  if (len % 2 == 0) {
    constexpr int kPairs = kTileK / 2;
    for (int t = 0; t < tokens; ++t)
      for (int64_t q = 0; q < len / 2; ++q)  // memcpy of 4 bytes: one load and one store, no aliasing
        std::memcpy(dst + 2 * ((q / kPairs) * (kTileElems / 2) + (q % kPairs) * kTile + t), src + t * src_stride + 2 * q,
                    sizeof(uint32_t));
    return;
  }
  for (int t = 0; t < tokens; ++t)
    for (int64_t k = 0; k < len; ++k) {
      const int64_t c = k / kTileK, p = (k % kTileK) / 2, e = k % 2;
      dst[c * kTileElems + p * kTileK + t * 2 + e] = src[t * src_stride + k];
    }
}

// A tile of weights: rows r..r+15, columns c*32..c*32+31 of a [*, len] row-major matrix; a tile
// that would run past `rows_left` or `len` goes through a zero-padded copy.
inline void load_weights(const uint16_t* w, int64_t len, int64_t r, int64_t c, int64_t rows_left, uint16_t* scratch) {
  const int64_t k0 = c * kTileK, cols = std::min<int64_t>(kTileK, len - k0);
  if (rows_left >= kTile && cols == kTileK) {
    _tile_loadd(TILE_A, w + r * len + k0, len * sizeof(uint16_t));
    return;
  }
  std::memset(scratch, 0, sizeof(uint16_t) * kTileElems);
  for (int64_t i = 0; i < std::min<int64_t>(kTile, rows_left); ++i)
    std::memcpy(scratch + i * kTileK, w + (r + i) * len + k0, sizeof(uint16_t) * cols);
  _tile_loadd(TILE_A, scratch, kTileK * sizeof(uint16_t));
}

template <int TC>
inline void store_tokens(float* out, int64_t out_stride, int tokens, int64_t r, int64_t rows) {
  alignas(64) float c[kTile * kTile];
  for (int j = 0; j < TC; ++j) {
    switch (j) {  // tile numbers must be constants
      case 0: _tile_stored(0, c, kTile * sizeof(float)); break;
      case 1: _tile_stored(1, c, kTile * sizeof(float)); break;
      case 2: _tile_stored(2, c, kTile * sizeof(float)); break;
      default: _tile_stored(3, c, kTile * sizeof(float)); break;
    }
    for (int t = j * kTile; t < std::min(tokens, (j + 1) * kTile); ++t)
      for (int64_t i = 0; i < rows; ++i) out[t * out_stride + r + i] = c[i * kTile + (t - j * kTile)];
  }
}

// out[t, r] = sum_s tokens_s[t, :] . w_s[r, :] for rows [g0*16, min(g1*16, rows)), with TC token
// tiles; segment s's weights start at w + s*seg_stride, its packed tokens at
// packed + s*TC*chunks*kTileElems (token tile j at + j*chunks*kTileElems).
template <int TC>
void amx_rows(const uint16_t* packed, int tokens, const uint16_t* w, int64_t segments, int64_t seg_stride,
              int64_t len, int64_t rows, float* out, int64_t out_stride, int64_t g0, int64_t g1) {
  const int64_t chunks = chunks_of(len), tile_stride = kTileK * sizeof(uint16_t);
  alignas(64) uint16_t scratch[kTileElems];
  configure_tiles();
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t r = g * kTile, rows_left = rows - r;
    _tile_zero(0);
    if constexpr (TC > 1) _tile_zero(1);
    if constexpr (TC > 2) _tile_zero(2);
    if constexpr (TC > 3) _tile_zero(3);
    for (int64_t s = 0; s < segments; ++s) {
      const uint16_t* b = packed + s * TC * chunks * kTileElems;
      for (int64_t c = 0; c < chunks; ++c) {
        load_weights(w + s * seg_stride, len, r, c, rows_left, scratch);
        _tile_loadd(TILE_B, b + c * kTileElems, tile_stride);
        _tile_dpbf16ps(0, TILE_A, TILE_B);
        if constexpr (TC > 1) {
          _tile_loadd(TILE_B, b + (chunks + c) * kTileElems, tile_stride);
          _tile_dpbf16ps(1, TILE_A, TILE_B);
        }
        if constexpr (TC > 2) {
          _tile_loadd(TILE_B, b + (2 * chunks + c) * kTileElems, tile_stride);
          _tile_dpbf16ps(2, TILE_A, TILE_B);
        }
        if constexpr (TC > 3) {
          _tile_loadd(TILE_B, b + (3 * chunks + c) * kTileElems, tile_stride);
          _tile_dpbf16ps(3, TILE_A, TILE_B);
        }
      }
    }
    store_tokens<TC>(out, out_stride, tokens, r, std::min<int64_t>(kTile, rows_left));
  }
  _tile_release();
}

// `segments` segments of tokens [n, segments*len] (row stride src_stride) packed as amx_rows reads them.
std::unique_ptr<uint16_t[]> pack_segments(const uint16_t* src, int64_t src_stride, int n, int64_t segments,
                                          int64_t len) {
  const int tiles = (n + kTile - 1) / kTile;
  const int64_t chunks = chunks_of(len);
  // not zero-initialised here: pack_tokens clears its own part (a serial fill costs ~0.1 ms)
  std::unique_ptr<uint16_t[]> packed(new uint16_t[segments * tiles * chunks * kTileElems]);
  at::parallel_for(0, segments * tiles, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = i / tiles, j = i % tiles;
      pack_tokens(src + j * kTile * src_stride + s * len, src_stride, std::min<int>(kTile, n - j * kTile), len,
                  packed.get() + i * chunks * kTileElems);
    }
  });
  return packed;
}

template <int TC>
void amx_matmul(const uint16_t* packed, int n, const uint16_t* w, int64_t segments, int64_t seg_stride, int64_t len,
                int64_t rows, float* out, int64_t out_stride) {
  shared_for(0, (rows + kTile - 1) / kTile, 1, [&](int64_t g0, int64_t g1) {
    amx_rows<TC>(packed, n, w, segments, seg_stride, len, rows, out, out_stride, g0, g1);
  });
}

void amx_dispatch(const uint16_t* packed, int n, const uint16_t* w, int64_t segments, int64_t seg_stride, int64_t len,
                  int64_t rows, float* out, int64_t out_stride) {
  switch ((n + kTile - 1) / kTile) {
    case 1: return amx_matmul<1>(packed, n, w, segments, seg_stride, len, rows, out, out_stride);
    case 2: return amx_matmul<2>(packed, n, w, segments, seg_stride, len, rows, out, out_stride);
    case 3: return amx_matmul<3>(packed, n, w, segments, seg_stride, len, rows, out, out_stride);
    default: return amx_matmul<4>(packed, n, w, segments, seg_stride, len, rows, out, out_stride);
  }
}

// One pass over the weights for n <= 64 tokens.
void amx_pass(const uint16_t* xp, int n, int64_t d, const uint16_t* w13p, int64_t rows, const uint16_t* w2p,
              int64_t blocks, int64_t g, float* yp) {
  const int64_t f = blocks * g;
  // y1 and h are written whole before they are read: no serial zero fill
  std::unique_ptr<float[]> y1(new float[n * rows]);
  amx_dispatch(pack_segments(xp, d, n, 1, d).get(), n, w13p, 1, 0, d, rows, y1.get(), rows);

  std::unique_ptr<uint16_t[]> h(new uint16_t[n * f]);
  at::parallel_for(0, f, 256, [&](int64_t f0, int64_t f1) {
    for (int t = 0; t < n; ++t)
      for (int64_t i = f0; i < f1; ++i) {
        const int64_t b = i / g, j = i % g;
        const float gate = y1[t * rows + 2 * b * g + j], up = y1[t * rows + 2 * b * g + g + j];
        h[t * f + i] = to_bf16(gate / (1.0f + std::exp(-gate)) * up);
      }
  });
  amx_dispatch(pack_segments(h.get(), f, n, blocks, g).get(), n, w2p, blocks, d * g, g, d, yp, d);
}

#endif  // FIDDLER_NO_AMX

void check_expert_args(const torch::Tensor& x, const torch::Tensor& w13b, const torch::Tensor& w2b) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w13b.scalar_type() == torch::kBFloat16 &&
                  w2b.scalar_type() == torch::kBFloat16,
              "bf16 tensors expected");
  TORCH_CHECK(x.is_contiguous() && w13b.is_contiguous() && w2b.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(x.dim() == 2 && w13b.dim() == 2, "x [n, D] and w13b [rows, D] expected");
  TORCH_CHECK(w2b.dim() == 3 && x.size(1) == w13b.size(1) && x.size(1) == w2b.size(1), "hidden size mismatch");
  TORCH_CHECK(w13b.size(0) == 2 * w2b.size(0) * w2b.size(2), "w13b rows must be twice the blocks' rows");
  TORCH_CHECK(x.size(0) >= 1, "at least one token");
}

#ifndef FIDDLER_NO_AMX
torch::Tensor expert_amx(torch::Tensor x, torch::Tensor w13b, torch::Tensor w2b) {
  check_expert_args(x, w13b, w2b);
  TORCH_CHECK(amx_permitted(), "the kernel may not use AMX state here (arch_prctl refused)");
  const int64_t n = x.size(0), d = x.size(1);
  auto y = torch::empty({n, d}, x.options().dtype(torch::kFloat32));
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* w13p = reinterpret_cast<const uint16_t*>(w13b.data_ptr<at::BFloat16>());
  const auto* w2p = reinterpret_cast<const uint16_t*>(w2b.data_ptr<at::BFloat16>());
  for (int64_t t0 = 0; t0 < n; t0 += kAmxPassTokens) {  // more tokens: another pass over the weights
    const int tokens = static_cast<int>(std::min<int64_t>(kAmxPassTokens, n - t0));
    amx_pass(xp + t0 * d, tokens, d, w13p, w13b.size(0), w2p, w2b.size(0), w2b.size(2), y.data_ptr<float>() + t0 * d);
  }
  return y.to(torch::kBFloat16);
}
#endif  // FIDDLER_NO_AMX

torch::Tensor expert(torch::Tensor x, torch::Tensor w13b, torch::Tensor w2b) {
  check_expert_args(x, w13b, w2b);
  TORCH_CHECK(x.size(0) <= kMaxTokens, "1 to ", kMaxTokens, " tokens");
  return dispatch(x, w13b, w2b);
}

// Reads every byte of `buffer` once with 512-bit loads on torch's threads: the machine's memory
// read bandwidth as a kernel that does nothing else sees it. Returns a value that depends on
// every byte so the reads cannot be left out.
int64_t read_all(const torch::Tensor& buffer) {
  TORCH_CHECK(buffer.is_contiguous(), "contiguous buffer expected");
  const auto* bytes = static_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t vectors = buffer.nbytes() / 64;
  std::vector<int64_t> partial(at::get_num_threads() * 8, 0);  // a cache line apart per thread
  at::parallel_for(0, vectors, 4096, [&](int64_t v0, int64_t v1) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t v = v0; v < v1; ++v) acc = _mm512_xor_si512(acc, _mm512_loadu_si512(bytes + v * 64));
    partial[at::get_thread_num() * 8] ^= _mm512_reduce_or_epi64(acc);
  });
  int64_t result = 0;
  for (int64_t value : partial) result ^= value;
  for (int64_t b = vectors * 64; b < static_cast<int64_t>(buffer.nbytes()); ++b) result ^= bytes[b];  // the tail
  return result;
}

}  // namespace

// The computing entry points release the GIL: the engine runs CPU experts on a worker thread
// while the main thread issues the GPU's copies and kernels, which a held GIL would stall for
// the whole expert (and calibration would measure copies as many times slower beside the CPU).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.def("expert", &expert, "one expert (split layout, bf16) for up to 16 tokens, AVX512-BF16", release_gil());
#ifndef FIDDLER_NO_AMX
  m.def("expert_amx", &expert_amx, "one expert (split layout, bf16) for any token count, AMX tiles", release_gil());
  m.def("amx_permitted", &amx_permitted, "whether this process may use AMX state");
  m.attr("has_amx") = true;
  m.attr("amx_pass_tokens") = kAmxPassTokens;
#else
  m.attr("has_amx") = false;
#endif
  m.def("read_all", &read_all, "read a buffer once (memory read bandwidth)", release_gil());
  m.attr("max_tokens") = kMaxTokens;
}
