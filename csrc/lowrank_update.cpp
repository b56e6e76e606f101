// Multi-layer low-rank update on CPU: W_l += scale * L_l R_l^T for every layer, in place.
//
// The C++ twin of clipforget_fast.reference.lowrank_update_ for weights in fp32/fp16/bf16:
// fp32 arithmetic, rounded once to the weight's dtype, and no full-size fp32 temporary (the torch
// fallback bounds its temporary to ROW_CHUNK rows; here the only scratch is a few KB per thread).
//
// Blocking, per layer (m x n weight, rank k), a register-blocked outer-product sum:
//   Rt = R^T, contiguous [k, n] fp32 (small: k * n floats, stays in L2)
//   parallel over blocks of kRows rows:
//     for each column block c0 of kCols columns:
//       t[q][c] = sum_j L[i0+q, j] * Rt[j, c0+c]       (each Rt load feeds kRows FMAs)
//       W[i0+q, c0+c] = round(float(W[i0+q, c0+c]) + scale * t[q][c])
// t is kRows x kCols floats, held in vector registers across the j loop.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 4;     // rows sharing each load of Rt
constexpr int64_t kCols = 64;    // columns per block: kRows * kCols floats = 16 AVX-512 registers

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return nan ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static void load(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
  static void store(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
};

template <>
struct Convert<at::BFloat16> {
  static void load(const at::BFloat16* src, float* dst, int64_t n) {
    const auto* s = reinterpret_cast<const uint16_t*>(src);
    for (int64_t c = 0; c < n; ++c) dst[c] = bf16_to_float(s[c]);
  }
  static void store(const float* src, at::BFloat16* dst, int64_t n) {
    auto* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t c = 0; c < n; ++c) d[c] = float_to_bf16(src[c]);
  }
};

template <>
struct Convert<at::Half> {
  static void load(const at::Half* src, float* dst, int64_t n) {
    int64_t c = 0;
#if defined(__F16C__)
    for (; c + 8 <= n; c += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
      _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(h));
    }
#endif
    for (; c < n; ++c) dst[c] = static_cast<float>(src[c]);
  }
  static void store(const float* src, at::Half* dst, int64_t n) {
    int64_t c = 0;
#if defined(__F16C__)
    for (; c + 8 <= n; c += 8) {
      __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + c), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), h);
    }
#endif
    for (; c < n; ++c) dst[c] = static_cast<at::Half>(src[c]);
  }
};

// acc[q][c] = sum_j a[q][j] * r[j * ldr + c] for a full kRows x kCols block.
inline void block_product(const float* const* a, const float* r, int64_t ldr, int64_t k,
                          float (&acc)[kRows][kCols]) {
#if defined(__AVX512F__)
  static_assert(kRows == 4 && kCols == 64, "the AVX-512 block is 4 rows x 4 vectors of 16");
  __m512 t[4][4];
  for (int q = 0; q < 4; ++q)
    for (int v = 0; v < 4; ++v) t[q][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; ++j) {
    const float* rj = r + j * ldr;
    const __m512 r0 = _mm512_loadu_ps(rj), r1 = _mm512_loadu_ps(rj + 16),
                 r2 = _mm512_loadu_ps(rj + 32), r3 = _mm512_loadu_ps(rj + 48);
    for (int q = 0; q < 4; ++q) {
      const __m512 aq = _mm512_set1_ps(a[q][j]);
      t[q][0] = _mm512_fmadd_ps(aq, r0, t[q][0]);
      t[q][1] = _mm512_fmadd_ps(aq, r1, t[q][1]);
      t[q][2] = _mm512_fmadd_ps(aq, r2, t[q][2]);
      t[q][3] = _mm512_fmadd_ps(aq, r3, t[q][3]);
    }
  }
  for (int q = 0; q < 4; ++q)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(acc[q] + 16 * v, t[q][v]);
#else
  for (int64_t j = 0; j < k; ++j)
    for (int64_t q = 0; q < kRows; ++q)
      for (int64_t c = 0; c < kCols; ++c) acc[q][c] += a[q][j] * r[j * ldr + c];
#endif
}

template <typename T>
void update_layer(at::Tensor& w, const at::Tensor& left, const at::Tensor& rt, float scale) {
  const int64_t m = w.size(0), n = w.size(1), k = left.size(1);
  const int64_t ldw = m > 1 ? w.stride(0) : n;
  T* wp = w.data_ptr<T>();
  const float* lp = left.data_ptr<float>();   // [m, k]
  const float* rp = rt.data_ptr<float>();     // [k, n]
  const std::vector<float> zeros(k, 0.0f);    // stands in for the missing rows of a last block
  const int64_t blocks = (m + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float row[kCols];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kRows;
      const int64_t rows = std::min(kRows, m - i0);
      const float* a[kRows];
      for (int64_t q = 0; q < kRows; ++q) a[q] = q < rows ? lp + (i0 + q) * k : zeros.data();
      for (int64_t c0 = 0; c0 < n; c0 += kCols) {
        const int64_t cols = std::min(kCols, n - c0);
        // Accumulators: kRows x kCols floats, few enough to live in vector registers.
        float acc[kRows][kCols] = {};
        if (cols == kCols) {
          block_product(a, rp + c0, n, k, acc);
        } else {
          for (int64_t j = 0; j < k; ++j) {
            const float* r = rp + j * n + c0;
            for (int64_t q = 0; q < kRows; ++q)
              for (int64_t c = 0; c < cols; ++c) acc[q][c] += a[q][j] * r[c];
          }
        }
        for (int64_t q = 0; q < rows; ++q) {
          T* wrow = wp + (i0 + q) * ldw + c0;
          Convert<T>::load(wrow, row, cols);
          for (int64_t c = 0; c < cols; ++c) row[c] += scale * acc[q][c];
          Convert<T>::store(row, wrow, cols);
        }
      }
    }
  });
}

void lowrank_update_(std::vector<at::Tensor> weights, std::vector<at::Tensor> lefts,
                     std::vector<at::Tensor> rights, double scale) {
  TORCH_CHECK(weights.size() == lefts.size() && weights.size() == rights.size(),
              "weights, lefts, rights must have the same length");
  for (size_t l = 0; l < weights.size(); ++l) {
    at::Tensor& w = weights[l];
    TORCH_CHECK(w.device().is_cpu(), "weights[", l, "] must be a CPU tensor");
    TORCH_CHECK(w.dim() == 2 && lefts[l].dim() == 2 && rights[l].dim() == 2,
                "layer ", l, ": weights, lefts and rights must be 2-D");
    TORCH_CHECK(w.size(1) <= 1 || w.stride(1) == 1,   // a single row [1, n] too: read as contiguous
                "weights[", l, "] must have contiguous rows");
    TORCH_CHECK(lefts[l].size(0) == w.size(0) && rights[l].size(0) == w.size(1) &&
                    lefts[l].size(1) == rights[l].size(1),
                "layer ", l, ": need L [m, k] and R [n, k] for W [m, n]");
    if (w.numel() == 0 || lefts[l].size(1) == 0) continue;
    const at::Tensor left = lefts[l].to(at::kCPU, at::kFloat).contiguous();
    const at::Tensor rt = rights[l].to(at::kCPU, at::kFloat).t().contiguous();
    const float s = static_cast<float>(scale);
    switch (w.scalar_type()) {
      case at::kFloat: update_layer<float>(w, left, rt, s); break;
      case at::kHalf: update_layer<at::Half>(w, left, rt, s); break;
      case at::kBFloat16: update_layer<at::BFloat16>(w, left, rt, s); break;
      default: TORCH_CHECK(false, "weights[", l, "] has dtype ", w.scalar_type(),
                           "; expected float32, float16 or bfloat16");
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_update_", &lowrank_update_, "W_l += scale * L_l R_l^T in place (CPU)",
        pybind11::arg("weights"), pybind11::arg("lefts"), pybind11::arg("rights"),
        pybind11::arg("scale") = 1.0, pybind11::call_guard<pybind11::gil_scoped_release>());
}
