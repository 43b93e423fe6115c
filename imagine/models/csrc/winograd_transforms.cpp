// Winograd's input and output transforms for F(m x m, 3x3), m = 2, 4, 6 (Lavin & Gray 2016, eq. 10):
// V = B^T d B over the (m+2)x(m+2) input tiles d, and Y = A^T M A (+ bias) over the product tiles M,
// for the matrix products of imagine/models/winograd.py (their eq. 12) in between.
//
// Why: done with torch ops, each transform is a padded copy, a gather copy of the overlapping tiles
// and two (m+2)-wide matrix products over all tiles and channels, then a gather of the output tiles:
// five passes over memory and a dozen small ops per band. Here each transform is one pass: a tile's
// (m+2)^2 values of 16 channels are loaded into registers (zero outside the map, which is the
// convolution's padding), transformed along both axes there, and stored once. The transforms'
// weights are compile-time constants, so the zero weights cost nothing and the +-1 weights are
// additions.
//
// Layouts. x is [B, C, H, W] in channels-last memory (strides C*H*W, 1, W*C, C), bfloat16 or float32;
// V is [(m+2)^2, T, C] float32 with T = B * rows * tw the tiles of the band of tile rows [r0, r1),
// numbered (b, tile row, tile column); the products M are [(m+2)^2, T, C_out] float32; the output
// [B, C_out, H, W] channels-last, bfloat16 or float32, rounded to nearest even like torch's casts.
// Arithmetic is float32 throughout.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstdint>

namespace {

template <int M> struct Tf;
template <> struct Tf<2> {
  static constexpr int N = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};
template <> struct Tf<4> {
  static constexpr int N = 6;
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};
template <> struct Tf<6> {
  static constexpr int N = 8;
  static constexpr float BT[8][8] = {
      {-1, 0, 21.f / 4, 0, -21.f / 4, 0, 1, 0},           {0, 1, 1, -17.f / 4, -17.f / 4, 1, 1, 0},
      {0, -1, 1, 17.f / 4, -17.f / 4, -1, 1, 0},          {0, 1.f / 2, 1.f / 4, -5.f / 2, -5.f / 4, 2, 1, 0},
      {0, -1.f / 2, 1.f / 4, 5.f / 2, -5.f / 4, -2, 1, 0}, {0, 2, 4, -5.f / 2, -5, 1.f / 2, 1, 0},
      {0, -2, 4, 5.f / 2, -5, -1.f / 2, 1, 0},            {0, -1, 0, 21.f / 4, 0, -21.f / 4, 0, 1}};
  static constexpr float AT[6][8] = {{1, 1, 1, 1, 1, 1, 1, 0},
                                     {0, 1, -1, 2, -2, 1.f / 2, -1.f / 2, 0},
                                     {0, 1, 1, 4, 4, 1.f / 4, 1.f / 4, 0},
                                     {0, 1, -1, 8, -8, 1.f / 8, -1.f / 8, 0},
                                     {0, 1, 1, 16, 16, 1.f / 16, 1.f / 16, 0},
                                     {0, 1, -1, 32, -32, 1.f / 32, -1.f / 32, 1}};
};

// acc + c * v for a compile-time weight c: nothing for 0, an addition for +-1.
template <typename F>
inline __m512 axpy(__m512 acc, float c, F v) {
  if (c == 0.0f) return acc;
  if (c == 1.0f) return _mm512_add_ps(acc, v());
  if (c == -1.0f) return _mm512_sub_ps(acc, v());
  return _mm512_fmadd_ps(_mm512_set1_ps(c), v(), acc);
}

// init + sum_l w[l] * value(l) over one axis of a tile, for a row w of B^T or A^T (compile-time weights
// once unrolled, so axpy drops the zeros).
template <int N, typename F>
inline __m512 combine(const float (&w)[N], F value, __m512 init = _mm512_setzero_ps()) {
#pragma GCC unroll 8
  for (int l = 0; l < N; ++l) init = axpy(init, w[l], [&] { return value(l); });
  return init;
}

inline __m512 load(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load(const at::BFloat16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline void store(at::BFloat16* p, __m512 v, __mmask16 k) {
  // round to nearest even, NaN to a quiet NaN: c10::BFloat16's rounding, in integer lanes
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(r));
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// V = B^T d B for the band's tiles [t0, t1), all channels.
template <int M, typename T>
void input_tiles(const T* x, int64_t C, int64_t H, int64_t W, int64_t r0, int64_t rows, int64_t tw,
                 float* v, int64_t T_, int64_t t0, int64_t t1) {
  using Tr = Tf<M>;
  constexpr int N = Tr::N;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (rows * tw), ty = r0 + (t / tw) % rows, tx = t % tw;
    const int64_t y0 = ty * M - 1, x0 = tx * M - 1;  // the tile's top-left input pixel (-1: the padding)
    bool inside[N][N];
    const T* src[N][N];
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) {
        const int64_t y = y0 + i, xx = x0 + j;
        inside[i][j] = y >= 0 && y < H && xx >= 0 && xx < W;
        src[i][j] = x + ((b * H + y) * W + xx) * C;
      }
    float* dst = v + t * C;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 k = lanes(C - c);
      __m512 d[N][N], u[N][N];
#pragma GCC unroll 8
      for (int i = 0; i < N; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < N; ++j) d[i][j] = inside[i][j] ? load(src[i][j] + c, k) : _mm512_setzero_ps();
      // u = B^T d (along the rows), then V = u B (along the columns)
#pragma GCC unroll 8
      for (int i = 0; i < N; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < N; ++j) u[i][j] = combine(Tr::BT[i], [&](int l) { return d[l][j]; });
#pragma GCC unroll 8
      for (int i = 0; i < N; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < N; ++j)
          store(dst + (i * N + j) * T_ * C + c, combine(Tr::BT[j], [&](int l) { return u[i][l]; }), k);
    }
  }
}

// Y = A^T M A + bias for the band's tiles [t0, t1), written into the output map (what lies past the
// map's edge, the padding to whole tiles, is dropped).
template <int M, typename T>
void output_tiles(const float* p, int64_t Co, const float* bias, int64_t H, int64_t W, int64_t r0, int64_t rows,
                  int64_t tw, T* out, int64_t T_, int64_t t0, int64_t t1) {
  using Tr = Tf<M>;
  constexpr int N = Tr::N;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (rows * tw), ty = r0 + (t / tw) % rows, tx = t % tw;
    const int64_t y0 = ty * M, x0 = tx * M;
    const float* src = p + t * Co;
    for (int64_t c = 0; c < Co; c += 16) {
      const __mmask16 k = lanes(Co - c);
      __m512 q[M][N];
      // q = A^T M (along the rows), then Y = q A (along the columns)
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < N; ++j)
          q[i][j] = combine(Tr::AT[i], [&](int l) { return load(src + (l * N + j) * T_ * Co + c, k); });
      const __m512 bv = bias != nullptr ? load(bias + c, k) : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        if (y0 + i >= H) break;
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j) {
          if (x0 + j >= W) break;
          store(out + ((b * H + y0 + i) * W + x0 + j) * Co + c, combine(Tr::AT[j], [&](int l) { return q[i][l]; }, bv), k);
        }
      }
    }
  }
}

void check_map(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4, what, " must be a 4-d CPU tensor; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what,
              " must be float32 or bfloat16; got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), what, " must be in channels-last memory");
}

int64_t tiles_wide(int64_t W, int64_t m) { return (W + m - 1) / m; }

// V[(m+2)^2, B * (r1 - r0) * tw, C] = B^T d B for the tiles in tile rows [r0, r1) of x.
void winograd_input(const at::Tensor& x, int64_t m, int64_t r0, int64_t r1, at::Tensor v) {
  check_map(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), tw = tiles_wide(W, m), rows = r1 - r0;
  const int64_t T_ = B * rows * tw, N = m + 2;
  TORCH_CHECK(m == 2 || m == 4 || m == 6, "winograd_input: m must be 2, 4 or 6; got ", m);
  TORCH_CHECK(r0 >= 0 && r0 < r1 && r1 <= tiles_wide(H, m), "winograd_input: bad tile rows [", r0, ", ", r1, ")");
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous() && v.numel() == N * N * T_ * C,
              "winograd_input: v must be contiguous float32 with ", N * N * T_ * C, " values");
  float* vp = v.data_ptr<float>();
  auto band = [&](auto* xp) {
    at::parallel_for(0, T_, 1, [&](int64_t a, int64_t e) {
      if (m == 2) input_tiles<2>(xp, C, H, W, r0, rows, tw, vp, T_, a, e);
      else if (m == 4) input_tiles<4>(xp, C, H, W, r0, rows, tw, vp, T_, a, e);
      else input_tiles<6>(xp, C, H, W, r0, rows, tw, vp, T_, a, e);
    });
  };
  if (x.scalar_type() == at::kFloat) band(x.data_ptr<float>());
  else band(x.data_ptr<at::BFloat16>());
}

// out[:, :, m r0 : m r1, :] = A^T M A + bias for the products M of the tiles in tile rows [r0, r1).
void winograd_output(const at::Tensor& prod, const c10::optional<at::Tensor>& bias, int64_t m, int64_t r0,
                     int64_t r1, at::Tensor out) {
  check_map(out, "out");
  const int64_t B = out.size(0), Co = out.size(1), H = out.size(2), W = out.size(3), tw = tiles_wide(W, m);
  const int64_t rows = r1 - r0, T_ = B * rows * tw, N = m + 2;
  TORCH_CHECK(m == 2 || m == 4 || m == 6, "winograd_output: m must be 2, 4 or 6; got ", m);
  TORCH_CHECK(r0 >= 0 && r0 < r1 && r1 <= tiles_wide(H, m), "winograd_output: bad tile rows [", r0, ", ", r1, ")");
  TORCH_CHECK(prod.scalar_type() == at::kFloat && prod.is_contiguous() && prod.numel() == N * N * T_ * Co,
              "winograd_output: the products must be contiguous float32 with ", N * N * T_ * Co, " values");
  const float* bp = nullptr;
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    b32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b32.numel() == Co, "winograd_output: the bias must have ", Co, " values; got ", b32.numel());
    bp = b32.data_ptr<float>();
  }
  const float* pp = prod.data_ptr<float>();
  auto band = [&](auto* op) {
    at::parallel_for(0, T_, 1, [&](int64_t a, int64_t e) {
      if (m == 2) output_tiles<2>(pp, Co, bp, H, W, r0, rows, tw, op, T_, a, e);
      else if (m == 4) output_tiles<4>(pp, Co, bp, H, W, r0, rows, tw, op, T_, a, e);
      else output_tiles<6>(pp, Co, bp, H, W, r0, rows, tw, op, T_, a, e);
    });
  };
  if (out.scalar_type() == at::kFloat) band(out.data_ptr<float>());
  else band(out.data_ptr<at::BFloat16>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(imagine, m) {
  m.def("winograd_input(Tensor x, int m, int r0, int r1, Tensor(a!) v) -> ()");
  m.def("winograd_output(Tensor prod, Tensor? bias, int m, int r0, int r1, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(imagine, CPU, m) {
  m.impl("winograd_input", &winograd_input);
  m.impl("winograd_output", &winograd_output);
}
