// GGUF block-quantized weight matmuls for XLA:CPU, through the XLA FFI: y[M, N] = x[M, K] . w^T, with w
// [N, K] in one of GGUF's block formats, read as the file stores it (jaxserve.model.blocks keeps its parts):
//
//   Q4_1  w = d * q + m,    q in 0..15, 32 inputs a block, f16 d and m per block    (20 bytes / 32 weights)
//   Q4_0  w = d * (q - 8)   q in 0..15, f16 d per block                              (18 bytes / 32 weights)
//   Q8_0  w = d * q         q in -128..127, f16 d per block                          (34 bytes / 32 weights)
//
// Each a layer of a stack [L, N, ...] named by an int32 operand and read in place (an operand sliced out of
// the stack would be a copy of it each call). The four-bit codes of a block lie as GGUF packs them: byte j
// holds input j in its low nibble and input j + 16 in its high one (but for quantized activations, below:
// weights interleaved 16 rows at a time, see rows_q8).
//
// On float32 activations (the served outputs match the float32 reference as closely as float32
// weights do): the codes are widened in registers and dotted with x, and the dot is scaled by d once a
// block; the offsets (m, or -8d) multiply x's block sums, computed once per call:
//   y[r, n] = sum_b d[n, b] * (q[n, b] . x[r, b]) + sum_b m[n, b] * sum(x[r, b]).
// (AVX-512: Q8_0 scales its weights by d instead, and Q4 looks up its codes' values, see rows and one_row.)
// Weight rows are the output columns, so one row of w is one contiguous read (and stays in L1 while the
// rows of x are dotted with it). Tiles of rows run on XLA's intra-op thread pool (pool.h).

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "tiles.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxserve::L;
using jaxserve::load;
using jaxserve::sum;
using jaxserve::vf;
constexpr int QK = 32;    // inputs per block
constexpr int MB = 4;     // rows of x dotted with a weight row while it is in registers
constexpr int64_t TILE = 32;  // weight rows (output columns) per task

typedef uint8_t vu8 __attribute__((vector_size(L)));
typedef int8_t vs8 __attribute__((vector_size(L)));

enum class Fmt { Q4_0, Q4_1, Q8_0 };

template <Fmt F>
constexpr int64_t block_bytes() {  // of the codes; d and m are arrays of their own
  return F == Fmt::Q8_0 ? QK : QK / 2;
}

// f16 -> f32 (IEEE half, as GGUF stores d and m), n values.
inline void widen_half(const uint16_t* h, float* f, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + L <= n; i += L)
    _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) {
    const uint32_t s = (h[i] & 0x8000u) << 16, e = (h[i] >> 10) & 0x1f, m = h[i] & 0x3ff;
    uint32_t bits;
    if (e == 0x1f) {
      bits = s | 0x7f800000u | (m << 13);
    } else if (e != 0) {
      bits = s | ((e + 112) << 23) | (m << 13);
    } else if (m == 0) {
      bits = s;
    } else {  // subnormal: normalise
      int shift = 0;
      uint32_t mm = m;
      while (!(mm & 0x400)) mm <<= 1, ++shift;
      bits = s | ((113 - shift) << 23) | ((mm & 0x3ff) << 13);
    }
    std::memcpy(f + i, &bits, 4);
  }
}

// n floats of this thread's own, reused by every tile it computes (grown, never freed: no allocation a tile)
inline float* scratch(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// 16 bytes (signed or not) -> float32, 8 at a time
template <bool Signed>
inline vf floats(__m128i b) {
  const __m128i up = _mm_srli_si128(b, 8);
  const __m256 halves[2] = {_mm256_cvtepi32_ps(Signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b)),
                            _mm256_cvtepi32_ps(Signed ? _mm256_cvtepi8_epi32(up) : _mm256_cvtepu8_epi32(up))};
  vf v;
  std::memcpy(&v, halves, sizeof v);
  return v;
}
#endif

// The block's 32 weights' codes as two float vectors: inputs 0..15 and 16..31 (offsets not applied), for the
// paths without AVX-512 (`row` below). GCC 12 converts a byte vector with __builtin_convertvector element by
// element: AVX2 widens with its own instructions.
template <Fmt F>
inline void codes(const uint8_t* q, vf& lo, vf& hi) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  if constexpr (F == Fmt::Q8_0) {
    lo = floats<true>(a);
    hi = floats<true>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + L)));
  } else {
    const __m128i low = _mm_set1_epi8(15);
    lo = floats<false>(_mm_and_si128(a, low));
    hi = floats<false>(_mm_and_si128(_mm_srli_epi16(a, 4), low));
  }
  return;
#endif
  if constexpr (F == Fmt::Q8_0) {
    vs8 a, b;
    std::memcpy(&a, q, L);
    std::memcpy(&b, q + L, L);
    lo = __builtin_convertvector(a, vf);
    hi = __builtin_convertvector(b, vf);
  } else {
    vu8 b;
    std::memcpy(&b, q, L);
    lo = __builtin_convertvector(b & 15, vf);
    hi = __builtin_convertvector(b >> 4, vf);
  }
}

struct Dims {
  int64_t M, K, N;
};

template <int N>
using Int = std::integral_constant<int, N>;

// f(Int<R>, m0) over rows [0, M) of x: MB rows at a time, then the remainder (1..3)
template <typename Fn>
inline void over_rows(int64_t M, Fn f) {
  int64_t m0 = 0;
  for (; m0 + MB <= M; m0 += MB) f(Int<MB>{}, m0);
  switch (M - m0) {
    case 1: f(Int<1>{}, m0); break;
    case 2: f(Int<2>{}, m0); break;
    case 3: f(Int<3>{}, m0); break;
  }
}

// f(Int<W>) for W = w of 1..4: the weight rows a loop takes at once (a tile's last may be fewer than 4)
template <typename Fn>
inline void by_width(int64_t w, Fn f) {
  switch (w) {
    case 1: f(Int<1>{}); break;
    case 2: f(Int<2>{}); break;
    case 3: f(Int<3>{}); break;
    default: f(Int<4>{}); break;
  }
}

// Rows [m0, m0 + R) of x by weight row n. d and m: the row's block scales and offsets in float32; xs: x's
// block sums [M, K/32].
template <Fmt F, int R>
void row(const float* x, const float* xs, const uint8_t* q, const float* d, const float* m, float* y, Dims s,
         int64_t m0, int64_t n) {
  const int64_t nb = s.K / QK;
  vf acc[R] = {};
  for (int64_t b = 0; b < nb; ++b) {
    vf lo, hi;
    codes<F>(q + b * block_bytes<F>(), lo, hi);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + (m0 + r) * s.K + b * QK;
      acc[r] += (lo * load(xr) + hi * load(xr + L)) * d[b];
    }
  }
  for (int r = 0; r < R; ++r) {
    float offset = 0;
    if constexpr (F != Fmt::Q8_0) {
      const float* xr = xs + (m0 + r) * nb;
      for (int64_t b = 0; b < nb; ++b) offset += (F == Fmt::Q4_1 ? m[b] : -8 * d[b]) * xr[b];
    }
    y[(m0 + r) * s.N + n] = sum(acc[r]) + offset;
  }
}

#if defined(__AVX512F__)
// A block's 32 weights as two float vectors, inputs 0..15 and 16..31, d and m applied. Q4: the 16 values a
// block's codes stand for (d * q + m, or d * (q - 8)) are one vector and each input's weight is looked up in
// it (vpermps reads only the low four bits of each lane's index). Q8_0: the codes widened, converted, times d.
template <Fmt F>
inline void weights(const uint8_t* q, float d, float m, __m512& lo, __m512& hi) {
  const __m128i* codes = reinterpret_cast<const __m128i*>(q);
  if constexpr (F == Fmt::Q8_0) {
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes))), _mm512_set1_ps(d));
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes + 1))), _mm512_set1_ps(d));
  } else {
    const __m512 iota = F == Fmt::Q4_1 ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                                       : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes));
    const __m512 values = F == Fmt::Q4_1 ? _mm512_fmadd_ps(iota, _mm512_set1_ps(d), _mm512_set1_ps(m))
                                         : _mm512_mul_ps(iota, _mm512_set1_ps(d));
    lo = _mm512_permutexvar_ps(c, values);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), values);
  }
}

// Rows [m0, m0 + R) of x by weight rows n..n+W at once (q, d, m: row n's; the W rows follow each other):
// each block of the W weight rows is looked up once for the R rows of x and each block of x loaded once for
// the W weight rows, so that from 4 x 4 on the loop is bound by its FMAs, not its loads (one weight row a
// pass re-read x from L2 for every weight row: 32 rows at ~15 GMAC/s a core). Every (row, weight row) pair
// runs the same instructions in the same order whatever R and W are, so that from two rows on a row's
// outputs do not hang on the rows beside it (one row alone is `one_row`'s: the same within float rounding).
template <Fmt F, int R, int W>
void rows(const float* x, const uint8_t* q, const float* d, const float* m, float* y, Dims s, int64_t m0,
          int64_t n) {
  constexpr int64_t bb = block_bytes<F>();
  const int64_t nb = s.K / QK;
  __m512 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < W; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 x0[R], x1[R];
    for (int r = 0; r < R; ++r) {
      x0[r] = _mm512_loadu_ps(x + (m0 + r) * s.K + b * QK);
      x1[r] = _mm512_loadu_ps(x + (m0 + r) * s.K + b * QK + L);
    }
    // one row (Q8_0's: Q4's is one_row's): the codes of the four weight rows after the next four, as many
    // bytes a block as the four rows' block: the hardware prefetcher alone leaves the loads waiting
    if constexpr (R == 1)
      for (int64_t line = 0; line < 4 * bb; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(q + 8 * nb * bb + b * 4 * bb + line), _MM_HINT_T0);
    for (int i = 0; i < W; ++i) {
      const int64_t at = i * nb + b;
      __m512 lo, hi;
      weights<F>(q + at * bb, d[at], F == Fmt::Q4_1 ? m[at] : 0.f, lo, hi);
      for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(hi, x1[r], _mm512_fmadd_ps(lo, x0[r], acc[r][i]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < W; ++i) y[(m0 + r) * s.N + n + i] = _mm512_reduce_add_ps(acc[r][i]);
}

// Q4, one row of x (a 1-stream decode step, where the loop must keep up with memory, not share lookups over
// rows). A 64-byte load of a weight row's codes holds a group of four blocks; its 32-bit lane j holds bytes
// 4j..4j+3, all of block j / 4. Shifted right by 4t bits (t = 0..7), its lane j's low four bits are the
// code of input 4 (j % 4) + t / 2 + 16 (t % 2) of that block, and vpermps (which reads only those four bits
// of each index) looks the code's value up in a table of 16 (0..15, or -8..7 for Q4_0): eight shifts and
// lookups a group, where `rows` widens each block's bytes first, a third shuffle a block (Zen 4: 1.6 -> 1.1
// ns a block of a weight row, one core, the codes in L2). x is laid out once per call in the lanes' order
// (`lanes_of`), so every weight row reads it as it is. The sum over a group's lanes is scaled by each lane's
// block's d at the group's end, and Q4_1's offsets m multiply x's block sums (xs). For four rows of x,
// `rows` is the faster (0.75 against 0.96 ns a block, weight row and row of x: its lookups shared by more).
constexpr int64_t GROUP = 4;  // blocks a group

inline int64_t groups_of(int64_t nb) { return (nb + GROUP - 1) / GROUP; }

// x [K] as [groups, 8, 16]: [g, t, j] = x[block 4g + j / 4, input 4 (j % 4) + t / 2 + 16 (t % 2)], zero past
// the last block.
std::vector<float> lanes_of(const float* x, int64_t K) {
  const int64_t nb = K / QK;
  std::vector<float> out(groups_of(nb) * 8 * L, 0.f);
  alignas(64) int32_t index[2 * L];  // within a block: [t][p] <- input 4p + t / 2 + 16 (t % 2)
  for (int t = 0; t < 8; ++t)
    for (int p = 0; p < 4; ++p) index[4 * t + p] = 4 * p + t / 2 + 16 * (t % 2);
  const __m512i i0 = _mm512_load_si512(index), i1 = _mm512_load_si512(index + L);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + b * QK), hi = _mm512_loadu_ps(x + b * QK + L);
    alignas(64) float tp[2 * L];
    _mm512_store_ps(tp, _mm512_permutex2var_ps(lo, i0, hi));
    _mm512_store_ps(tp + L, _mm512_permutex2var_ps(lo, i1, hi));
    float* dst = out.data() + (b / GROUP) * 8 * L + 4 * (b % GROUP);
    for (int t = 0; t < 8; ++t) std::memcpy(dst + t * L, tp + 4 * t, 4 * sizeof(float));
  }
  return out;
}

// x's one row (xt: as lanes_of lays it out; xs: its block sums) by weight rows n..n+W (q, d, m: row n's).
template <Fmt F, int W>
void one_row(const float* xt, const float* xs, const uint8_t* q, const float* d, const float* m, float* y, Dims s,
             int64_t n) {
  constexpr int64_t bb = block_bytes<F>();
  const int64_t nb = s.K / QK, groups = groups_of(nb);
  const __m512 table = F == Fmt::Q4_1 ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                                      : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[W];
  for (int i = 0; i < W; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t blocks = std::min(GROUP, nb - g * GROUP);
    const __mmask64 bytes = blocks == GROUP ? ~__mmask64{0} : (__mmask64{1} << (blocks * bb)) - 1;
    __m512i v[W];
    __m512 a[W];
    for (int i = 0; i < W; ++i) {
      v[i] = _mm512_maskz_loadu_epi8(bytes, q + (i * nb + g * GROUP) * bb);
      a[i] = _mm512_setzero_ps();
      // the group of the weight row eight rows on: the hardware prefetcher alone leaves the loads waiting
      // (Q4_1 at 57% of a plain read's speed without, ~70% with, on an Intel Xeon)
      _mm_prefetch(reinterpret_cast<const char*>(q + ((i + 8) * nb + g * GROUP) * bb), _MM_HINT_T0);
    }
    for (int t = 0; t < 8; ++t) {
      const __m512 xv = _mm512_loadu_ps(xt + (g * 8 + t) * L);
      for (int i = 0; i < W; ++i)
        a[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v[i], 4 * t), table), xv, a[i]);
    }
    const __mmask16 present = (1u << blocks) - 1;
    for (int i = 0; i < W; ++i) {
      const __m128 dq = _mm_maskz_loadu_ps(present, d + i * nb + g * GROUP);
      acc[i] = _mm512_fmadd_ps(a[i], _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dq)), acc[i]);
    }
  }
  if constexpr (F == Fmt::Q4_1)
    for (int64_t b = 0; b < nb; b += L) {
      const __mmask16 k = nb - b >= L ? 0xffff : (1u << (nb - b)) - 1;
      const __m512 xsv = _mm512_maskz_loadu_ps(k, xs + b);
      for (int i = 0; i < W; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, m + i * nb + b), xsv, acc[i]);
    }
  for (int i = 0; i < W; ++i) y[n + i] = _mm512_reduce_add_ps(acc[i]);
}

#endif

// Weight rows [t * TILE, (t + 1) * TILE) by every row of x (`lanes`: x is one row as lanes_of lays it out, for
// one_row).
template <Fmt F>
void tile(const float* x, const float* xs, const uint8_t* q, const uint16_t* d, const uint16_t* m, float* y,
          Dims s, int64_t t, bool lanes) {
  const int64_t nb = s.K / QK, first = t * TILE, end = std::min((t + 1) * TILE, s.N);
  // the tile's d and m widened at once (its rows' are contiguous)
  const int64_t count = (end - first) * nb;
  float *df = scratch(2 * count), *mf = df + count;
  widen_half(d + first * nb, df, count);
  if constexpr (F == Fmt::Q4_1) widen_half(m + first * nb, mf, count);
#if defined(__AVX512F__)
  // Rows of x outer, weight rows inner: a group of rows of x stays in L1 while the tile's weight rows (in L1
  // and L2 after the first group) pass by it. The other way round, every four weight rows streamed all of x
  // from L2 again (64 rows: ~13 GB of a decode step's loads).
  over_rows(s.M, [&](auto r, int64_t m0) {  // rows [m0, m0 + r) of x by every weight row of the tile
    constexpr int R = decltype(r)::value;
    for (int64_t n = first; n < end; n += 4) {
      const float* dn = df + (n - first) * nb;
      const float* mn = F == Fmt::Q4_1 ? mf + (n - first) * nb : nullptr;
      const uint8_t* qn = q + n * nb * block_bytes<F>();
      by_width(end - n, [&](auto w) {
        constexpr int W = decltype(w)::value;
        if constexpr (F != Fmt::Q8_0 && R == 1)
          if (lanes) return one_row<F, W>(x, xs, qn, dn, mn, y, s, n);
        rows<F, R, W>(x, qn, dn, mn, y, s, m0, n);
      });
    }
  });
#else
  for (int64_t n = first; n < end; ++n) {
    const float* dn = df + (n - first) * nb;
    const float* mn = F == Fmt::Q4_1 ? mf + (n - first) * nb : nullptr;
    const uint8_t* qn = q + n * nb * block_bytes<F>();
    over_rows(s.M, [&](auto r, int64_t m0) { row<F, decltype(r)::value>(x, xs, qn, dn, mn, y, s, m0, n); });
  }
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool VNNI = true;

// Quantized activations (the `x_bits` attribute, 8 or 16), for weights interleaved (jaxserve.model.blocks'
// `interleave` lays them out so when the formulation is applied): x as integer codes, each 16 inputs with a
// float32 step of their own (their largest magnitude / 127, or / 32639 for int16, see quantize_rows), so
// that a weight block's dot with x is integer dot products:
// AVX512-VNNI's vpdpbusd sums four u8 x s8 products into each int32 lane, 64 bytes an instruction. llama.cpp's
// Q8_1 has one step a block of 32; one per 16 inputs keeps more of the reference's top-1 (SmolLM2
// teacher-forced, a float emulation of each: 96.9% with 32, 97.4% with 16).
//
// The weights are interleaved 16 rows at a time, block by block, each 64 bytes holding four bytes of the
// block of each of the 16 rows: codes [N / 16, blocks, block bytes / 4, 16 rows, 4 bytes], d and m [N / 16,
// blocks, 16]. Lane j of every vpdpbusd is then weight row j's, all the way: four dot products (Q4: a
// block's 16 bytes) sum its low nibbles' products (the codes 0..15, the unsigned operand) with x's first 16
// inputs, and four more its high nibbles' with the other 16 (Q8_0: a block's first 16 bytes, then its
// last 16), x's four bytes broadcast to every lane; the two sums are converted
// and scaled by x's two steps (the same for every lane) and by the rows' d (one load) once a block, and the
// 16 lanes are 16 outputs, summed nowhere. In the file's order a lane held four products of one block: that
// conversion and scaling came four times as often, as many instructions as the float path's FMAs.
// The offsets (m, or -8d) multiply the quantized activations' block sums, as llama.cpp's Q8_1 does, not x's
// exact ones: the product is then that of the quantized x with the weights d * q + m, whose rounding errors
// meet centred weights. With exact sums they met the codes 0..15 alone, a bias of about 7.5 d times the
// block's summed rounding error (SmolLM2 teacher-forced: 89.6% top-1 with exact sums, per 32 inputs).
// Every (row, weight row) pair runs the same instructions in the same order whatever rows share the call:
// a row's outputs do not hang on the rows beside it, one row alone included.
struct Quantized {
  std::vector<int8_t> q;     // [M, blocks, P, 32]: the codes, in x's order (P = 2: high bytes, then low ones)
  std::vector<float> steps;  // [M, blocks, 2]: the steps of each block's two runs of 16
  std::vector<float> sums;   // [M, blocks]: each block's quantized sum (Q4_0: times -8, its offset / d)
  std::vector<int32_t> runs;  // [M, blocks, 2]: 128 times each run's sum of codes (Q8_0's correction, below)
};

// P bytes a code: 1, int8 codes -127..127; 2, int16 codes -32639..32639 held as two byte planes, v = 256 h + l
// (h -127..127, l -128..127), so that the same u8 x s8 products take them, twice as many, and their sums
// join exactly in int32 (a lane's high sum a block, at most 16 * 255 * 127, times 256, is below 2^31).
// Int16 codes round x 257 times more finely than int8 ones: the projections whose int8 rounding tipped
// answers multiply on them (jaxserve.model.blocks.x_bits).
template <Fmt F, int P>
Quantized quantize_rows(const float* x, Dims s) {
  constexpr float top = P == 1 ? 127 : 32639;
  const int64_t nb = s.K / QK;
  Quantized out{std::vector<int8_t>(s.M * s.K * P), std::vector<float>(s.M * nb * 2), std::vector<float>(s.M * nb),
                std::vector<int32_t>(s.M * nb * 2)};
  for (int64_t i = 0; i < s.M * nb; ++i) {
    float block_sum = 0;
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_loadu_ps(x + i * QK + h * L);
      const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
      const float step = amax / top, inv = amax > 0 ? top / amax : 0;
      const __m512i codes = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));  // nearest, ties even
      int8_t* at = &out.q[i * P * QK + h * L];
      if constexpr (P == 1) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(at), _mm512_cvtsepi32_epi8(codes));
      } else {
        const __m512i high = _mm512_srai_epi32(_mm512_add_epi32(codes, _mm512_set1_epi32(128)), 8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(at), _mm512_cvtsepi32_epi8(high));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(at + QK),
                         _mm512_cvtsepi32_epi8(_mm512_sub_epi32(codes, _mm512_slli_epi32(high, 8))));
      }
      const int32_t total = _mm512_reduce_add_epi32(codes);
      out.steps[i * 2 + h] = step;
      out.runs[i * 2 + h] = 128 * total;
      block_sum += step * total;
    }
    out.sums[i] = F == Fmt::Q4_0 ? -8 * block_sum : block_sum;
  }
  return out;
}

// Rows [m0, m0 + R) of x (codes of P bytes) by the 16 weight rows of one interleaved group (q, d, m: the
// group's codes, d and Q4_1's m, float16, each block's 16 widened in registers), into y's columns n..n+16.
// The offsets are m for Q4_1 and d for Q4_0 (its -8 is in x's sums).
// Q8_0 weights are signed, and vpdpbusd's weight operand is not: their codes are offset by 128 in registers
// (an exclusive or), and 128 times x's run sums taken off the dot products after (`runs`).
template <Fmt F, int R, int P>
void rows_q8(const Quantized& xq, const uint8_t* q, const uint16_t* d, const uint16_t* m, float* y, Dims s,
             int64_t m0, int64_t n) {
  constexpr int64_t group = 16 * block_bytes<F>();  // bytes of a block of the 16 weight rows
  const int64_t nb = s.K / QK;
  const __m512i low = _mm512_set1_epi8(15), zero = _mm512_setzero_si512(), sign = _mm512_set1_epi8(-128);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* qb = q + b * group;
    // one row of x: eight blocks further on (the loop must keep up with memory)
    if constexpr (R == 1)
      for (int64_t line = 0; line < group; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(qb + 8 * group + line), _MM_HINT_T0);
    // [k]: the 16 rows' codes of inputs 4k..4k+3 (first) and 16 + 4k..16 + 4k + 3 (second)
    __m512i first[4], second[4];
    for (int k = 0; k < 4; ++k) {
      if constexpr (F == Fmt::Q8_0) {
        first[k] = _mm512_xor_si512(_mm512_loadu_si512(qb + 64 * k), sign);
        second[k] = _mm512_xor_si512(_mm512_loadu_si512(qb + 256 + 64 * k), sign);
      } else {  // a byte's low nibble is input 4k + i, its high one 16 + 4k + i
        const __m512i v = _mm512_loadu_si512(qb + 64 * k);
        first[k] = _mm512_and_si512(v, low);
        second[k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    }
    const auto widen = [b](const uint16_t* h) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + b * L)));
    };
    const __m512 dv = widen(d), ov = F == Fmt::Q4_1 ? widen(m) : dv;
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * nb + b;
      const int8_t* xb = &xq.q[at * P * QK];
      __m512i il = zero, ih = zero, jl = zero, jh = zero;  // the sums of x's first 16 inputs and its last 16
      for (int k = 0; k < 4; ++k) {
        int32_t a, c;
        std::memcpy(&a, xb + 4 * k, 4);
        std::memcpy(&c, xb + L + 4 * k, 4);
        il = _mm512_dpbusd_epi32(il, first[k], _mm512_set1_epi32(a));
        ih = _mm512_dpbusd_epi32(ih, second[k], _mm512_set1_epi32(c));
        if constexpr (P == 2) {  // the low bytes
          std::memcpy(&a, xb + QK + 4 * k, 4);
          std::memcpy(&c, xb + QK + L + 4 * k, 4);
          jl = _mm512_dpbusd_epi32(jl, first[k], _mm512_set1_epi32(a));
          jh = _mm512_dpbusd_epi32(jh, second[k], _mm512_set1_epi32(c));
        }
      }
      if constexpr (P == 2) {
        il = _mm512_add_epi32(_mm512_slli_epi32(il, 8), jl);
        ih = _mm512_add_epi32(_mm512_slli_epi32(ih, 8), jh);
      }
      if constexpr (F == Fmt::Q8_0) {
        il = _mm512_sub_epi32(il, _mm512_set1_epi32(xq.runs[2 * at]));
        ih = _mm512_sub_epi32(ih, _mm512_set1_epi32(xq.runs[2 * at + 1]));
      }
      const __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(il), _mm512_set1_ps(xq.steps[2 * at]),
                                       _mm512_mul_ps(_mm512_cvtepi32_ps(ih), _mm512_set1_ps(xq.steps[2 * at + 1])));
      acc[r] = _mm512_fmadd_ps(u, dv, acc[r]);
      if constexpr (F != Fmt::Q8_0) acc[r] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xq.sums[at]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (m0 + r) * s.N + n, acc[r]);
}

#if defined(JAXSERVE_TILES)
// AMX: rows [m0, m0 + 16) of x by the 16 weight rows of one interleaved group, as rows_q8 computes them and
// to the same bits, the integer dot products on tiles. tdpbusd multiplies u8 rows of its first tile with s8
// columns of its second, those laid out as the interleaved weights already are (a block's 64 bytes [k]: the
// 16 rows' codes of inputs 4k..4k+3): the weights are the signed operand, as they lie (Q4's nibbles
// unpacked into a scratch block first), and x's codes the unsigned one, offset by 128 (`xu`). One product a
// run of 16 inputs (x's step changes there): C [16 rows of x, 16 weight rows] int32, from which 128 times
// the weights' sums over the run come off; its rows are then rows_q8's vectors of 16 weight rows, scaled
// and summed in the same order. Tiles: 0, 1 the products of runs 0 and 1 (int16 x: of the high bytes), 2, 3
// those of the low bytes, 4, 5 x's runs, 6, 7 the weights'.
template <Fmt F, int P>
void tiles_q8(const Quantized& xq, const uint8_t* xu, const uint8_t* q, const uint16_t* d, const uint16_t* m,
              float* y, Dims s, int64_t m0, int64_t n) {
  constexpr int64_t group = 16 * block_bytes<F>();
  const int64_t nb = s.K / QK, stride = nb * P * QK;  // bytes between two rows of xu
  const __m512i low = _mm512_set1_epi8(15), offset = _mm512_set1_epi8(-128);
  alignas(64) uint8_t unpacked[2][4][64];  // Q4: a block's codes of inputs 0..15 (4 x 64 bytes), then 16..31
  alignas(64) int32_t c[2 * P][16][16];
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* qb = q + b * group;
    __m512i run_sum[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};  // 128 times each row's codes' sum
    for (int k = 0; k < 4; ++k) {
      __m512i first, second;
      if constexpr (F == Fmt::Q8_0) {
        first = _mm512_loadu_si512(qb + 64 * k);
        second = _mm512_loadu_si512(qb + 256 + 64 * k);
      } else {
        const __m512i v = _mm512_loadu_si512(qb + 64 * k);
        first = _mm512_and_si512(v, low);
        second = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        _mm512_store_si512(unpacked[0][k], first);
        _mm512_store_si512(unpacked[1][k], second);
      }
      run_sum[0] = _mm512_dpbusd_epi32(run_sum[0], offset, first);
      run_sum[1] = _mm512_dpbusd_epi32(run_sum[1], offset, second);
    }
    const uint8_t* w = F == Fmt::Q8_0 ? qb : unpacked[0][0];
    JAXSERVE_TILE_LOAD(6, w, 64);
    JAXSERVE_TILE_LOAD(7, w + 256, 64);
    const uint8_t* xb = xu + (m0 * nb + b) * P * QK;
// One byte plane of x (its codes at xp) by the block's weights: runs 0 and 1 into product tiles c0 and c1
// (literals, as the intrinsics need), stored to c[c0] and c[c1].
#define JAXSERVE_PLANE(xp, c0, c1)       \
  JAXSERVE_TILE_LOAD(4, xp, stride);     \
  JAXSERVE_TILE_LOAD(5, (xp) + L, stride); \
  JAXSERVE_TILE_ZERO(c0);                \
  JAXSERVE_TILE_ZERO(c1);                \
  JAXSERVE_TILE_DPBUSD(c0, 4, 6);        \
  JAXSERVE_TILE_DPBUSD(c1, 5, 7);        \
  JAXSERVE_TILE_STORE(c0, c[c0], 64);    \
  JAXSERVE_TILE_STORE(c1, c[c1], 64)
    JAXSERVE_PLANE(xb, 0, 1);
    if constexpr (P == 2) {  // the low bytes
      JAXSERVE_PLANE(xb + QK, 2, 3);
    }
#undef JAXSERVE_PLANE
    const auto widen = [b](const uint16_t* h) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + b * L)));
    };
    const __m512 dv = widen(d), ov = F == Fmt::Q4_1 ? widen(m) : dv;
    for (int r = 0; r < 16; ++r) {
      const int64_t at = (m0 + r) * nb + b;
      const auto dot = [&](int i, int h) { return _mm512_sub_epi32(_mm512_load_si512(c[i][r]), run_sum[h]); };
      __m512i il = dot(0, 0), ih = dot(1, 1);
      if constexpr (P == 2) {
        il = _mm512_add_epi32(_mm512_slli_epi32(il, 8), dot(2, 0));
        ih = _mm512_add_epi32(_mm512_slli_epi32(ih, 8), dot(3, 1));
      }
      const __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(il), _mm512_set1_ps(xq.steps[2 * at]),
                                       _mm512_mul_ps(_mm512_cvtepi32_ps(ih), _mm512_set1_ps(xq.steps[2 * at + 1])));
      acc[r] = _mm512_fmadd_ps(u, dv, acc[r]);
      if constexpr (F != Fmt::Q8_0) acc[r] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xq.sums[at]), acc[r]);
    }
  }
  for (int r = 0; r < 16; ++r) _mm512_storeu_ps(y + (m0 + r) * s.N + n, acc[r]);
}

// The tiles' shapes for tiles_q8: products 16 x 16 int32, x's runs 16 rows of 16 bytes, the weights' 4 rows
// of 64 bytes.
inline jaxserve::tiles::Config tile_shapes() {
  jaxserve::tiles::Config c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = t < 6 ? 16 : 4;
    c.colsb[t] = t == 4 || t == 5 ? 16 : 64;
  }
  return c;
}
#endif

// Weight rows [t * TILE, (t + 1) * TILE) (whole groups of 16) by every row of x, on quantized activations:
// where `xu` (x's codes offset by 128) is given, each whole 16 rows of x on AMX tiles, the rest with rows_q8.
template <Fmt F, int P>
void tile_q8(const Quantized& xq, const uint8_t* xu, const uint8_t* q, const uint16_t* d, const uint16_t* m,
             float* y, Dims s, int64_t t) {
  const int64_t nb = s.K / QK, first = t * TILE, end = std::min((t + 1) * TILE, s.N);
  const auto at = [&](int64_t n) { return std::make_tuple(q + n * nb * block_bytes<F>(), d + n * nb, m ? m + n * nb : nullptr); };
  int64_t tiled = 0;  // rows of x taken on tiles
#if defined(JAXSERVE_TILES)
  if (xu) {
    tiled = s.M / 16 * 16;
    jaxserve::tiles::configure(tile_shapes());
    for (int64_t m0 = 0; m0 < tiled; m0 += 16)
      for (int64_t n = first; n < end; n += L) {
        const auto [qn, dn, mn] = at(n);
        tiles_q8<F, P>(xq, xu, qn, dn, mn, y, s, m0, n);
      }
    jaxserve::tiles::release();
  }
#endif
  over_rows(s.M - tiled, [&](auto r, int64_t m0) {
    for (int64_t n = first; n < end; n += L) {
      const auto [qn, dn, mn] = at(n);
      rows_q8<F, decltype(r)::value, P>(xq, qn, dn, mn, y, s, tiled + m0, n);
    }
  });
}

#else
constexpr bool VNNI = false;  // a build without AVX512-VNNI refuses quantized activations (below)
#endif

// y = x . w[layer]^T for w's codes [L, N, K * bytes per block / 32], d (and m) [L, N, K / 32].
template <Fmt F, typename Q>
ffi::Error BlockMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, Q q, ffi::Buffer<ffi::F16> d,
                       const uint16_t* m, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t x_bits,
                       int32_t invariant, int32_t on_tiles) {
  auto xd = x.dimensions(), qd = q.dimensions(), dd = d.dimensions();
  if (xd.size() != 2 || qd.size() != 3 || dd.size() != 3 || layer.element_count() != 1 || xd[1] % QK ||
      qd[2] != xd[1] / QK * block_bytes<F>() || dd[0] != qd[0] || dd[1] != qd[1] || dd[2] != xd[1] / QK)
    return ffi::Error::InvalidArgument("block matmul: x [M, K], codes [L, N, K/32 * block bytes], d [L, N, K/32]");
  const Dims s{xd[0], xd[1], qd[1]};
  const int64_t l = *layer.typed_data(), nb = s.K / QK;
  if (l < 0 || l >= qd[0]) return ffi::Error::InvalidArgument("block matmul: layer out of range");
  const float* xp = x.typed_data();
  // AVX-512: one row of Q4 through a loop of its own (one_row), unless `invariant` asks for the many-row loop:
  // the outputs then equal, bit for bit, those the row gets among others (one_row's differ within float
  // rounding, which a formulation on quantized activations would round into larger differences downstream)
#if defined(__AVX512F__)
  const bool lanes = F != Fmt::Q8_0 && s.M == 1 && !invariant;
#else
  const bool lanes = false;
#endif
  // x's block sums, for the offsets of the float paths (AVX-512's apply them to the weights, but for one_row
  // of Q4_1; quantized activations take their own sums)
#if defined(__AVX512F__)
  const bool offsets = F == Fmt::Q4_1 && lanes;
#else
  const bool offsets = F != Fmt::Q8_0;
#endif
  std::vector<float> xs(offsets ? s.M * nb : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(xs.size()); ++i) {
    float t = 0;
    for (int k = 0; k < QK; ++k) t += xp[i * QK + k];
    xs[i] = t;
  }
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.typed_data()) + l * qd[1] * qd[2];
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.typed_data()) + l * s.N * nb;
  const uint16_t* mp = m ? m + l * s.N * nb : nullptr;
  float* yp = y->typed_data();
  const float* xsp = xs.data();
  const int64_t tiles = (s.N + TILE - 1) / TILE;
  const int64_t bytes = s.N * nb * (block_bytes<F>() + (F == Fmt::Q4_1 ? 4 : 2)) * s.M;
  if (x_bits != 8 && x_bits != 16 && x_bits != 32)
    return ffi::Error::InvalidArgument("block matmul: x_bits is 8, 16 or 32 (float)");
  const bool q8 = x_bits != 32;
  if (q8 && !VNNI) return ffi::Error::InvalidArgument("block matmul: quantized activations need AVX512-VNNI");
#if !defined(JAXSERVE_TILES)
  if (on_tiles) return ffi::Error::InvalidArgument("block matmul: tiles need a path built for AMX");
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (q8) {
    if (s.N % L) return ffi::Error::InvalidArgument("block matmul: quantized activations take weights interleaved, 16 rows a group");
    const Quantized xq = x_bits == 8 ? quantize_rows<F, 1>(xp, s) : quantize_rows<F, 2>(xp, s);
    const Quantized* xqp = &xq;
    std::vector<uint8_t> offset;  // x's codes plus 128, the tiles' unsigned operand, where they take rows
#if defined(JAXSERVE_TILES)
    if (on_tiles && s.M >= 16 && jaxserve::tiles::permitted()) {
      offset.resize(xq.q.size());  // sized once and filled in a loop the compiler vectorizes (a step's hot path)
      for (size_t i = 0; i < offset.size(); ++i) offset[i] = static_cast<uint8_t>(xq.q[i]) ^ 0x80;
    }
#endif
    const uint8_t* xu = offset.empty() ? nullptr : offset.data();
    if (x_bits == 8)
      jaxserve::parallel(pool, tiles, bytes, [=](int64_t t) { tile_q8<F, 1>(*xqp, xu, qp, dp, mp, yp, s, t); });
    else
      jaxserve::parallel(pool, tiles, bytes, [=](int64_t t) { tile_q8<F, 2>(*xqp, xu, qp, dp, mp, yp, s, t); });
#if defined(JAXSERVE_TILES)
    if (jaxserve::tiles::broken.exchange(false))
      return ffi::Error::Internal("block matmul: a tile operation broke its configuration's limits");
#endif
    return ffi::Error::Success();
  }
#endif
#if defined(__AVX512F__)
  std::vector<float> laid;
  if (lanes) laid = lanes_of(xp, s.K);
  const float* xin = lanes ? laid.data() : xp;
#else
  const float* xin = xp;
#endif
  jaxserve::parallel(pool, tiles, bytes, [=](int64_t t) { tile<F>(xin, xsp, qp, dp, mp, yp, s, t, lanes); });
  return ffi::Error::Success();
}

ffi::Error Q4_1(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q, ffi::Buffer<ffi::F16> d,
                ffi::Buffer<ffi::F16> m, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t x_bits,
                int32_t invariant, int32_t tiles) {
  if (m.dimensions().size() != 3 || m.element_count() != d.element_count())
    return ffi::Error::InvalidArgument("block matmul: m as d");
  return BlockMatmul<Fmt::Q4_1>(pool, x, q, d, reinterpret_cast<const uint16_t*>(m.typed_data()), layer, y, x_bits, invariant, tiles);
}

ffi::Error Q4_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q, ffi::Buffer<ffi::F16> d,
                ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t x_bits, int32_t invariant,
                int32_t tiles) {
  return BlockMatmul<Fmt::Q4_0>(pool, x, q, d, nullptr, layer, y, x_bits, invariant, tiles);
}

ffi::Error Q8_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F16> d,
                ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t x_bits, int32_t invariant,
                int32_t tiles) {
  return BlockMatmul<Fmt::Q8_0>(pool, x, q, d, nullptr, layer, y, x_bits, invariant, tiles);
}

// The floor the kernels are measured against (scripts/bench_bandwidth.py): layer `layer` of each of a
// weight's parts (stacks [L, ...]: codes, d, m) read whole in one call, nothing computed but a sum, its 4 KiB
// pages split into tasks as a kernel streaming the same bytes splits its tiles, on the same threads.
ffi::Error Read(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs parts,
                ffi::ResultBuffer<ffi::F32> y) {
  constexpr int64_t PAGE = 4096;
  struct Part {
    const uint8_t* p;
    int64_t bytes, first_page;
  };
  std::vector<Part> in;
  int64_t pages = 0, bytes = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    auto a = parts.get<ffi::AnyBuffer>(i);
    if (!a) return a.error();
    const int64_t per_layer = a->size_bytes() / a->dimensions()[0];
    in.push_back({static_cast<const uint8_t*>(a->untyped_data()) + *layer.typed_data() * per_layer, per_layer, pages});
    pages += (per_layer + PAGE - 1) / PAGE;
    bytes += per_layer;
  }
  std::vector<uint64_t> sums(pages);
  const Part *first = in.data(), *last = in.data() + in.size();
  uint64_t* out = sums.data();
  jaxserve::parallel(pool, pages, bytes, [=](int64_t t) {
    const Part& part = *(std::upper_bound(first, last, t, [](int64_t t, const Part& p) { return t < p.first_page; }) - 1);
    const int64_t at = (t - part.first_page) * PAGE, end = std::min(at + PAGE, part.bytes);
    typedef uint64_t line __attribute__((vector_size(64)));
    line acc = {};
    for (int64_t i = at; i + 64 <= end; i += 64) {
      line v;
      std::memcpy(&v, part.p + i, 64);
      acc += v;
    }
    uint64_t total = 0;
    for (int j = 0; j < 8; ++j) total += acc[j];
    out[t] = total;
  });
  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  *y->typed_data() = static_cast<float>(total & 0xff);
  return ffi::Error::Success();
}

// x, codes, d (, m), layer -> y
auto bind() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>(); }

}  // namespace

// Whether the block kernels multiply 16 rows of quantized activations at a time on AMX tiles here: built
// with them (or their emulation) and, on the hardware, lent the tiles' state by Linux.
extern "C" int jaxserve_tiles() {
#if defined(JAXSERVE_TILES)
  return jaxserve::tiles::permitted();
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_read_bytes, Read,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_q4_1_matmul, Q4_1,
                              bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("x_bits")
                                  .Attr<int32_t>("invariant")
                                  .Attr<int32_t>("tiles"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_q4_0_matmul, Q4_0,
                              bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("x_bits")
                                  .Attr<int32_t>("invariant")
                                  .Attr<int32_t>("tiles"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_q8_0_matmul, Q8_0,
                              bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("x_bits")
                                  .Attr<int32_t>("invariant")
                                  .Attr<int32_t>("tiles"));
