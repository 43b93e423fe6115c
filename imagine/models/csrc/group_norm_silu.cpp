// GroupNorm (Wu & He 2018, eq. 1-2: each sample's channels split into groups, every group normalised by
// its own mean and variance over its channels and pixels, then a per-channel scale and shift), optionally
// followed by SiLU (x * sigmoid(x), Elfwing et al. 2018), for bfloat16 channels-last maps [N, H, W, C] on
// CPUs with AVX512-BF16.
//
// Why: torch's group_norm on a bf16 channels-last map runs at about 0.7 G values/s on one Zen 4 core (the
// VAE decoder's 512-channel 256x256 map: 46 ms), and SiLU is a second pass over the map; together they
// took 7.5% of the fast VAE decode. Here: one pass for the statistics, one that normalises, applies
// SiLU and stores.
//
// Numerics. The statistics are float32 sums of x - K_c over at most 64 pixels, flushed into float64; K_c
// is the channel's value at the first pixel, so that even a mean far from 0 next to the spread loses
// nothing in E[x^2] - E[x]^2 (with bf16 inputs the float64 flushes alone measured enough for a mean 100x
// the spread; the shift is a safeguard). The group's mean and biased variance (torch's) are in float64. The output
// y = x * a_c + b_c with a_c = gamma_c / sqrt(var_g + eps), b_c = beta_c - mean_g a_c, in float32; SiLU
// as y / (1 + 2^(-y log2 e)) with 2^f by a degree-5 polynomial (2.3e-7 relative), rounded once to bf16.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using bf16 = uint16_t;

inline __mmask16 first(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

inline __m512 load_bf16(const bf16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

inline void store_bf16(bf16* p, __m512 v, __mmask16 k) {
  __m256bh h = _mm512_cvtneps_pbh(v);  // round to nearest even, as torch's casts
  _mm256_mask_storeu_epi16(p, k, reinterpret_cast<__m256i&>(h));
}

inline __m512 silu(__m512 y) {
  // e^-y = 2^t, t = -y log2(e) clamped to [-126, 126] (beyond, SiLU is y or 0 to float32's precision)
  __m512 t = _mm512_mul_ps(y, _mm512_set1_ps(-1.4426950408889634f));
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3276468962430954e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675540961325169e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713464617729e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n)));
}

std::vector<float> per_channel(const c10::optional<at::Tensor>& t, int64_t C, float fill, const char* name) {
  std::vector<float> out(C, fill);
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "group_norm_silu: ", name, " must have ", C, " values");
    auto f = t->to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + C, out.begin());
  }
  return out;
}

// Into `out` (x itself for the in-place op: each pixel's row is read before it is written).
void group_norm_silu_into(const at::Tensor& x, int64_t groups, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, double eps, bool apply_silu, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "group_norm_silu: x must be a 4-D bfloat16 CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "group_norm_silu: x must be channels-last");
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  TORCH_CHECK(groups > 0 && C % groups == 0, "group_norm_silu: ", C, " channels do not split into ", groups, " groups");
  TORCH_CHECK(P > 0, "group_norm_silu: empty map");
  const std::vector<float> gamma = per_channel(weight, C, 1.0f, "weight"), beta = per_channel(bias, C, 0.0f, "bias");
  const bf16* X = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
  bf16* Y = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  const int64_t CB = (C + 15) / 16;

  // Pass 1: per (sample, chunk of pixels) the channels' sums of x - K and (x - K)^2.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), P / 256));
  std::vector<float> shift(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) shift[n * C + c] = static_cast<float>(x.data_ptr<at::BFloat16>()[n * P * C + c]);
  std::vector<double> s1(N * chunks * C, 0.0), s2(N * chunks * C, 0.0);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a1(CB * 16), a2(CB * 16);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, k = task % chunks;
      const int64_t p0 = P * k / chunks, p1 = P * (k + 1) / chunks;
      const float* K = shift.data() + n * C;
      double* d1 = s1.data() + task * C;
      double* d2 = s2.data() + task * C;
      for (int64_t q0 = p0; q0 < p1; q0 += 64) {  // float32 sums over at most 64 pixels, then float64
        std::fill(a1.begin(), a1.end(), 0.0f);
        std::fill(a2.begin(), a2.end(), 0.0f);
        for (int64_t p = q0; p < std::min(p1, q0 + 64); ++p) {
          const bf16* row = X + (n * P + p) * C;
          for (int64_t cb = 0; cb < CB; ++cb) {
            const __mmask16 m = first(C - cb * 16);
            const __m512 v = _mm512_sub_ps(load_bf16(row + cb * 16, m), _mm512_maskz_loadu_ps(m, K + cb * 16));
            _mm512_storeu_ps(a1.data() + cb * 16, _mm512_add_ps(_mm512_loadu_ps(a1.data() + cb * 16), v));
            _mm512_storeu_ps(a2.data() + cb * 16, _mm512_fmadd_ps(v, v, _mm512_loadu_ps(a2.data() + cb * 16)));
          }
        }
        for (int64_t c = 0; c < C; ++c) d1[c] += a1[c], d2[c] += a2[c];
      }
    }
  });

  // The groups' statistics (float64), folded into a per-(sample, channel) scale a and shift b.
  const int64_t cpg = C / groups;
  std::vector<float> a(N * C), b(N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0.0, sumsq = 0.0;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        double t1 = 0.0, t2 = 0.0;
        for (int64_t k = 0; k < chunks; ++k) t1 += s1[(n * chunks + k) * C + c], t2 += s2[(n * chunks + k) * C + c];
        const double K = shift[n * C + c];
        sum += t1 + P * K;  // sum of x
        sumsq += t2 + 2.0 * K * t1 + P * K * K;  // sum of x^2
      }
      const double count = static_cast<double>(P) * cpg, mean = sum / count;
      const double var = std::max(sumsq / count - mean * mean, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        a[n * C + c] = static_cast<float>(gamma[c] * rstd);
        b[n * C + c] = static_cast<float>(beta[c] - mean * gamma[c] * rstd);
      }
    }
  }

  // Pass 2: y = x a + b (then SiLU), rounded once to bf16.
  at::parallel_for(0, N * P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / P;
      const bf16* row = X + i * C;
      bf16* dst = Y + i * C;
      for (int64_t cb = 0; cb < CB; ++cb) {
        const __mmask16 m = first(C - cb * 16);
        __m512 y = _mm512_fmadd_ps(load_bf16(row + cb * 16, m), _mm512_maskz_loadu_ps(m, a.data() + n * C + cb * 16),
                                   _mm512_maskz_loadu_ps(m, b.data() + n * C + cb * 16));
        store_bf16(dst + cb * 16, apply_silu ? silu(y) : y, m);
      }
    }
  });
}

at::Tensor group_norm_silu(const at::Tensor& x, int64_t groups, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, double eps, bool apply_silu) {
  at::Tensor out = at::empty_like(x);  // channels-last, as x
  group_norm_silu_into(x, groups, weight, bias, eps, apply_silu, out);
  return out;
}

at::Tensor& group_norm_silu_(at::Tensor& x, int64_t groups, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, double eps, bool apply_silu) {
  group_norm_silu_into(x, groups, weight, bias, eps, apply_silu, x);
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(imagine, m) {
  m.def("group_norm_silu(Tensor x, int groups, Tensor? weight, Tensor? bias, float eps, bool silu) -> Tensor");
  m.def("group_norm_silu_(Tensor(a!) x, int groups, Tensor? weight, Tensor? bias, float eps, bool silu) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(imagine, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu);
  m.impl("group_norm_silu_", &group_norm_silu_);
}
