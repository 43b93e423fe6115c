// softmax(Q K^T * scale) V for bfloat16 q, k, v on CPUs with AVX512-BF16 dot products (Zen 4, Zen 5,
// Cooper Lake), one query block at a time (Vaswani et al. 2017 eq. 1; LDM eq. 3).
//
// Why not torch's SDPA here: on such CPUs without AMX its flash kernel computes the two products at
// about float32's speed (measured on a Zen 4: 0.66 s for SD 1.5's 4096-token self-attention at batch 2,
// against 0.65 s in float32, while oneDNN's bf16 matrix products run at about 210 GFLOP/s on one core).
// Here both products are VDPBF16PS micro-kernels: bf16 pairs multiplied and summed into float32 lanes.
//
// Numerics are SDPA's: scores S = scale * q.k summed in float32, the row's max subtracted, exp in
// float32 (as 2^x of the scores scaled by log2(e): a rounding and a cubic, 7.5e-5 relative, far under
// bf16's rounding of P; fewer operations than e^x's two-part reduction), the weights P rounded to bf16
// for the second product (as SDPA's flash kernel does), P V summed in float32 and divided by the float32 row sum, the
// output rounded to bf16. A query block of QB rows holds its whole row of scores (QB x M floats), so
// the softmax is the plain two-pass one, not the online rescaling; the row's max is taken as the
// scores are stored.
//
// Layouts. q, k, v are [B, H, N or M, D] views with a unit last stride (the heads split from a
// [B, N, H*D] projection); the output is [B, N, H*D] contiguous (heads already merged). K is packed
// per (b, h) for the first product as [M/16][D/2][16 keys][2 dims] and V for the second as
// [M/2][D/16][16 dims][2 keys]: VDPBF16PS multiplies lane l's pair of bf16 by a broadcast pair.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;

inline __m512 exp2_ps(__m512 x) {
  // 2^x = 2^n 2^f with n = round(x), |f| <= 1/2, and 2^f by a degree-3 polynomial fitted for least relative
  // error on [-1/2, 1/2] (7.5e-5 at most, 26x under the 2^-9 at which P is rounded to bf16 for the second
  // product; Cephes' degree-6 exp2f, 1 ulp, measured 269.5 against 264.7 ms on SD 1.5's largest
  // attention, one Zen 4 thread, for a relative error of the output of 2.2870e-3 against 2.2885e-3).
  // For x <= -126 (weights under 2^-126, which the bf16 products flush to zero anyway) 2^-126 stands in;
  // x = -inf (a row whose scores are all -inf) cannot occur: the scores are finite products.
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.05517164617776871f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2426111251115799f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6932609677314758f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999280571937561f));
  return _mm512_scalef_ps(p, n);
}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

inline void store_bf16(bf16* dst, __m512 v, __mmask16 mask) {
  __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16(dst, mask, reinterpret_cast<__m256i&>(h));
}

inline __mmask16 head_mask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// S[r][j] = scale * sum_p qp[r][p] . Kp[j][p] for RB rows and 32 keys (two 16-key blocks) at a time,
// and each row's maximum over its valid keys (`tail`: the valid lanes of the last 16-key block) into mx.
template <int RB>
void scores(const int32_t* qp, int64_t P, const bf16* kp, int64_t MB, float scale, __mmask16 tail, float* s,
            int64_t ldS, float* mx) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 rmax[RB];
  for (int r = 0; r < RB; ++r) rmax[r] = _mm512_set1_ps(-INFINITY);
  int64_t jb = 0;
  for (; jb + 2 < MB; jb += 2) {  // whole pairs of blocks before the last block
    __m512 acc[RB][2];
    for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const bf16* k0 = kp + jb * P * 32;
    const bf16* k1 = k0 + P * 32;
    for (int64_t p = 0; p < P; ++p) {
      const __m512bh b0 = as_bh(_mm512_loadu_si512(k0 + p * 32));
      const __m512bh b1 = as_bh(_mm512_loadu_si512(k1 + p * 32));
      for (int r = 0; r < RB; ++r) {
        const __m512bh a = as_bh(_mm512_set1_epi32(qp[r * P + p]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      }
    }
    for (int r = 0; r < RB; ++r) {
      const __m512 s0 = _mm512_mul_ps(acc[r][0], sc), s1 = _mm512_mul_ps(acc[r][1], sc);
      _mm512_storeu_ps(s + r * ldS + jb * 16, s0);
      _mm512_storeu_ps(s + r * ldS + jb * 16 + 16, s1);
      rmax[r] = _mm512_max_ps(rmax[r], _mm512_max_ps(s0, s1));
    }
  }
  for (; jb < MB; ++jb) {
    __m512 acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
    const bf16* k0 = kp + jb * P * 32;
    for (int64_t p = 0; p < P; ++p) {
      const __m512bh b0 = as_bh(_mm512_loadu_si512(k0 + p * 32));
      for (int r = 0; r < RB; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], as_bh(_mm512_set1_epi32(qp[r * P + p])), b0);
    }
    const __mmask16 valid = jb == MB - 1 ? tail : static_cast<__mmask16>(0xFFFF);
    for (int r = 0; r < RB; ++r) {
      const __m512 s0 = _mm512_mul_ps(acc[r], sc);
      _mm512_storeu_ps(s + r * ldS + jb * 16, s0);
      rmax[r] = _mm512_mask_max_ps(rmax[r], valid, rmax[r], s0);
    }
  }
  for (int r = 0; r < RB; ++r) mx[r] = _mm512_reduce_max_ps(rmax[r]);
}

// out[r][c] = (sum_jj pp[r][jj] . Vp[jj][c]) * inv[r] for RB rows and NC 16-wide blocks of output dims
// starting at block cb0 (CB blocks in all), D valid dims.
template <int RB, int NC>
void weighted_sum(const int32_t* pp, int64_t ldP, int64_t M2, const bf16* vp, int64_t CB, int64_t cb0,
                  const float* inv, bf16* out, int64_t ldO, int64_t D) {
  __m512 acc[RB][NC];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t jj = 0; jj < M2; ++jj) {
    const bf16* v = vp + (jj * CB + cb0) * 32;
    __m512bh b[NC];
    for (int c = 0; c < NC; ++c) b[c] = as_bh(_mm512_loadu_si512(v + c * 32));
    for (int r = 0; r < RB; ++r) {
      const __m512bh a = as_bh(_mm512_set1_epi32(pp[r * ldP + jj]));
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    const __m512 f = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < NC; ++c) {
      const int64_t d0 = (cb0 + c) * 16;
      store_bf16(out + r * ldO + d0, _mm512_mul_ps(acc[r][c], f), head_mask(D - d0));
    }
  }
}

template <int RB>
void weighted_sum_all(const int32_t* pp, int64_t ldP, int64_t M2, const bf16* vp, int64_t CB,
                      const float* inv, bf16* out, int64_t ldO, int64_t D) {
  int64_t cb = 0;
  for (; cb + 4 <= CB; cb += 4) weighted_sum<RB, 4>(pp, ldP, M2, vp, CB, cb, inv, out, ldO, D);
  switch (CB - cb) {
    case 3: weighted_sum<RB, 3>(pp, ldP, M2, vp, CB, cb, inv, out, ldO, D); break;
    case 2: weighted_sum<RB, 2>(pp, ldP, M2, vp, CB, cb, inv, out, ldO, D); break;
    case 1: weighted_sum<RB, 1>(pp, ldP, M2, vp, CB, cb, inv, out, ldO, D); break;
    default: break;
  }
}

constexpr int RB = 4;  // query rows per micro-kernel call

at::Tensor attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_bf16: q, k, v must be [B, H, N, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "attention_bf16: q, k, v must be bfloat16");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attention_bf16: CPU tensors only");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H && v.size(2) == M &&
              k.size(3) == D && v.size(3) == D, "attention_bf16: shapes of q, k, v do not match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention_bf16: the last dim must be contiguous");
  TORCH_CHECK(M > 0 && D > 0, "attention_bf16: empty keys or heads");

  const int64_t P = (D + 1) / 2, MB = (M + 15) / 16, Mp = MB * 16, M2 = Mp / 2, CB = (D + 15) / 16;
  auto out = at::empty({B, N, H * D}, q.options());
  // K and V packed per (b, h) for the two products (zeros beyond M and D).
  auto kpack = at::empty({B * H, MB * P * 32}, q.options());
  auto vpack = at::empty({B * H, M2 * CB * 32}, q.options());
  const bf16* Q = reinterpret_cast<const bf16*>(q.data_ptr<at::BFloat16>());
  const bf16* K = reinterpret_cast<const bf16*>(k.data_ptr<at::BFloat16>());
  const bf16* V = reinterpret_cast<const bf16*>(v.data_ptr<at::BFloat16>());
  bf16* KP = reinterpret_cast<bf16*>(kpack.data_ptr<at::BFloat16>());
  bf16* VP = reinterpret_cast<bf16*>(vpack.data_ptr<at::BFloat16>());
  bf16* O = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const bf16* kk = K + b * k.stride(0) + h * k.stride(1);
      const bf16* vv = V + b * v.stride(0) + h * v.stride(1);
      bf16* kp = KP + bh * MB * P * 32;
      bf16* vp = VP + bh * M2 * CB * 32;
      // zeros beyond M and D, written here in this thread's cache rather than by a fill over all heads
      std::memset(kp, 0, MB * P * 32 * sizeof(bf16));
      std::memset(vp, 0, M2 * CB * 32 * sizeof(bf16));
      for (int64_t j = 0; j < M; ++j) {
        const bf16* row = kk + j * k.stride(2);
        bf16* dst = kp + (j / 16) * P * 32 + (j % 16) * 2;
        for (int64_t d = 0; d < D; ++d) dst[(d / 2) * 32 + (d % 2)] = row[d];
      }
      for (int64_t j = 0; j < M; ++j) {
        const bf16* row = vv + j * v.stride(2);
        bf16* dst = vp + (j / 2) * CB * 32 + (j % 2);
        for (int64_t d = 0; d < D; ++d) dst[(d / 16) * 32 + (d % 16) * 2] = row[d];
      }
    }
  });

  // Query blocks: QB rows of scores (QB x Mp floats) kept in the core's L2 (256 KB), at least RB rows.
  const int64_t QB = std::max<int64_t>(1, std::min<int64_t>(64, 65536 / Mp) / RB) * RB;
  const int64_t NB = (N + QB - 1) / QB;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H * NB, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> qp(QB * P);
    std::vector<float> s(QB * Mp);
    std::vector<bf16> pbuf(QB * Mp);
    std::vector<float> inv(QB);
    std::vector<float> mx(QB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / NB, i0 = (task % NB) * QB, rows = std::min(QB, N - i0);
      const int64_t b = bh / H, h = bh % H;
      const bf16* kp = KP + bh * MB * P * 32;
      const bf16* vp = VP + bh * M2 * CB * 32;
      // the block's query pairs, zero-padded to whole pairs and to RB rows
      std::fill(qp.begin(), qp.end(), 0);
      for (int64_t r = 0; r < rows; ++r) {
        const bf16* row = Q + b * q.stride(0) + h * q.stride(1) + (i0 + r) * q.stride(2);
        std::memcpy(reinterpret_cast<bf16*>(qp.data() + r * P), row, D * sizeof(bf16));
      }
      const int64_t rows_r = (rows + RB - 1) / RB * RB;
      const int64_t full = M / 16;
      const __mmask16 tail = head_mask(M - (MB - 1) * 16);
      // Scores in base 2: S log2(e), so that exp(S - max) = 2^(S log2 e - max log2 e).
      for (int64_t r = 0; r < rows_r; r += RB)
        scores<RB>(qp.data() + r * P, P, kp, MB, sc * 1.4426950408889634f, tail, s.data() + r * Mp, Mp, mx.data() + r);
      // softmax over the M valid keys: P = exp(S - max) in bf16 (zero beyond M), 1 / sum in float32
      for (int64_t r = 0; r < rows_r; ++r) {
        const float* sr = s.data() + r * Mp;
        bf16* pr = pbuf.data() + r * Mp;
        const __m512 m = _mm512_set1_ps(mx[r]);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < full; ++j) {
          const __m512 e = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(sr + j * 16), m));
          sum = _mm512_add_ps(sum, e);
          store_bf16(pr + j * 16, e, 0xFFFF);
        }
        if (full < MB) {
          const __m512 e = _mm512_maskz_mov_ps(tail, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(sr + full * 16), m)));
          sum = _mm512_add_ps(sum, e);
          store_bf16(pr + full * 16, e, 0xFFFF);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
      }
      bf16* ob = O + (b * N + i0) * H * D + h * D;
      const int32_t* pp = reinterpret_cast<const int32_t*>(pbuf.data());
      int64_t r = 0;
      for (; r + RB <= rows; r += RB)
        weighted_sum_all<RB>(pp + r * (Mp / 2), Mp / 2, M2, vp, CB, inv.data() + r, ob + r * H * D, H * D, D);
      for (; r < rows; ++r)
        weighted_sum_all<1>(pp + r * (Mp / 2), Mp / 2, M2, vp, CB, inv.data() + r, ob + r * H * D, H * D, D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(imagine, m) {
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(imagine, CPU, m) {
  m.impl("attention_bf16", &attention_bf16);
}
