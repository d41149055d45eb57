// CPU kernels of multi-scale deformable attention.
//
// Work split:
//   forward   parallel over (batch, query); each task writes its own output rows. (Sweeping
//             head by head inside a task was measured slower: strided location reads.)
//   backward  parallel over (batch, head). Only the task owning (n, m) touches the
//             grad_value slice value[n, :, m, :], and it visits queries in order, so the
//             scatter-add needs no atomics and gives bit-identical gradients on every run.
// Per (query, head) the kernels first list the bilinear corners of all L*P samples (the value
// row and its weight; fp32/fp64 compute this geometry 16 samples at a time in vector lanes),
// then run over the D channels in fixed-width blocks whose accumulators stay in vector
// registers. The fp32 backward reduces its corner dot products 16 at a time. The hot loops are compiled three times (AVX-512,
// AVX2+FMA, baseline x86-64) and the widest one the CPU supports runs; UNIP_V2_CPU_ISA=
// avx512|avx2|default caps the choice and UNIP_V2_CPU_SCALAR_GEOMETRY=1 turns the vector
// geometry off (tests use both to cover every path).
// Accumulation is in at::opmath_type (fp32 for fp16/bf16, fp64 for fp64).
#include "../ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define UNIP_V2_X86_MULTIVERSION 1
#define UNIP_V2_INLINE inline __attribute__((always_inline))
#define UNIP_V2_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define UNIP_V2_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define UNIP_V2_X86_MULTIVERSION 0
#define UNIP_V2_INLINE inline
#endif

namespace unip_v2 {
namespace {

// ---------------------------------------------------------------------------------------
// Geometry: where one sampling location lands on one level.

template <typename acc_t>
struct Sample {
  int64_t offset[4];  // element offset of the corner's value row, relative to the level base
  acc_t weight[4];    // bilinear weights; 0 for corners outside the map
  bool valid[4];      // corners (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1)
  acc_t fx, fy;       // fractional position inside the cell (for the location gradient)
  bool any;           // false when nothing is read (outside the map, or not finite)
};

template <typename acc_t>
UNIP_V2_INLINE Sample<acc_t> locate(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W,
                                    int64_t row) {
  Sample<acc_t> s;
  // grid_sample's unnormalisation for align_corners=False, in the same order of operations
  // so that fp32 results agree to the last bits: g = 2*loc - 1; pixel = (g + 1) * size/2 - 0.5.
  const acc_t x = (loc_x * acc_t(2) - acc_t(1) + acc_t(1)) * (acc_t(W) * acc_t(0.5)) - acc_t(0.5);
  const acc_t y = (loc_y * acc_t(2) - acc_t(1) + acc_t(1)) * (acc_t(H) * acc_t(0.5)) - acc_t(0.5);
  // Written so that NaN fails the test: a NaN location samples zeros.
  s.any = x > acc_t(-1) && y > acc_t(-1) && x < acc_t(W) && y < acc_t(H);
  if (!s.any) return s;
  const acc_t xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  s.fx = x - xf;
  s.fy = y - yf;
  const acc_t gx = acc_t(1) - s.fx, gy = acc_t(1) - s.fy;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < W, y0_in = y0 >= 0, y1_in = y0 + 1 < H;
  s.valid[0] = y0_in && x0_in;
  s.valid[1] = y0_in && x1_in;
  s.valid[2] = y1_in && x0_in;
  s.valid[3] = y1_in && x1_in;
  const int64_t o = (y0 * W + x0) * row;
  s.offset[0] = o;
  s.offset[1] = o + row;
  s.offset[2] = o + W * row;
  s.offset[3] = o + W * row + row;
  s.weight[0] = s.valid[0] ? gy * gx : acc_t(0);
  s.weight[1] = s.valid[1] ? gy * s.fx : acc_t(0);
  s.weight[2] = s.valid[2] ? s.fy * gx : acc_t(0);
  s.weight[3] = s.valid[3] ? s.fy * s.fx : acc_t(0);
  return s;
}

struct Problem {
  int64_t N, S, M, D, Lq, L, P;
  const int64_t* shapes;  // (L, 2)
  const int64_t* starts;  // (L,)
};

// 64 bytes of channels as one GCC vector: one AVX-512 register, two AVX2 registers or four
// SSE registers, depending on the target the enclosing function is compiled for. Used when
// scalar_t == acc_t (fp32, fp64); fp16/bf16 take the plain loops (correct, not tuned).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t width = 64 / sizeof(T);
};

template <typename T>
UNIP_V2_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
UNIP_V2_INLINE void vstore(T* p, const typename Vec<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Sum of the lanes of a Bytes-wide vector by repeated halving (upper half + lower half):
// log2(lanes) dependent adds that stay in registers, in a fixed order.
template <typename T, int Bytes>
UNIP_V2_INLINE T lane_sum(const T __attribute__((vector_size(Bytes))) & v) {
  if constexpr (Bytes == 2 * sizeof(T)) {
    return v[0] + v[1];
  } else {
    typedef T Half __attribute__((vector_size(Bytes / 2)));
    Half lo, hi;
    std::memcpy(&lo, &v, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return lane_sum<T, Bytes / 2>(lo + hi);
  }
}

template <typename T>
UNIP_V2_INLINE T hsum(const typename Vec<T>::type& v) {
  return lane_sum<T, 64>(v);
}

template <typename scalar_t, typename acc_t>
constexpr bool kVectorised = std::is_same_v<scalar_t, acc_t>;

// ---------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t>
struct ForwardArgs {
  Problem pb;
  const scalar_t* value;
  const scalar_t* loc;
  const scalar_t* attn;
  scalar_t* out;
};

// out[0 : NV * width] = sum_k coef[k] * ptr[k][off : off + NV * width]. Corners go round-robin
// into four accumulator sets so consecutive FMAs do not wait on each other; the sets are
// added in a fixed order at the end.
template <int NV, typename T>
UNIP_V2_INLINE void gather_rows(const T* const* ptr, const T* coef, int64_t count, int64_t off,
                                T* out) {
  using V = typename Vec<T>::type;
  constexpr int64_t W = Vec<T>::width;
  constexpr int kSets = 4;
  V acc[kSets][NV];
  for (int r = 0; r < kSets; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = V{};
  int64_t k = 0;
  for (; k + kSets <= count; k += kSets) {
    for (int r = 0; r < kSets; ++r) {
      const T* v = ptr[k + r] + off;
      for (int j = 0; j < NV; ++j) acc[r][j] += coef[k + r] * vload(v + j * W);
    }
  }
  for (int r = 0; k < count; ++k, ++r) {
    for (int j = 0; j < NV; ++j) acc[r][j] += coef[k] * vload(ptr[k] + off + j * W);
  }
  for (int j = 0; j < NV; ++j) vstore(out + j * W, (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]));
}

// out[0:D] = sum_k coef[k] * ptr[k][0:D]: vector blocks for fp32 / fp64, then one channel at a
// time (the tail, and fp16 / bf16, which accumulate in acc_t).
template <typename acc_t, typename scalar_t>
UNIP_V2_INLINE void gather_channels(const scalar_t* const* ptr, const acc_t* coef, int64_t count,
                                    int64_t D, scalar_t* out) {
  int64_t d = 0;
  if constexpr (kVectorised<scalar_t, acc_t>) {
    constexpr int64_t VW = Vec<acc_t>::width;
    for (; d + 2 * VW <= D; d += 2 * VW) gather_rows<2>(ptr, coef, count, d, out + d);
    for (; d + VW <= D; d += VW) gather_rows<1>(ptr, coef, count, d, out + d);
  }
  for (; d < D; ++d) {
    acc_t acc = 0;
    for (int64_t k = 0; k < count; ++k) acc += coef[k] * static_cast<acc_t>(ptr[k][d]);
    out[d] = static_cast<scalar_t>(acc);
  }
}

// The corners read by one (query nq, head m), scalar geometry: row pointers and weights
// (attention x bilinear), corners outside the map left out. Returns how many were listed.
template <typename scalar_t, typename acc_t>
UNIP_V2_INLINE int64_t list_corners(const ForwardArgs<scalar_t>& a, int64_t nq, int64_t m,
                                    const scalar_t** ptr, acc_t* coef) {
  const Problem& pb = a.pb;
  const int64_t row = pb.M * pb.D;
  const int64_t i0 = (nq * pb.M + m) * pb.L * pb.P;
  const scalar_t* base = a.value + (nq / pb.Lq) * pb.S * row + m * pb.D;
  int64_t count = 0;
  for (int64_t l = 0; l < pb.L; ++l) {
    const int64_t H = pb.shapes[2 * l], W = pb.shapes[2 * l + 1];
    const scalar_t* level = base + pb.starts[l] * row;
    for (int64_t p = 0; p < pb.P; ++p) {
      const int64_t i = i0 + l * pb.P + p;
      const auto s = locate<acc_t>(static_cast<acc_t>(a.loc[2 * i]),
                                   static_cast<acc_t>(a.loc[2 * i + 1]), H, W, row);
      if (!s.any) continue;
      const acc_t w = static_cast<acc_t>(a.attn[i]);
      for (int k = 0; k < 4; ++k) {
        if (!s.valid[k]) continue;
        ptr[count] = level + s.offset[k];
        coef[count] = w * s.weight[k];
        ++count;
      }
    }
  }
  return count;
}

// Whether the vectorised geometry may run: value offsets of one batch element (and the
// zero-row trick) fit in 32-bit lanes. UNIP_V2_CPU_SCALAR_GEOMETRY=1 turns it off, so tests
// can reach the scalar-geometry path that otherwise only tensors over 2^31 elements take.
UNIP_V2_INLINE bool use_lane_geometry(const Problem& pb) {
  static const bool disabled = [] {
    const char* v = std::getenv("UNIP_V2_CPU_SCALAR_GEOMETRY");
    return v != nullptr && std::string(v) == "1";
  }();
  return !disabled && pb.S * pb.M * pb.D + pb.M * pb.D < (int64_t(1) << 31);
}

// ---------------------------------------------------------------------------------------
// Vectorised geometry (fp32 / fp64, value offsets within 32 bits): kLanes samples at once,
// branch-free. Every sample gets all four corners; a corner outside the map gets weight 0
// and points at a row of zeros (not at some other pixel, so a NaN or inf in value cannot
// leak in through a zero weight).

constexpr int kLanes = 16;

template <typename T>
struct LaneTypes {
  typedef T real __attribute__((vector_size(kLanes * sizeof(T))));
  typedef int32_t i32 __attribute__((vector_size(kLanes * sizeof(int32_t))));
  typedef int64_t i64 __attribute__((vector_size(kLanes * sizeof(int64_t))));
  typedef decltype(real{} < real{}) mask;  // int32 lanes for float, int64 lanes for double
};

// Per-sample constants of one (query, head): the level of sample j = l * P + p. Padded to
// a multiple of kLanes; padding lanes have a 0 x 0 map, so they never read anything.
template <typename T>
struct LevelTable {
  std::vector<T> W, H;                  // map size, as T
  std::vector<int32_t> Wi, Hi, Wrow, base;  // map size, W * row, level start * row
  int64_t padded = 0;
  LevelTable(const Problem& pb) {
    const int64_t row = pb.M * pb.D, samples = pb.L * pb.P;
    padded = (samples + kLanes - 1) / kLanes * kLanes;
    W.assign(padded, T(0)); H.assign(padded, T(0));
    Wi.assign(padded, 0); Hi.assign(padded, 0); Wrow.assign(padded, 0); base.assign(padded, 0);
    for (int64_t j = 0; j < samples; ++j) {
      const int64_t l = j / pb.P, h = pb.shapes[2 * l], w = pb.shapes[2 * l + 1];
      W[j] = T(w); H[j] = T(h);
      Wi[j] = static_cast<int32_t>(w); Hi[j] = static_cast<int32_t>(h);
      Wrow[j] = static_cast<int32_t>(w * row);
      base[j] = static_cast<int32_t>(pb.starts[l] * row);
    }
  }
};

// Lane-wise select by a 0 / -1 mask, written with bitwise ops: GCC turns the vector ternary
// on 64-bit lanes into a per-lane scalar branch, this stays a few vector instructions.
template <typename V, typename M>
UNIP_V2_INLINE V blend(const M& mask, const V& yes, const V& no) {
  static_assert(sizeof(V) == sizeof(M), "mask and value vectors must have the same size");
  return (V)(((M)yes & mask) | ((M)no & ~mask));
}

template <typename V>
UNIP_V2_INLINE V vload_any(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// Corners of samples [j0, j0 + kLanes) of one (query, head) into ptr[4 * kLanes] and
// coef[4 * kLanes] (corner-major). loc: the (x, y) pairs of those samples; attn: their
// weights; n_valid: how many of the lanes are real samples (the rest are padding).
//
// The body is stamped out once per instruction set with that set's target attribute: GCC
// lowers generic vector comparisons for the target of the function they are written in,
// so a helper without the attribute gets scalar compares even when inlined into an
// AVX-512 caller (measured: 16 vcomiss + seta per comparison). Not always_inline: GCC
// refuses to force a callee with more target features into a default-target caller; one
// call per 16 samples costs nothing measurable.
#define UNIP_V2_CORNERS_OF_LANES(NAME, TARGET)                                                   \
  template <typename T>                                                                           \
  TARGET inline void NAME(const LevelTable<T>& lv, int64_t j0, const T* loc,                      \
                                  const T* attn, int64_t n_valid, const T* value_base,            \
                                  const T* zero_row, int64_t row, const T** ptr, T* coef)         \
{                                                                                                  \
  using LT = LaneTypes<T>;                                                                         \
  using real = typename LT::real;                                                                  \
  using i32 = typename LT::i32;                                                                    \
  using i64 = typename LT::i64;                                                                    \
  real lx{}, ly{}, aw{};                                                                                 \
  if (n_valid == kLanes) {                                                                         \
    const real even = vload_any<real>(loc), odd = vload_any<real>(loc + kLanes);                   \
    lx = __builtin_shufflevector(even, odd, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30); \
    ly = __builtin_shufflevector(even, odd, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31); \
    aw = vload_any<real>(attn);                                                                    \
  } else {                                                                                         \
    for (int j = 0; j < kLanes; ++j) {                                                             \
      lx[j] = j < n_valid ? loc[2 * j] : T(-8);                                                    \
      ly[j] = j < n_valid ? loc[2 * j + 1] : T(-8);                                                \
      aw[j] = j < n_valid ? attn[j] : T(0);                                                        \
    }                                                                                              \
  }                                                                                                \
  const real W = vload_any<real>(lv.W.data() + j0), H = vload_any<real>(lv.H.data() + j0);         \
/* grid_sample's unnormalisation, in the scalar path's order of operations. */                     \
  real x = (lx * T(2) - T(1) + T(1)) * (W * T(0.5)) - T(0.5);                                      \
  real y = (ly * T(2) - T(1) + T(1)) * (H * T(0.5)) - T(0.5);                                      \
  const auto any = (x > T(-1)) & (y > T(-1)) & (x < W) & (y < H);  /* NaN -> false */              \
  x = blend(any, x, real{} - T(2));  /* keep the integer conversion below in range */              \
  y = blend(any, y, real{} - T(2));                                                                \
/* floor by truncation, then one step down where truncation went up (negative x) */                \
  i32 x0 = __builtin_convertvector(x, i32), y0 = __builtin_convertvector(y, i32);                  \
  real xf = __builtin_convertvector(x0, real), yf = __builtin_convertvector(y0, real);             \
  const i32 x_up = __builtin_convertvector(xf > x, i32), y_up = __builtin_convertvector(yf > y, i32); \
  x0 += x_up;  /* mask lanes are -1 where true */                                                  \
  y0 += y_up;                                                                                      \
  xf = __builtin_convertvector(x0, real);                                                          \
  yf = __builtin_convertvector(y0, real);                                                          \
  const real fx = x - xf, fy = y - yf, gx = T(1) - fx, gy = T(1) - fy;                             \
  const i32 Wi = vload_any<i32>(lv.Wi.data() + j0), Hi = vload_any<i32>(lv.Hi.data() + j0);        \
  const i32 in = __builtin_convertvector(any, i32);                                                \
  const i32 x0_in = (x0 >= 0) & in, x1_in = (x0 + 1 < Wi) & in;                                    \
  const i32 y0_in = (y0 >= 0) & in, y1_in = (y0 + 1 < Hi) & in;                                    \
  const i32 valid[4] = {y0_in & x0_in, y0_in & x1_in, y1_in & x0_in, y1_in & x1_in};               \
  const real weight[4] = {gy * gx, gy * fx, fy * gx, fy * fx};                                     \
  const i32 o = y0 * vload_any<i32>(lv.Wrow.data() + j0) + x0 * static_cast<int32_t>(row) +        \
                vload_any<i32>(lv.base.data() + j0);                                               \
  const i32 step[4] = {i32{}, i32{} + static_cast<int32_t>(row),                                   \
                       vload_any<i32>(lv.Wrow.data() + j0),                                        \
                       vload_any<i32>(lv.Wrow.data() + j0) + static_cast<int32_t>(row)};           \
  const i64 value_addr = i64{} + reinterpret_cast<int64_t>(value_base);                            \
  const i64 zero_addr = i64{} + reinterpret_cast<int64_t>(zero_row);                               \
  for (int k = 0; k < 4; ++k) {                                                                    \
    const typename LT::mask ok = __builtin_convertvector(valid[k], typename LT::mask);             \
    const real c = blend(ok, aw * weight[k], real{});                                              \
    const i64 addr = value_addr + __builtin_convertvector(o + step[k], i64) *                      \
                                      static_cast<int64_t>(sizeof(T));                             \
    const i64 chosen = blend(__builtin_convertvector(valid[k], i64), addr, zero_addr);             \
    std::memcpy(ptr + k * kLanes, &chosen, sizeof(chosen));                                        \
    std::memcpy(coef + k * kLanes, &c, sizeof(c));                                                 \
  }                                                                                                \
}                                                                                                  \

UNIP_V2_CORNERS_OF_LANES(corners_of_lanes_default, )
#if UNIP_V2_X86_MULTIVERSION
UNIP_V2_CORNERS_OF_LANES(corners_of_lanes_avx2, UNIP_V2_TARGET_AVX2)
UNIP_V2_CORNERS_OF_LANES(corners_of_lanes_avx512, UNIP_V2_TARGET_AVX512)
#endif

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

template <Isa kIsa, typename T>
UNIP_V2_INLINE void corners_of_lanes(const LevelTable<T>& lv, int64_t j0, const T* loc,
                                     const T* attn, int64_t n_valid, const T* value_base,
                                     const T* zero_row, int64_t row, const T** ptr, T* coef) {
#if UNIP_V2_X86_MULTIVERSION
  if constexpr (kIsa == Isa::kAvx512) {
    return corners_of_lanes_avx512(lv, j0, loc, attn, n_valid, value_base, zero_row, row, ptr,
                                   coef);
  } else if constexpr (kIsa == Isa::kAvx2) {
    return corners_of_lanes_avx2(lv, j0, loc, attn, n_valid, value_base, zero_row, row, ptr,
                                 coef);
  }
#endif
  corners_of_lanes_default(lv, j0, loc, attn, n_valid, value_base, zero_row, row, ptr, coef);
}

// Forward with vectorised geometry; requires kVectorised (fp32 / fp64) and S * M * D < 2^31.
// Measured and dropped: prefetching the next step's rows (slower: the loop is bound by L1
// refills, which prefetches do not add), and sweeping head by head, in this layout or over
// a head-major copy of value (slower: strided location, weight and output streams).
template <Isa kIsa, typename T>
UNIP_V2_INLINE void forward_queries_lanes(const ForwardArgs<T>& a, int64_t begin, int64_t end) {
  const Problem& pb = a.pb;
  const int64_t row = pb.M * pb.D, samples = pb.L * pb.P;
  const LevelTable<T> lv(pb);
  const int64_t count = 4 * lv.padded;
  std::vector<const T*> ptr(count);
  std::vector<T> coef(count);
  std::vector<T> zero_row(pb.D + Vec<T>::width, T(0));
  for (int64_t nq = begin; nq < end; ++nq) {
    const T* value_n = a.value + (nq / pb.Lq) * pb.S * row;
    for (int64_t m = 0; m < pb.M; ++m) {
      const int64_t i0 = (nq * pb.M + m) * samples;
      for (int64_t j0 = 0; j0 < lv.padded; j0 += kLanes) {
        corners_of_lanes<kIsa>(lv, j0, a.loc + 2 * (i0 + j0), a.attn + i0 + j0,
                         std::min<int64_t>(kLanes, samples - j0), value_n + m * pb.D,
                         zero_row.data(), row, ptr.data() + 4 * j0, coef.data() + 4 * j0);
      }
      gather_channels(ptr.data(), coef.data(), count, pb.D, a.out + nq * row + m * pb.D);
    }
  }
}

template <Isa kIsa, typename scalar_t>
UNIP_V2_INLINE void forward_queries(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kVectorised<scalar_t, acc_t>) {
    if (use_lane_geometry(a.pb)) return forward_queries_lanes<kIsa>(a, begin, end);
  }
  // Scalar geometry: fp16 / bf16, or values too large for 32-bit offsets.
  const Problem& pb = a.pb;
  const int64_t row = pb.M * pb.D;  // value elements per position
  std::vector<const scalar_t*> ptr(4 * pb.L * pb.P);
  std::vector<acc_t> coef(4 * pb.L * pb.P);
  for (int64_t nq = begin; nq < end; ++nq) {
    for (int64_t m = 0; m < pb.M; ++m) {
      const int64_t count = list_corners(a, nq, m, ptr.data(), coef.data());
      gather_channels(ptr.data(), coef.data(), count, pb.D, a.out + nq * row + m * pb.D);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward.

template <typename scalar_t, typename grad_t>
struct BackwardArgs {
  Problem pb;
  const scalar_t* value;
  const scalar_t* loc;
  const scalar_t* attn;
  const scalar_t* grad_out;
  grad_t* grad_value;
  scalar_t* grad_loc;
  scalar_t* grad_attn;
};

// For one corner row v over channels [0, len): returns <g, v> and does gv += coef * g.
// Partial sums are kept per lane and reduced in a fixed order: the same bits on every run.
template <typename acc_t, typename scalar_t, typename grad_t>
UNIP_V2_INLINE acc_t dot_and_scatter(const acc_t* g, const scalar_t* v, grad_t* gv, acc_t coef,
                                     int64_t len) {
  int64_t d = 0;
  acc_t total = 0;
  if constexpr (kVectorised<scalar_t, acc_t> && std::is_same_v<grad_t, acc_t>) {
    using V = typename Vec<acc_t>::type;
    constexpr int64_t W = Vec<acc_t>::width;
    V part = V{};
    for (; d + W <= len; d += W) {
      const V gd = vload(g + d);
      part += gd * vload(v + d);
      vstore(gv + d, vload(gv + d) + coef * gd);
    }
    total = hsum<acc_t>(part);
  }
  for (; d < len; ++d) {
    total += g[d] * static_cast<acc_t>(v[d]);
    gv[d] = static_cast<grad_t>(static_cast<acc_t>(gv[d]) + coef * g[d]);
  }
  return total;
}

// Gradients of one sample from its four corner dot products dot[k] = <grad_out, corner row>
// (0 for corners outside the map): attention weight <grad_out, sample>, and the location,
// through the bilinear form's d/d(fx), d/d(fy) and pixel x = loc_x * W - 0.5.
template <typename scalar_t, typename acc_t>
UNIP_V2_INLINE void sample_gradients(const Sample<acc_t>& s, const acc_t* dot, acc_t w,
                                     int64_t H, int64_t W, scalar_t* grad_attn,
                                     scalar_t* grad_loc) {
  acc_t sampled = 0;
  for (int k = 0; k < 4; ++k) sampled += s.weight[k] * dot[k];
  *grad_attn = static_cast<scalar_t>(sampled);
  const acc_t d_fx = (dot[1] - dot[0]) * (acc_t(1) - s.fy) + (dot[3] - dot[2]) * s.fy;
  const acc_t d_fy = (dot[2] - dot[0]) * (acc_t(1) - s.fx) + (dot[3] - dot[1]) * s.fx;
  grad_loc[0] = static_cast<scalar_t>(w * d_fx * acc_t(W));
  grad_loc[1] = static_cast<scalar_t>(w * d_fy * acc_t(H));
}

// Ask for both ends of a row of `bytes` bytes (a head's channels span one or two lines).
// The backward's scatter measured faster with these; the forward's gather did not.
UNIP_V2_INLINE void prefetch_row(const void* p, int64_t bytes) {
  __builtin_prefetch(p);
  __builtin_prefetch(static_cast<const char*>(p) + bytes - 1);
}

// Where every sample of query nq, head m lands (offsets made relative to value[n, 0, m, 0]);
// prefetches the value and grad_value rows it will touch and the query's grad_output row.
template <typename scalar_t, typename grad_t, typename acc_t>
UNIP_V2_INLINE void locate_query(const BackwardArgs<scalar_t, grad_t>& a, int64_t nq, int64_t m,
                                 const scalar_t* value_nm, const grad_t* grad_value_nm,
                                 Sample<acc_t>* geo) {
  const Problem& pb = a.pb;
  const int64_t row = pb.M * pb.D;
  const int64_t i0 = (nq * pb.M + m) * pb.L * pb.P;
  prefetch_row(a.grad_out + nq * row + m * pb.D, pb.D * sizeof(scalar_t));
  for (int64_t l = 0; l < pb.L; ++l) {
    const int64_t H = pb.shapes[2 * l], W = pb.shapes[2 * l + 1];
    const int64_t level_base = pb.starts[l] * row;
    for (int64_t p = 0; p < pb.P; ++p) {
      const int64_t j = l * pb.P + p, i = i0 + j;
      Sample<acc_t>& s = geo[j];
      s = locate<acc_t>(static_cast<acc_t>(a.loc[2 * i]), static_cast<acc_t>(a.loc[2 * i + 1]), H,
                        W, row);
      if (!s.any) continue;
      for (int k = 0; k < 4; ++k) {
        s.offset[k] += level_base;
        if (!s.valid[k]) continue;
        prefetch_row(value_nm + s.offset[k], pb.D * sizeof(scalar_t));
        prefetch_row(grad_value_nm + s.offset[k], pb.D * sizeof(grad_t));
      }
    }
  }
}

// r[i] = sum of the 16 lanes of x[i], for 16 vectors at once: four rounds that each add
// the two halves of every lane group while merging vectors pairwise (a transpose-reduce).
// 15 adds and 30 shuffles instead of 16 separate reductions; fixed order.
// x: 16 consecutive 16-float vectors (no alignment needed).
UNIP_V2_INLINE Vec<float>::type reduce16(const float* x) {
  using V = Vec<float>::type;
  V y[8], z[4], u[2];
  for (int i = 0; i < 8; ++i) {
    const V a = vload(x + 32 * i), b = vload(x + 32 * i + 16);
    y[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  }
  for (int i = 0; i < 4; ++i) {
    z[i] = __builtin_shufflevector(y[2 * i], y[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(y[2 * i], y[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22,
                                   23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    u[i] = __builtin_shufflevector(z[2 * i], z[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(z[2 * i], z[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22,
                                   23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(u[0], u[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(u[0], u[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

// fp32 backward for D a multiple of 16: per (query, head) the 4 * L * P corner dot products
// are kept as 16-lane partial vectors and reduced 16 at a time (reduce16), instead of one
// horizontal sum per corner on the critical path.
UNIP_V2_INLINE void backward_heads_f32(const BackwardArgs<float, float>& a, int64_t begin,
                                       int64_t end) {
  using V = Vec<float>::type;
  constexpr int64_t VW = Vec<float>::width;  // 16
  const Problem& pb = a.pb;
  const int64_t row = pb.M * pb.D, samples = pb.L * pb.P, chunks = pb.D / VW;
  const int64_t n_parts = (4 * samples + VW - 1) / VW * VW;
  std::vector<Sample<float>> geo(2 * samples);
  // Plain float buffers (std::vector does not promise 64-byte alignment for vector types);
  // vload / vstore are unaligned.
  std::vector<float> part(n_parts * VW, 0.0f);  // 16-lane partial dot of every corner
  std::vector<float> g(pb.D);
  std::vector<float> dots(n_parts);
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / pb.M, m = nm % pb.M;
    const float* value_nm = a.value + n * pb.S * row + m * pb.D;
    float* grad_value_nm = a.grad_value + n * pb.S * row + m * pb.D;
    if (pb.Lq > 0) locate_query(a, n * pb.Lq, m, value_nm, grad_value_nm, geo.data());
    for (int64_t q = 0; q < pb.Lq; ++q) {
      const int64_t nq = n * pb.Lq + q;
      const Sample<float>* cur = geo.data() + (q & 1) * samples;
      if (q + 1 < pb.Lq) {
        locate_query(a, nq + 1, m, value_nm, grad_value_nm, geo.data() + ((q + 1) & 1) * samples);
      }
      const int64_t i0 = (nq * pb.M + m) * samples;
      const float* go = a.grad_out + nq * row + m * pb.D;
      std::memcpy(g.data(), go, pb.D * sizeof(float));
      // Scatter into grad_value and keep <g, corner row> as a 16-lane partial vector.
      for (int64_t j = 0; j < samples; ++j) {
        const Sample<float>& s = cur[j];
        const float w = s.any ? a.attn[i0 + j] : 0.0f;
        for (int k = 0; k < 4; ++k) {
          V acc = V{};
          if (s.any && s.valid[k]) {
            const float* v = value_nm + s.offset[k];
            float* gv = grad_value_nm + s.offset[k];
            const float coef = w * s.weight[k];
            for (int64_t c = 0; c < chunks; ++c) {
              const V gc = vload(g.data() + c * VW);
              acc += gc * vload(v + c * VW);
              vstore(gv + c * VW, vload(gv + c * VW) + coef * gc);
            }
          }
          vstore(part.data() + (4 * j + k) * VW, acc);
        }
      }
      for (int64_t b = 0; b < n_parts; b += VW) {
        vstore(dots.data() + b, reduce16(part.data() + b * VW));
      }
      for (int64_t l = 0; l < pb.L; ++l) {
        const int64_t H = pb.shapes[2 * l], W = pb.shapes[2 * l + 1];
        for (int64_t p = 0; p < pb.P; ++p) {
          const int64_t j = l * pb.P + p, i = i0 + j;
          if (!cur[j].any) continue;  // gradients stay zero
          sample_gradients(cur[j], dots.data() + 4 * j, a.attn[i], H, W, a.grad_attn + i,
                           a.grad_loc + 2 * i);
        }
      }
    }
  }
}

template <typename scalar_t, typename grad_t>
UNIP_V2_INLINE void backward_heads(const BackwardArgs<scalar_t, grad_t>& a, int64_t begin,
                                   int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Problem& pb = a.pb;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<grad_t, float>) {
    if (pb.D % Vec<float>::width == 0) return backward_heads_f32(a, begin, end);
  }
  const int64_t row = pb.M * pb.D;
  const int64_t samples = pb.L * pb.P;
  std::vector<acc_t> g(pb.D);  // grad_output row of this (query, head), in acc_t
  // Two sample lists: query q+1 is located (and its rows prefetched) before query q is
  // processed, so memory latency overlaps with arithmetic.
  std::vector<Sample<acc_t>> geo(2 * samples);
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / pb.M, m = nm % pb.M;
    const scalar_t* value_nm = a.value + n * pb.S * row + m * pb.D;
    grad_t* grad_value_nm = a.grad_value + n * pb.S * row + m * pb.D;
    if (pb.Lq > 0) locate_query(a, n * pb.Lq, m, value_nm, grad_value_nm, geo.data());
    for (int64_t q = 0; q < pb.Lq; ++q) {
      const int64_t nq = n * pb.Lq + q;
      const Sample<acc_t>* cur = geo.data() + (q & 1) * samples;
      if (q + 1 < pb.Lq) {
        locate_query(a, nq + 1, m, value_nm, grad_value_nm,
                     geo.data() + ((q + 1) & 1) * samples);
      }
      const int64_t i0 = (nq * pb.M + m) * samples;
      const scalar_t* go = a.grad_out + nq * row + m * pb.D;
      for (int64_t d = 0; d < pb.D; ++d) g[d] = static_cast<acc_t>(go[d]);
      for (int64_t l = 0; l < pb.L; ++l) {
        const int64_t H = pb.shapes[2 * l], W = pb.shapes[2 * l + 1];
        for (int64_t p = 0; p < pb.P; ++p) {
          const int64_t j = l * pb.P + p, i = i0 + j;
          const Sample<acc_t>& s = cur[j];
          if (!s.any) continue;  // gradients stay zero
          const acc_t w = static_cast<acc_t>(a.attn[i]);
          acc_t corner_dot[4] = {0, 0, 0, 0};  // <grad_out, value at corner>
          for (int k = 0; k < 4; ++k) {
            if (!s.valid[k]) continue;
            corner_dot[k] = dot_and_scatter(g.data(), value_nm + s.offset[k],
                                            grad_value_nm + s.offset[k], w * s.weight[k], pb.D);
          }
          sample_gradients(s, corner_dot, w, H, W, a.grad_attn + i, a.grad_loc + 2 * i);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Instruction-set dispatch.

Isa detect_isa() {
  Isa best = Isa::kDefault;
#if UNIP_V2_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
    best = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = Isa::kAvx2;
  }
#endif
  if (const char* cap = std::getenv("UNIP_V2_CPU_ISA")) {
    const std::string c(cap);
    Isa want = c == "default" ? Isa::kDefault
               : c == "avx2"  ? Isa::kAvx2
               : c == "avx512" ? Isa::kAvx512
                               : best;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

template <typename scalar_t>
void forward_default(const ForwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  forward_queries<Isa::kDefault>(a, b, e);
}
template <typename scalar_t, typename grad_t>
void backward_default(const BackwardArgs<scalar_t, grad_t>& a, int64_t b, int64_t e) {
  backward_heads(a, b, e);
}
#if UNIP_V2_X86_MULTIVERSION
template <typename scalar_t>
UNIP_V2_TARGET_AVX2 void forward_avx2(const ForwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  forward_queries<Isa::kAvx2>(a, b, e);
}
template <typename scalar_t>
UNIP_V2_TARGET_AVX512 void forward_avx512(const ForwardArgs<scalar_t>& a, int64_t b, int64_t e) {
  forward_queries<Isa::kAvx512>(a, b, e);
}
template <typename scalar_t, typename grad_t>
UNIP_V2_TARGET_AVX2 void backward_avx2(const BackwardArgs<scalar_t, grad_t>& a, int64_t b,
                                       int64_t e) {
  backward_heads(a, b, e);
}
template <typename scalar_t, typename grad_t>
UNIP_V2_TARGET_AVX512 void backward_avx512(const BackwardArgs<scalar_t, grad_t>& a, int64_t b,
                                           int64_t e) {
  backward_heads(a, b, e);
}
#endif

template <typename scalar_t>
void run_forward(const ForwardArgs<scalar_t>& a, int64_t b, int64_t e) {
#if UNIP_V2_X86_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512: return forward_avx512(a, b, e);
    case Isa::kAvx2: return forward_avx2(a, b, e);
    default: break;
  }
#endif
  forward_default(a, b, e);
}

template <typename scalar_t, typename grad_t>
void run_backward(const BackwardArgs<scalar_t, grad_t>& a, int64_t b, int64_t e) {
#if UNIP_V2_X86_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512: return backward_avx512(a, b, e);
    case Isa::kAvx2: return backward_avx2(a, b, e);
    default: break;
  }
#endif
  backward_default(a, b, e);
}

// ---------------------------------------------------------------------------------------

// The kernels index value rows through these numbers, so they are checked where they are
// read anyway: a bad level_start_index is an error, never an out-of-bounds read.
Problem make_problem(const at::Tensor& value, const at::Tensor& spatial_shapes,
                     const at::Tensor& level_start_index, const at::Tensor& sampling_locations) {
  Problem pb{value.size(0),
             value.size(1),
             value.size(2),
             value.size(3),
             sampling_locations.size(1),
             sampling_locations.size(3),
             sampling_locations.size(4),
             spatial_shapes.data_ptr<int64_t>(),
             level_start_index.data_ptr<int64_t>()};
  int64_t total = 0;
  for (int64_t l = 0; l < pb.L; ++l) {
    const int64_t H = pb.shapes[2 * l], W = pb.shapes[2 * l + 1];
    TORCH_CHECK(H >= 0 && W >= 0, "ms_deform_attn: spatial_shapes[", l, "] = (", H, ", ", W,
                ") is negative");
    TORCH_CHECK(pb.starts[l] == total, "ms_deform_attn: level_start_index[", l, "] = ",
                pb.starts[l], " but the levels before it hold ", total, " positions");
    total += H * W;
  }
  TORCH_CHECK(total == pb.S, "ms_deform_attn: spatial_shapes hold ", total,
              " positions but value has S = ", pb.S);
  return pb;
}

}  // namespace

std::string ms_deform_attn_cpu_isa() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value,
                                      const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Problem pb = make_problem(value, spatial_shapes, level_start_index, sampling_locations);
  auto out = at::empty({pb.N, pb.Lq, pb.M * pb.D}, value.options());  // fully written below
  if (out.numel() == 0) return out;
  // 32 queries per task: small scheduling overhead, still balanced at decoder sizes.
  constexpr int64_t grain = 32;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
        const ForwardArgs<scalar_t> args{pb, value.data_ptr<scalar_t>(),
                                         sampling_locations.data_ptr<scalar_t>(),
                                         attention_weights.data_ptr<scalar_t>(),
                                         out.data_ptr<scalar_t>()};
        at::parallel_for(0, pb.N * pb.Lq, grain, [&](int64_t begin, int64_t end) {
          run_forward(args, begin, end);
        });
      });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output) {
  const Problem pb = make_problem(value, spatial_shapes, level_start_index, sampling_locations);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attn = at::zeros_like(attention_weights);
  // fp16/bf16 scatter into an fp32 buffer, cast once at the end.
  const bool reduced = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  auto grad_value = at::zeros_like(value, reduced ? value.options().dtype(at::kFloat)
                                                  : value.options());
  if (pb.N * pb.Lq * pb.M * pb.D > 0 && value.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
          using grad_t = at::opmath_type<scalar_t>;
          const BackwardArgs<scalar_t, grad_t> args{
              pb,
              value.data_ptr<scalar_t>(),
              sampling_locations.data_ptr<scalar_t>(),
              attention_weights.data_ptr<scalar_t>(),
              grad_output.data_ptr<scalar_t>(),
              grad_value.data_ptr<grad_t>(),
              grad_loc.data_ptr<scalar_t>(),
              grad_attn.data_ptr<scalar_t>()};
          at::parallel_for(0, pb.N * pb.M, 1, [&](int64_t begin, int64_t end) {
            run_backward(args, begin, end);
          });
        });
  }
  if (reduced) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace unip_v2
