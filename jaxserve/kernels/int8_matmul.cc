// int8 weight matmuls for XLA:CPU, through the XLA FFI: y[M, N] = x[M, K] . (w int8 * group scales).
//
// XLA:CPU has no int8-weight dot: the step it compiles first writes a float32 copy of each weight matrix
// and then multiplies, so a one-row decode step moves the weights' bytes five times (int8 read, float32
// written, float32 read) where reading the int8 once is the floor. Here each 16 weights are widened in
// registers, scaled and multiplied straight away; nothing is written but y.
//
// Two layouts, both with one float32 scale per output channel and group of G consecutive inputs:
//   jaxserve_int8_matmul     w [K, N] packed, scale [K/G, N] packed  (every projection: inputs first)
//   jaxserve_int8_matmul_nk  w [N, K], scale [N, K/G]               (the tied embedding as the output projection)
// each one layer of a stack [L, ...] named by an int32 operand.
// "Packed" (jaxserve.kernels.pack): tiles of T = 64 output columns (16 where 64 does not divide N) one
// after another, each [K, T] (and [K/G, T]) row-major, so a tile is one contiguous read. In the plain [K, N] layout a tile's rows lie N
// bytes apart, every one on another page, and the hardware prefetchers give up: a third of the speed.
// Work is split into tiles of output columns, grouped into tasks of at least pool.h's TASK_BYTES, run on
// XLA's intra-op thread pool; the calling thread takes tasks too, so the call finishes even when every pool
// thread is busy elsewhere.
//
// Built on the machine that runs it, once per instruction-set path (jaxserve/kernels/__init__.py): the vector
// types below become AVX-512 in the AVX-512 builds, or whatever the path's flags give.

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxserve::L;
using jaxserve::load;
using jaxserve::sum;
using jaxserve::vf;
typedef int8_t vb __attribute__((vector_size(L)));
constexpr int MB = 4;   // rows of x per pass over a weight tile (their accumulators stay in registers)
constexpr int NV = 4;   // vectors of output columns in a tile of the packed [K, N] kernel (one cache line)

// 16 int8 -> float32 (GCC 12 converts a byte vector with __builtin_convertvector element by element, so
// AVX2 and AVX-512 widen with their own instructions)
inline vf widen(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 halves[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
  vf v;
  std::memcpy(&v, halves, sizeof v);
  return v;
#else
  vb b;
  std::memcpy(&b, p, L);
  return __builtin_convertvector(b, vf);
#endif
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

struct Shape {
  int64_t M, K, N, G;
};

// Rows [m0, m0 + R) by the nv * L output columns of tile t, accumulators in registers. One row sums each
// group unscaled and scales the sum (the fewest vector operations a weight); more rows scale each widened
// weight vector once for all of them.
template <int R, int nv>
void kn_block(const float* x, const int8_t* w, const float* s, float* y, Shape d, int64_t m0, int64_t t) {
  constexpr int T = nv * L;
  const int8_t* wt = w + t * d.K * T;  // the tile: [K, T], contiguous
  const float* st = s + t * (d.K / d.G) * T;
  vf acc[R][nv] = {};
  for (int64_t g = 0; g < d.K / d.G; ++g) {
    vf sv[nv], part[R == 1 ? nv : 1] = {};
    for (int j = 0; j < nv; ++j) sv[j] = load(st + g * T + j * L);
    for (int64_t k = g * d.G; k < (g + 1) * d.G; ++k) {
      vf wv[nv];
      for (int j = 0; j < nv; ++j) wv[j] = widen(wt + k * T + j * L);
      if constexpr (R == 1) {
        const float xv = x[m0 * d.K + k];
        for (int j = 0; j < nv; ++j) part[j] += xv * wv[j];
      } else {
        for (int j = 0; j < nv; ++j) wv[j] *= sv[j];
        for (int r = 0; r < R; ++r) {
          const float xv = x[(m0 + r) * d.K + k];
          for (int j = 0; j < nv; ++j) acc[r][j] += xv * wv[j];
        }
      }
    }
    if constexpr (R == 1)
      for (int j = 0; j < nv; ++j) acc[0][j] += part[j] * sv[j];
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < nv; ++j) store(y + (m0 + r) * d.N + t * T + j * L, acc[r][j]);
}

template <int nv>
void kn_tile(const float* x, const int8_t* w, const float* s, float* y, Shape d, int64_t t) {
  int64_t m0 = 0;
  for (; m0 + MB <= d.M; m0 += MB) kn_block<MB, nv>(x, w, s, y, d, m0, t);
  switch (d.M - m0) {
    case 1: return kn_block<1, nv>(x, w, s, y, d, m0, t);
    case 2: return kn_block<2, nv>(x, w, s, y, d, m0, t);
    case 3: return kn_block<3, nv>(x, w, s, y, d, m0, t);
  }
}

// The tile width of a packed weight with N output columns: 64, or 16 where 64 does not divide N.
int64_t tile_width(int64_t n) { return n % (NV * L) ? L : NV * L; }

void kn_chunk(const float* x, const int8_t* w, const float* s, float* y, Shape d, int64_t t) {
  return tile_width(d.N) == L ? kn_tile<1>(x, w, s, y, d, t) : kn_tile<NV>(x, w, s, y, d, t);
}

constexpr int64_t NK_ROWS = 256;  // weight rows (output columns) per tile of the [N, K] kernel

// Rows [m0, m0 + R) by output column n, weights [N, K]: a dot product along the weight row, read once
// for the R rows. A group's products are summed apart and scaled into the row's accumulator once, so the
// only chain through the accumulator is one FMA a group (a chain through every product would bound the
// kernel by the FMA's latency).
template <int R>
void nk_column(const float* x, const int8_t* w, const float* s, float* y, Shape d, int64_t m0, int64_t n) {
  const int64_t groups = d.K / d.G;
  const int8_t* wn = w + n * d.K;
  vf acc[R] = {};
  for (int64_t g = 0; g < groups; ++g) {
    const float sc = s[n * groups + g];
    vf sums[R] = {};
    for (int64_t k = g * d.G; k < (g + 1) * d.G; k += 2 * L) {  // two vectors at a time (G: 16 or 32n)
      const vf w0 = widen(wn + k), w1 = k + L < (g + 1) * d.G ? widen(wn + k + L) : vf{};
      for (int r = 0; r < R; ++r) {
        const float* xr = x + (m0 + r) * d.K + k;
        sums[r] += load(xr) * w0 + (k + L < (g + 1) * d.G ? load(xr + L) * w1 : vf{});
      }
    }
    for (int r = 0; r < R; ++r) acc[r] += sums[r] * sc;
  }
  for (int r = 0; r < R; ++r) y[(m0 + r) * d.N + n] = sum(acc[r]);
}

void nk_chunk(const float* x, const int8_t* w, const float* s, float* y, Shape d, int64_t tile) {
  const int64_t n1 = std::min((tile + 1) * NK_ROWS, d.N);
  for (int64_t n = tile * NK_ROWS; n < n1; ++n) {
    int64_t m0 = 0;
    for (; m0 + MB <= d.M; m0 += MB) nk_column<MB>(x, w, s, y, d, m0, n);
    switch (d.M - m0) {
      case 1: nk_column<1>(x, w, s, y, d, m0, n); break;
      case 2: nk_column<2>(x, w, s, y, d, m0, n); break;
      case 3: nk_column<3>(x, w, s, y, d, m0, n); break;
    }
  }
}

// y = x . w[layer] for w [L, K, N] packed (nk false) or [L, N, K] (nk true), with its scales laid out
// alike: the layer is read in place (an operand sliced out of the stack would be a copy of it each call).
template <bool nk>
ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  const int in = nk ? 2 : 1, out = 3 - in;  // the axes of w (and scale) along inputs and outputs
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 3 || layer.element_count() != 1 || xd[1] != wd[in] ||
      sd[out] != wd[out] || sd[0] != wd[0])
    return ffi::Error::InvalidArgument("int8 matmul: x [M, K], w [L, K, N] or [L, N, K], scale as w with K / G");
  const Shape d{xd[0], wd[in], wd[out], wd[in] / sd[in]};
  if (d.N % L || d.G % L || d.K % d.G || sd[in] != d.K / d.G)
    return ffi::Error::InvalidArgument("int8 matmul: N and the group must be multiples of 16, K of the group");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("int8 matmul: layer out of range");
  const float *xp = x.typed_data(), *sp = s.typed_data() + l * sd[1] * sd[2];
  const int8_t* wp = w.typed_data() + l * wd[1] * wd[2];
  float* yp = y->typed_data();
  const int64_t bytes = (d.K + d.K / d.G * 4) * d.N * d.M;  // weights and scales, once a row of x
  if constexpr (nk)
    jaxserve::parallel(pool, (d.N + NK_ROWS - 1) / NK_ROWS, bytes, [=](int64_t t) { nk_chunk(xp, wp, sp, yp, d, t); });
  else
    jaxserve::parallel(pool, d.N / tile_width(d.N), bytes, [=](int64_t t) { kn_chunk(xp, wp, sp, yp, d, t); });
  return ffi::Error::Success();
}

auto binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S8>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_int8_matmul, Int8Matmul<false>, binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxserve_int8_matmul_nk, Int8Matmul<true>, binding());
