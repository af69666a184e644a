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
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

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

  std::vector<float> y1(static_cast<size_t>(N) * rows);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    dot_rows<N>(xp, d, w13p, 1, 0, d, y1.data(), rows, r0, r1);
  });

  std::vector<uint16_t> h(static_cast<size_t>(N) * f);
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
  at::parallel_for(0, d, kRowGrain, [&](int64_t r0, int64_t r1) {
    dot_rows<N>(h.data(), f, w2p, blocks, d * g, g, yp, d, r0, r1);
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

torch::Tensor expert(torch::Tensor x, torch::Tensor w13b, torch::Tensor w2b) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w13b.scalar_type() == torch::kBFloat16 &&
                  w2b.scalar_type() == torch::kBFloat16,
              "bf16 tensors expected");
  TORCH_CHECK(x.is_contiguous() && w13b.is_contiguous() && w2b.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(w2b.dim() == 3 && x.size(1) == w13b.size(1) && x.size(1) == w2b.size(1), "hidden size mismatch");
  TORCH_CHECK(w13b.size(0) == 2 * w2b.size(0) * w2b.size(2), "w13b rows must be twice the blocks' rows");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxTokens, "1 to ", kMaxTokens, " tokens");
  return dispatch(x, w13b, w2b);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("expert", &expert, "one expert (split layout, bf16) for up to 16 tokens");
  m.attr("max_tokens") = kMaxTokens;
}
