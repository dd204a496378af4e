// AMX tiles, as the block kernels on quantized activations use them (block_matmul.cc's tiles_q8): the
// instructions themselves in a build with -mamx-tile -mamx-int8, or, in a build defining
// JAXSERVE_AMX_EMULATE, plain code with their semantics that also checks the limits a tile configuration
// sets, so that a CPU without AMX runs and tests the kernel's layouts and its tile configuration (the
// "avx512_amx_emulated" path, jaxserve.kernels.ISAS). The tile numbers are literals at every call: the
// instructions' intrinsics name their registers by stringizing them.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(JAXSERVE_AMX_EMULATE)
#define JAXSERVE_TILES 1
#elif defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define JAXSERVE_TILES 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(JAXSERVE_TILES)
namespace jaxserve::tiles {

// ldtilecfg's 64 bytes, palette 1: each tile register's rows (at most 16) and bytes a row (at most 64).
struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(Config) == 64, "ldtilecfg reads 64 bytes");

#if defined(JAXSERVE_AMX_EMULATE)
struct Tile {
  int rows = 0, colsb = 0;
  uint8_t data[16][64];
};
inline thread_local Tile reg[8];
// Set where a call broke the configuration's limits (the hardware would fault or compute garbage); the
// kernel reports it as an error.
inline std::atomic<bool> broken{false};

inline bool permitted() { return true; }

inline void check(bool ok) {
  if (!ok) broken = true;
}

inline void configure(const Config& c) {
  check(c.palette == 1);
  for (int t = 0; t < 8; ++t) {
    check(c.rows[t] <= 16 && c.colsb[t] <= 64);
    reg[t].rows = c.rows[t];
    reg[t].colsb = c.colsb[t];
    std::memset(reg[t].data, 0, sizeof reg[t].data);
  }
}

inline void zero(int t) { std::memset(reg[t].data, 0, sizeof reg[t].data); }

inline void load(int t, const void* p, int64_t stride) {
  check(reg[t].rows > 0);
  for (int r = 0; r < reg[t].rows; ++r)
    std::memcpy(reg[t].data[r], static_cast<const uint8_t*>(p) + r * stride, reg[t].colsb);
}

inline void store(int t, void* p, int64_t stride) {
  check(reg[t].rows > 0);
  for (int r = 0; r < reg[t].rows; ++r) std::memcpy(static_cast<uint8_t*>(p) + r * stride, reg[t].data[r], reg[t].colsb);
}

// tdpbusd: C[m][n] += sum over k, i of u8 A[m][4k + i] * s8 B[k][4n + i], in int32
inline void dpbusd(int c, int a, int b) {
  Tile &C = reg[c], &A = reg[a], &B = reg[b];
  check(C.rows == A.rows && A.colsb == 4 * B.rows && C.colsb == B.colsb && C.rows > 0 && B.rows > 0);
  for (int m = 0; m < C.rows; ++m)
    for (int n = 0; n < C.colsb / 4; ++n) {
      int32_t acc;
      std::memcpy(&acc, &C.data[m][4 * n], 4);
      for (int k = 0; k < B.rows; ++k)
        for (int i = 0; i < 4; ++i) acc += int32_t{A.data[m][4 * k + i]} * int32_t{static_cast<int8_t>(B.data[k][4 * n + i])};
      std::memcpy(&C.data[m][4 * n], &acc, 4);
    }
}

inline void release() {
  for (Tile& t : reg) t.rows = t.colsb = 0;
}

#define JAXSERVE_TILE_ZERO(t) jaxserve::tiles::zero(t)
#define JAXSERVE_TILE_LOAD(t, p, stride) jaxserve::tiles::load(t, p, stride)
#define JAXSERVE_TILE_STORE(t, p, stride) jaxserve::tiles::store(t, p, stride)
#define JAXSERVE_TILE_DPBUSD(c, a, b) jaxserve::tiles::dpbusd(c, a, b)
#else
inline std::atomic<bool> broken{false};  // the hardware checks its own limits

// Linux lends a process the tiles' state (8 KiB a thread) only when it asks (once, for all its threads);
// where it refuses, the kernels multiply with AVX512-VNNI alone, to the same results.
inline bool permitted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
}

inline void configure(const Config& c) { _tile_loadconfig(&c); }
inline void release() { _tile_release(); }

#define JAXSERVE_TILE_ZERO(t) _tile_zero(t)
#define JAXSERVE_TILE_LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define JAXSERVE_TILE_STORE(t, p, stride) _tile_stored(t, p, stride)
#define JAXSERVE_TILE_DPBUSD(c, a, b) _tile_dpbusd(c, a, b)
#endif

}  // namespace jaxserve::tiles
#endif
