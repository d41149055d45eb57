// CPU kernels of multi-scale deformable attention, written once and compiled once per
// instruction set by the files next to this one (ms_deform_attn_cpu_{default,avx2,avx512}.cpp,
// each with its own compiler flags; see setup.py), as PyTorch builds its own CPU kernels. The
// AVX2 and AVX-512 builds use ATen's at::vec::Vectorized, a native register of the target
// (8 and 16 fp32 lanes); the baseline build uses the 16-byte vector type below (SSE2 on
// x86-64, NEON on Arm), since at::vec's generic fallback keeps its lanes in memory.
//
// Before this split the kernels used 64-byte GCC vector types in functions with per-ISA target
// attributes; on a 256-bit target GCC lowered every such vector through the stack (2,800 of the
// 5,200 instructions of the AVX2 forward addressed the stack), which made the AVX2 and baseline
// paths about 10x slower than AVX-512.
//
// Per (query, head) a kernel first locates the L * P samples (geometry), then runs over the D
// channels of the 4 * L * P bilinear corners:
//   geometry   fp32 with byte offsets within 32 bits (AVX2 / AVX-512 builds): a vector of
//              samples at a time, branch-free, row addresses formed in 64-bit lanes; otherwise
//              (fp64, fp16, bf16, the baseline build, values over 2 GB) one sample at a time.
//              Both write the same corner-major arrays (Scratch in ms_deform_attn_cpu_kernels.h):
//              each corner's row address and coefficient; a corner outside the map reads a row
//              of zeros, so a NaN or inf in value cannot leak in through a zero weight.
//   forward    out[0:D] = sum over corners of coef * row, in blocks of up to 4 vectors, the
//              four corners of a sample in different accumulator sets so consecutive FMAs do
//              not wait on each other.
//   backward   per corner, dot = <grad_out, row> (kept as a vector of partial sums) and
//              grad_value row += coef * grad_out; the partial sums of a block of corners are
//              reduced together by a deinterleave-and-add tree; then the samples' gradients,
//              a vector of samples at a time.
// Channels beyond the last full vector run as one masked vector on AVX-512, else one at a time.
// Every sum runs in a fixed order: results are the same on every run and thread count.
//
// Everything here except the entry points has internal linkage (anonymous namespace) and
// at::vec lives in a per-target inline namespace (CPU_CAPABILITY), so no function compiled for
// a wider target can replace a baseline one at link time (tests/test_ms_deform_attn_op.py
// checks the built library for AVX code outside the AVX builds).
#include "../ms_deform_attn_cpu_kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <type_traits>

#ifndef UNIP_V2_CPU_KERNELS
#error "define UNIP_V2_CPU_KERNELS (the namespace of this build) before including this file"
#endif

namespace unip_v2 {
namespace cpu {
namespace UNIP_V2_CPU_KERNELS {
namespace {

#if defined(CPU_CAPABILITY_DEFAULT) && defined(__GNUC__)
// The baseline build: at::vec's generic Vectorized keeps its lanes in a std::array and went
// through memory on every operation (measured: the baseline forward took 23 ms where this type
// takes under 10 at encoder 512 px). This is the subset the kernels use, on 16-byte GCC vectors:
// SSE2 on x86-64, NEON on Arm. The geometry runs one sample at a time here (kLaneGeometry).
template <typename T>
struct Vectorized {
  typedef T raw __attribute__((vector_size(16)));
  raw v;
  static constexpr int64_t size() { return 16 / sizeof(T); }
  Vectorized() = default;
  explicit Vectorized(T x) : v(raw{} + x) {}
  static Vectorized of(raw r) {
    Vectorized x;
    x.v = r;
    return x;
  }
  static Vectorized loadu(const void* p) {
    Vectorized r;
    std::memcpy(&r.v, p, sizeof(raw));
    return r;
  }
  void store(void* p) const { std::memcpy(p, &v, sizeof(raw)); }
  void store(void* p, int64_t count) const { std::memcpy(p, &v, count * sizeof(T)); }
  friend Vectorized operator+(const Vectorized& a, const Vectorized& b) { return of(a.v + b.v); }
  friend Vectorized operator-(const Vectorized& a, const Vectorized& b) { return of(a.v - b.v); }
  friend Vectorized operator*(const Vectorized& a, const Vectorized& b) { return of(a.v * b.v); }
};

template <typename T>
inline Vectorized<T> fmadd(const Vectorized<T>& a, const Vectorized<T>& b,
                           const Vectorized<T>& c) {
  return Vectorized<T>::of(a.v * b.v + c.v);
}

// (a0, b0, a1, b1), (a2, b2, a3, b3) -> (a0..a3), (b0..b3); two lanes for fp64.
template <typename T>
inline std::pair<Vectorized<T>, Vectorized<T>> deinterleave2(const Vectorized<T>& x,
                                                             const Vectorized<T>& y) {
  using V = Vectorized<T>;
  if constexpr (Vectorized<T>::size() == 4) {
    return {V::of(__builtin_shufflevector(x.v, y.v, 0, 2, 4, 6)),
            V::of(__builtin_shufflevector(x.v, y.v, 1, 3, 5, 7))};
  } else {
    return {V::of(__builtin_shufflevector(x.v, y.v, 0, 2)), V::of(__builtin_shufflevector(x.v, y.v, 1, 3))};
  }
}

// The inverse of deinterleave2.
template <typename T>
inline std::pair<Vectorized<T>, Vectorized<T>> interleave2(const Vectorized<T>& a,
                                                           const Vectorized<T>& b) {
  using V = Vectorized<T>;
  if constexpr (Vectorized<T>::size() == 4) {
    return {V::of(__builtin_shufflevector(a.v, b.v, 0, 4, 1, 5)),
            V::of(__builtin_shufflevector(a.v, b.v, 2, 6, 3, 7))};
  } else {
    return {V::of(__builtin_shufflevector(a.v, b.v, 0, 2)), V::of(__builtin_shufflevector(a.v, b.v, 1, 3))};
  }
}

constexpr bool kLaneGeometry = false;
#else
using at::vec::Vectorized;
using at::vec::deinterleave2;
using at::vec::fmadd;
using at::vec::interleave2;
constexpr bool kLaneGeometry = true;  // fp32 geometry a vector of samples at a time
#endif

// Channels left over after the full vectors (D % lanes) run as one masked vector where masked
// loads and stores are single instructions (AVX-512), else one channel at a time.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kMaskedTail = true;
#else
constexpr bool kMaskedTail = false;
#endif

// fp32 / fp64 run the vector channel loops; fp16 / bf16 accumulate in fp32 one channel at a time.
template <typename scalar_t>
constexpr bool kVectorised = std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;

template <typename T>
T* as(void* p) {
  return static_cast<T*>(p);
}

// ---------------------------------------------------------------------------------------
// Geometry.

// The level of every sample j = l * P + p, in the arrays the geometry reads (padding lanes get
// a 0 x 0 map, so they never read anything):
//   level_real  W, H as acc_t (lanes geometry: then W / 2, H / 2, fp32 fitting the same bytes);
//   level_int   64-bit geometry: W, H, W * row, start * row (int64, elements);
//               lanes geometry: W, H, W * row (int32, bytes), one unused int32 row, then
//               start * row and W * row as int64 (bytes), the per-corner address steps.
template <typename acc_t, bool kLanes>
void fill_level_table(const Problem& pb, const Scratch& s) {
  const int64_t unit = kLanes ? static_cast<int64_t>(sizeof(float)) : 1;
  const int64_t row = pb.M * pb.D * unit, samples = pb.L * pb.P, n = s.padded;
  acc_t* real = as<acc_t>(s.level_real);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t l = j < samples ? j / pb.P : -1;
    const int64_t H = l >= 0 ? pb.shapes[2 * l] : 0, W = l >= 0 ? pb.shapes[2 * l + 1] : 0;
    const int64_t base = l >= 0 ? pb.starts[l] * row : 0;
    real[j] = static_cast<acc_t>(W);
    real[n + j] = static_cast<acc_t>(H);
    if constexpr (kLanes) {
      real[2 * n + j] = static_cast<acc_t>(W) * acc_t(0.5);
      real[3 * n + j] = static_cast<acc_t>(H) * acc_t(0.5);
      int32_t* in = as<int32_t>(s.level_int);
      int64_t* steps = as<int64_t>(s.level_int) + 2 * n;
      in[j] = static_cast<int32_t>(W);
      in[n + j] = static_cast<int32_t>(H);
      in[2 * n + j] = static_cast<int32_t>(W * row);
      in[3 * n + j] = 0;
      steps[j] = base;
      steps[n + j] = W * row;
    } else {
      int64_t* in = as<int64_t>(s.level_int);
      in[j] = W;
      in[n + j] = H;
      in[2 * n + j] = W * row;
      in[3 * n + j] = base;
    }
  }
}

// One sample at a time (any dtype, 64-bit offsets). loc: the (x, y) pairs of the L * P samples
// of one (query, head); attn: their attention weights; value: value[n, 0, m, 0].
template <bool kBackward, typename scalar_t>
void locate_scalar(const Problem& pb, const Scratch& s, const scalar_t* loc, const scalar_t* attn,
                   const scalar_t* value) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = pb.M * pb.D, samples = pb.L * pb.P, n = s.padded;
  const acc_t* Wr = as<acc_t>(s.level_real);
  const int64_t* Wrow = as<int64_t>(s.level_int) + 2 * n;
  const int64_t* base = as<int64_t>(s.level_int) + 3 * n;
  const scalar_t* zero = as<scalar_t>(s.zero_row);
  int64_t* rows = as<int64_t>(s.row);
  acc_t* coef = as<acc_t>(s.coef);
  acc_t* frac = as<acc_t>(s.frac);
  acc_t* weight = as<acc_t>(s.weight);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t W = Wr[j], H = Wr[n + j];
    const acc_t lx = j < samples ? static_cast<acc_t>(loc[2 * j]) : acc_t(0);
    const acc_t ly = j < samples ? static_cast<acc_t>(loc[2 * j + 1]) : acc_t(0);
    // grid_sample's unnormalisation for align_corners=False in its own order of operations,
    // g = 2 * loc - 1 then (g + 1) * (size / 2) - 0.5, so that fp32 coordinates agree with
    // the reference to the last bit: at an integer coordinate (where sampling points start,
    // at Deformable DETR's initialisation) bilinear interpolation has only one-sided
    // derivatives, and the rounding decides which one the location gradient takes.
    const acc_t x = (lx * acc_t(2) - acc_t(1) + acc_t(1)) * (W * acc_t(0.5)) - acc_t(0.5);
    const acc_t y = (ly * acc_t(2) - acc_t(1) + acc_t(1)) * (H * acc_t(0.5)) - acc_t(0.5);
    // Written so that NaN fails the test: a NaN location reads nothing.
    const bool any = x > acc_t(-1) && y > acc_t(-1) && x < W && y < H;
    if (!any) {
      for (int k = 0; k < 4; ++k) {
        rows[k * n + j] = reinterpret_cast<int64_t>(zero);
        coef[k * n + j] = acc_t(0);
      }
      if constexpr (kBackward) frac[j] = frac[n + j] = weight[j] = acc_t(0);
      continue;
    }
    const acc_t xf = std::floor(x), yf = std::floor(y);
    const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
    const acc_t fx = x - xf, fy = y - yf, gx = acc_t(1) - fx, gy = acc_t(1) - fy;
    // x > -1 and x < W give -1 <= x0 <= W - 1: one bound to check per corner
    const bool x0_in = x0 >= 0, x1_in = x0 + 1 < static_cast<int64_t>(W);
    const bool y0_in = y0 >= 0, y1_in = y0 + 1 < static_cast<int64_t>(H);
    const bool valid[4] = {y0_in && x0_in, y0_in && x1_in, y1_in && x0_in, y1_in && x1_in};
    const acc_t bilinear[4] = {gy * gx, gy * fx, fy * gx, fy * fx};
    const int64_t o = y0 * Wrow[j] + x0 * row + base[j];
    const int64_t step[4] = {0, row, Wrow[j], Wrow[j] + row};
    const acc_t w = static_cast<acc_t>(attn[j]);
    for (int k = 0; k < 4; ++k) {
      rows[k * n + j] = reinterpret_cast<int64_t>(valid[k] ? value + o + step[k] : zero);
      coef[k * n + j] = valid[k] ? w * bilinear[k] : acc_t(0);
    }
    if constexpr (kBackward) {  // what the sample gradients read
      frac[j] = fx;
      frac[n + j] = fy;
      weight[j] = w;
    }
  }
}

#if !(defined(CPU_CAPABILITY_DEFAULT) && defined(__GNUC__))
// A vector of samples at a time (fp32, byte offsets within 32 bits), branch-free, the same
// arithmetic as locate_scalar. A sample that reads nothing is moved to x = y = -2, which leaves
// every one of its corners outside the map. A corner's row address is formed in 64-bit lanes:
// the first corner's from its 32-bit offset within the level, the others by adding the level's
// steps (one row right, one image row down).
// kBackward (a tag, so that builds without this function still parse the calls, whose
// arguments are then dependent): also store what the sample gradients read.
template <bool kBackward>
void locate_lanes(std::bool_constant<kBackward>, const Problem& pb, const Scratch& s,
                  const float* loc, const float* attn, const float* value) {
  using fV = Vectorized<float>;
  using iV = Vectorized<int32_t>;
  using lV = Vectorized<int64_t>;
  constexpr int64_t VW = fV::size(), HW = VW / 2;
  static_assert(iV::size() == VW && lV::size() == HW, "lane counts of fp32/int32/int64");
  static_assert(kMaxLanes % VW == 0, "Scratch.padded must be a multiple of the lane count");
  const int64_t samples = pb.L * pb.P, n = s.padded;
  const int32_t row = static_cast<int32_t>(pb.M * pb.D * sizeof(float));  // bytes
  const float* Wr = as<float>(s.level_real);
  const int32_t* in = as<int32_t>(s.level_int);
  const int64_t* steps = as<int64_t>(s.level_int) + 2 * n;  // level start, W * row (bytes)
  int64_t* rows = as<int64_t>(s.row);
  float* coef = as<float>(s.coef);
  const fV half(0.5f);
  const lV value_addr(reinterpret_cast<int64_t>(value));
  const lV zero_addr(reinterpret_cast<int64_t>(s.zero_row));
  const lV row64(static_cast<int64_t>(row));
  for (int64_t j0 = 0; j0 < n; j0 += VW) {
    const int64_t real = std::min<int64_t>(VW, std::max<int64_t>(samples - j0, 0));
    fV lx(0.0f), ly(0.0f), aw(0.0f);  // padding lanes: W = H = 0 keeps every corner out
    if (real == VW) {
      std::tie(lx, ly) = deinterleave2(fV::loadu(loc + 2 * j0), fV::loadu(loc + 2 * j0 + VW));
      aw = fV::loadu(attn + j0);
    } else if (real > 0) {
      const int64_t lo = std::min<int64_t>(2 * real, VW), hi = 2 * real - lo;
      std::tie(lx, ly) = deinterleave2(
          fV::loadu(loc + 2 * j0, lo), hi > 0 ? fV::loadu(loc + 2 * j0 + VW, hi) : fV(0.0f));
      aw = fV::loadu(attn + j0, real);
    }
    const fV W = fV::loadu(Wr + j0), H = fV::loadu(Wr + n + j0);
    // as locate_scalar: grid_sample's order of operations (W / 2 and H / 2 from the table)
    const fV one(1.0f), two(2.0f);
    fV x = (lx * two - one + one) * fV::loadu(Wr + 2 * n + j0) - half;
    fV y = (ly * two - one + one) * fV::loadu(Wr + 3 * n + j0) - half;
    const fV any = (x > fV(-1.0f)) & (y > fV(-1.0f)) & (x < W) & (y < H);  // NaN -> false
    x = fV::blendv(fV(-2.0f), x, any);
    y = fV::blendv(fV(-2.0f), y, any);
    const fV xf = x.floor(), yf = y.floor();
    const fV fx = x - xf, fy = y - yf, gx = one - fx, gy = one - fy;
    const iV x0 = at::vec::convert_to_int_of_same_size(xf);
    const iV y0 = at::vec::convert_to_int_of_same_size(yf);
    const iV Wi = iV::loadu(in + j0), Hi = iV::loadu(in + n + j0);
    // after the move to -2: x0 >= -1 holds exactly for samples that read something
    const iV x0_in = x0 >= iV(0), x1_in = (x0 >= iV(-1)) & (x0 + iV(1) < Wi);
    const iV y0_in = y0 >= iV(0), y1_in = (y0 >= iV(-1)) & (y0 + iV(1) < Hi);
    const iV valid[4] = {y0_in & x0_in, y0_in & x1_in, y1_in & x0_in, y1_in & x1_in};
    const fV bilinear[4] = {gy * gx, gy * fx, fy * gx, fy * fx};
    const iV o = y0 * iV::loadu(in + 2 * n + j0) + x0 * iV(row);  // first corner, in the level
    const auto o64 = at::vec::convert<int64_t, 2, int32_t, 1>(o);
    for (int h = 0; h < 2; ++h) {
      const int64_t jh = j0 + h * HW;
      const lV first = value_addr + lV::loadu(steps + jh) + o64[h];
      const lV down = lV::loadu(steps + n + jh);
      const lV addr[4] = {first, first + row64, first + down, first + down + row64};
      for (int k = 0; k < 4; ++k) {
        const auto ok = at::vec::convert<int64_t, 2, int32_t, 1>(valid[k]);
        lV::blendv(zero_addr, addr[k], ok[h]).store(rows + k * n + jh);
      }
    }
    for (int k = 0; k < 4; ++k) {
      ((aw * bilinear[k]) & at::vec::cast<float>(valid[k])).store(coef + k * n + j0);
    }
    if constexpr (kBackward) {  // what the sample gradients read
      fx.store(as<float>(s.frac) + j0);
      fy.store(as<float>(s.frac) + n + j0);
      (aw & any).store(as<float>(s.weight) + j0);
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------
// Forward.

// out[d : d + NV * VW] = sum over samples j and corners c of coef * row[d : d + NV * VW]. The
// four corners of a sample go to different accumulator sets (two sets when the block is wide),
// so 8 or more independent FMA chains are in flight; the sets are added in a fixed order.
template <int NV, typename T>
inline void gather_block(const int64_t* rows, const T* coef, int64_t n, int64_t samples,
                         int64_t d, T* out, int64_t rem = 0) {
  // rem > 0 (kMaskedTail only): a single vector of which only the first rem lanes are channels
  using V = Vectorized<T>;
  constexpr int64_t VW = V::size();
  constexpr int kSets = NV >= 3 ? 2 : 4;
  V acc[kSets][NV];
  for (int r = 0; r < kSets; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V(T(0));
  for (int64_t j = 0; j < samples; ++j) {
    for (int c = 0; c < 4; ++c) {
      const T* p = reinterpret_cast<const T*>(rows[c * n + j]) + d;
      const V w(coef[c * n + j]);
      for (int v = 0; v < NV; ++v) {
        V x;
        if constexpr (kMaskedTail && NV == 1) {
          x = rem > 0 ? V::loadu(p, rem) : V::loadu(p);
        } else {
          x = V::loadu(p + v * VW);
        }
        acc[c % kSets][v] = fmadd(w, x, acc[c % kSets][v]);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    V total = acc[0][v];
    for (int r = 1; r < kSets; ++r) total = total + acc[r][v];
    if constexpr (kMaskedTail && NV == 1) {
      if (rem > 0) {
        total.store(out + d, rem);
        return;
      }
    }
    total.store(out + d + v * VW);
  }
}

template <typename scalar_t>
void gather(const Problem& pb, const Scratch& s, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = s.padded, samples = pb.L * pb.P, D = pb.D;
  const int64_t* rows = as<int64_t>(s.row);
  const acc_t* coef = as<acc_t>(s.coef);
  int64_t d = 0;
  if constexpr (kVectorised<scalar_t>) {
    constexpr int64_t VW = Vectorized<scalar_t>::size();
    for (; d + 4 * VW <= D; d += 4 * VW) gather_block<4>(rows, coef, n, samples, d, out);
    switch ((D - d) / VW) {
      case 3: gather_block<3>(rows, coef, n, samples, d, out); d += 3 * VW; break;
      case 2: gather_block<2>(rows, coef, n, samples, d, out); d += 2 * VW; break;
      case 1: gather_block<1>(rows, coef, n, samples, d, out); d += VW; break;
      default: break;
    }
    if constexpr (kMaskedTail) {
      if (d < D) {
        gather_block<1>(rows, coef, n, samples, d, out, D - d);
        d = D;
      }
    }
  }
  for (; d < D; ++d) {  // the channels left over (all of them for fp16 / bf16)
    acc_t acc = 0;
    for (int64_t j = 0; j < samples; ++j) {
      for (int c = 0; c < 4; ++c) {
        const scalar_t* p = reinterpret_cast<const scalar_t*>(rows[c * n + j]);
        acc += coef[c * n + j] * static_cast<acc_t>(p[d]);
      }
    }
    out[d] = static_cast<scalar_t>(acc);
  }
}

// Whether any of the `count` attention weights is inf or NaN.
template <typename scalar_t>
bool any_nonfinite(const scalar_t* attn, int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  bool bad = false;
  for (int64_t j = 0; j < count; ++j) bad |= !std::isfinite(static_cast<acc_t>(attn[j]));
  return bad;
}

// The output of one (query, head) in the definition's order of products, weight times the
// bilinear sample: out[d] = sum_j w_j * (sum_k b_jk * row_jk[d]), a sample that reads nothing
// being 0. The fast path folds the weight into each corner's coefficient, (w_j * b_jk) * row,
// which is the same number for finite weights (up to rounding) but not in IEEE arithmetic for
// an infinite or NaN weight: inf * b_jk is NaN for a corner of bilinear weight 0, where the
// reference's inf * (sum of the corners) is +-inf; and a sample outside the map contributes
// nothing instead of the reference's inf * 0 = NaN. So a (query, head) with such a weight
// (rare; found by any_nonfinite) takes this slower loop, and the compiled and reference
// backends agree on inf / NaN outputs. The order of the sum over samples does not matter
// here: once a term is non-finite, the result (+-inf or NaN) is the same in any order.
template <typename scalar_t, bool kLanes>
void gather_nonfinite_weights(const Problem& pb, const Scratch& s, const scalar_t* loc,
                              const scalar_t* attn, const scalar_t* value, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = s.padded, samples = pb.L * pb.P;
  // The geometry with unit weights gives the bare bilinear weights b_jk as coefficients. The
  // forward geometry does not use s.weight (padded * 8 bytes), so it holds the ones.
  scalar_t* ones = as<scalar_t>(s.weight);
  std::fill(ones, ones + samples, scalar_t(1));
  if constexpr (kLanes && kLaneGeometry) {
    locate_lanes(std::false_type{}, pb, s, loc, ones, value);
  } else {
    locate_scalar<false>(pb, s, loc, ones, value);
  }
  const int64_t* rows = as<int64_t>(s.row);
  const acc_t* bilinear = as<acc_t>(s.coef);
  for (int64_t d = 0; d < pb.D; ++d) {
    acc_t acc = 0;
    for (int64_t j = 0; j < samples; ++j) {
      acc_t sampled = 0;
      for (int k = 0; k < 4; ++k) {
        const scalar_t* p = reinterpret_cast<const scalar_t*>(rows[k * n + j]);
        sampled += bilinear[k * n + j] * static_cast<acc_t>(p[d]);
      }
      acc += static_cast<acc_t>(attn[j]) * sampled;
    }
    out[d] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, bool kLanes>
void forward_queries(const ForwardArgs<scalar_t>& a, const Scratch& s, int64_t begin,
                     int64_t end) {
  const Problem& pb = a.pb;
  const int64_t row = pb.M * pb.D, samples = pb.L * pb.P;
  for (int64_t nq = begin; nq < end; ++nq) {
    const scalar_t* value_n = a.value + (nq / pb.Lq) * pb.S * row;
    for (int64_t m = 0; m < pb.M; ++m) {
      const int64_t i0 = (nq * pb.M + m) * samples;
      scalar_t* out = a.out + nq * row + m * pb.D;
      if (any_nonfinite(a.attn + i0, samples)) {
        gather_nonfinite_weights<scalar_t, kLanes>(pb, s, a.loc + 2 * i0, a.attn + i0,
                                                   value_n + m * pb.D, out);
        continue;
      }
      if constexpr (kLanes && kLaneGeometry) {
        locate_lanes(std::false_type{}, pb, s, a.loc + 2 * i0, a.attn + i0, value_n + m * pb.D);
      } else {
        locate_scalar<false>(pb, s, a.loc + 2 * i0, a.attn + i0, value_n + m * pb.D);
      }
      gather(pb, s, out);
    }
  }
}

template <typename scalar_t>
void forward_impl(const ForwardArgs<scalar_t>& a, const Scratch& s, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::memset(s.zero_row, 0, a.pb.D * sizeof(scalar_t));
  if constexpr (std::is_same_v<scalar_t, float> && kLaneGeometry) {
    if (a.lane_geometry) {
      fill_level_table<float, true>(a.pb, s);
      return forward_queries<float, true>(a, s, begin, end);
    }
  }
  fill_level_table<acc_t, false>(a.pb, s);
  forward_queries<scalar_t, false>(a, s, begin, end);
}

// ---------------------------------------------------------------------------------------
// Backward.

// For the channels [d, d + NV * VW) of every corner k: partial[k] (+)= g * row_k lane-wise (the
// dot product before its lanes are summed) and grad_row_k += coef[k] * g. The grad_output block
// stays in registers across corners. `first`: the first block of channels starts the partials.
template <int NV, typename T>
inline void dot_scatter_block(const int64_t* rows, const T* coef, int64_t count, const T* zero,
                              const T* value, T* grad_value, const T* g, int64_t d, bool first,
                              T* partial, int64_t rem = 0) {
  // rem > 0 (kMaskedTail only): a single vector of which only the first rem lanes are channels;
  // the lanes beyond hold zeros in g, so they add nothing to the dot products.
  using V = Vectorized<T>;
  constexpr int64_t VW = V::size();
  V gv[NV];
  for (int v = 0; v < NV; ++v) {
    if constexpr (kMaskedTail && NV == 1) {
      gv[v] = rem > 0 ? V::loadu(g + d, rem) : V::loadu(g + d);
    } else {
      gv[v] = V::loadu(g + d + v * VW);
    }
  }
  for (int64_t k = 0; k < count; ++k) {
    const T* p = reinterpret_cast<const T*>(rows[k]);
    V acc = first ? V(T(0)) : V::loadu(partial + k * VW);
    if (p != zero) {  // corners outside the map read zeros: dot 0, nothing to scatter
      T* gp = grad_value + (p - value) + d;
      p += d;
      const V c(coef[k]);
      for (int v = 0; v < NV; ++v) {
        if constexpr (kMaskedTail && NV == 1) {
          if (rem > 0) {
            acc = fmadd(gv[v], V::loadu(p, rem), acc);
            fmadd(c, gv[v], V::loadu(gp, rem)).store(gp, rem);
            continue;
          }
        }
        acc = fmadd(gv[v], V::loadu(p + v * VW), acc);
        fmadd(c, gv[v], V::loadu(gp + v * VW)).store(gp + v * VW);
      }
    }
    acc.store(partial + k * VW);
  }
}

// dot[k] = the sum of the VW lanes of partial[k], for count (a multiple of VW) corners: VW rows
// at a time through log2(VW) rounds of deinterleave-and-add, each of which halves the lanes per
// row and the number of vectors, leaving the VW sums in order in one vector.
template <typename T>
inline void sum_lanes(const T* partial, int64_t count, T* dot) {
  using V = Vectorized<T>;
  constexpr int64_t VW = V::size();
  for (int64_t b = 0; b < count; b += VW) {
    V r[VW];
    for (int64_t i = 0; i < VW; ++i) r[i] = V::loadu(partial + (b + i) * VW);
    for (int64_t width = VW; width > 1; width /= 2) {
      for (int64_t i = 0; i < width / 2; ++i) {
        const auto halves = deinterleave2(r[2 * i], r[2 * i + 1]);
        r[i] = halves.first + halves.second;
      }
    }
    r[0].store(dot + b);
  }
}

// Gradients of the samples from their corner dot products dot[k] = <grad_out, corner row>
// (0 for corners outside the map): attention weight <grad_out, sample>, and the location through
// the bilinear form's d/d(fx), d/d(fy) and pixel x = loc_x * W - 0.5.
template <typename scalar_t>
void sample_gradients(const Problem& pb, const Scratch& s, scalar_t* grad_attn,
                      scalar_t* grad_loc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = s.padded, samples = pb.L * pb.P;
  const acc_t* dot = as<acc_t>(s.dot);
  const acc_t* fx_ = as<acc_t>(s.frac);
  const acc_t* fy_ = fx_ + n;
  const acc_t* w_ = as<acc_t>(s.weight);
  const acc_t* W_ = as<acc_t>(s.level_real);
  const acc_t* H_ = W_ + n;
  int64_t j = 0;
  if constexpr (kVectorised<scalar_t>) {
    using V = Vectorized<scalar_t>;
    constexpr int64_t VW = V::size();
    const V one(scalar_t(1));
    for (; j < samples; j += VW) {
      const int64_t real = std::min<int64_t>(VW, samples - j);
      const V d0 = V::loadu(dot + j), d1 = V::loadu(dot + n + j);
      const V d2 = V::loadu(dot + 2 * n + j), d3 = V::loadu(dot + 3 * n + j);
      const V fx = V::loadu(fx_ + j), fy = V::loadu(fy_ + j), w = V::loadu(w_ + j);
      const V gx = one - fx, gy = one - fy;
      const V sampled = gy * gx * d0 + gy * fx * d1 + fy * gx * d2 + fy * fx * d3;
      const V d_fx = (d1 - d0) * gy + (d3 - d2) * fy;
      const V d_fy = (d2 - d0) * gx + (d3 - d1) * fx;
      const auto xy = interleave2(w * d_fx * V::loadu(W_ + j), w * d_fy * V::loadu(H_ + j));
      if (real == VW) {
        sampled.store(grad_attn + j);
        xy.first.store(grad_loc + 2 * j);
        xy.second.store(grad_loc + 2 * j + VW);
      } else {
        sampled.store(grad_attn + j, real);
        xy.first.store(grad_loc + 2 * j, std::min<int64_t>(2 * real, VW));
        if (2 * real > VW) xy.second.store(grad_loc + 2 * j + VW, 2 * real - VW);
      }
    }
    return;
  }
  for (; j < samples; ++j) {  // fp16 / bf16
    const acc_t d0 = dot[j], d1 = dot[n + j], d2 = dot[2 * n + j], d3 = dot[3 * n + j];
    const acc_t fx = fx_[j], fy = fy_[j], gx = acc_t(1) - fx, gy = acc_t(1) - fy, w = w_[j];
    grad_attn[j] = static_cast<scalar_t>(gy * gx * d0 + gy * fx * d1 + fy * gx * d2 + fy * fx * d3);
    grad_loc[2 * j] = static_cast<scalar_t>(w * ((d1 - d0) * gy + (d3 - d2) * fy) * W_[j]);
    grad_loc[2 * j + 1] = static_cast<scalar_t>(w * ((d2 - d0) * gx + (d3 - d1) * fx) * H_[j]);
  }
}

// The corner pass of one (query, head): dot products into s.dot, scatter into grad_value.
// value, grad_value: value[n, 0, m, 0] and its gradient; grad_out: the (query, head)'s row.
template <typename scalar_t, typename grad_t>
void dot_scatter(const Problem& pb, const Scratch& s, const scalar_t* value, grad_t* grad_value,
                 const scalar_t* grad_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t count = 4 * s.padded, D = pb.D;
  const int64_t* rows = as<int64_t>(s.row);
  const acc_t* coef = as<acc_t>(s.coef);
  const scalar_t* zero = as<scalar_t>(s.zero_row);
  acc_t* dot = as<acc_t>(s.dot);
  int64_t d = 0;
  if constexpr (kVectorised<scalar_t> && std::is_same_v<grad_t, scalar_t>) {
    using T = scalar_t;
    constexpr int64_t VW = Vectorized<T>::size();
    T* partial = as<T>(s.partial);
    const T* g = grad_out;
    for (; d < D - D % VW;) {
      const bool first = d == 0;
      switch (std::min<int64_t>((D - d) / VW, 4)) {
        case 4: dot_scatter_block<4>(rows, coef, count, zero, value, grad_value, g, d, first, partial); d += 4 * VW; break;
        case 3: dot_scatter_block<3>(rows, coef, count, zero, value, grad_value, g, d, first, partial); d += 3 * VW; break;
        case 2: dot_scatter_block<2>(rows, coef, count, zero, value, grad_value, g, d, first, partial); d += 2 * VW; break;
        default: dot_scatter_block<1>(rows, coef, count, zero, value, grad_value, g, d, first, partial); d += VW; break;
      }
    }
    if constexpr (kMaskedTail) {
      if (d < D) {
        dot_scatter_block<1>(rows, coef, count, zero, value, grad_value, g, d, d == 0, partial, D - d);
        d = D;
      }
    }
    if (d > 0) {
      sum_lanes(partial, count, dot);
    } else {
      std::fill(dot, dot + count, T(0));
    }
  } else {
    std::fill(dot, dot + count, acc_t(0));
  }
  if (d == D) return;
  // Channels left over (all of them for fp16 / bf16), in acc_t.
  acc_t* g = as<acc_t>(s.grad_row);
  for (int64_t c = d; c < D; ++c) g[c] = static_cast<acc_t>(grad_out[c]);
  for (int64_t k = 0; k < count; ++k) {
    const scalar_t* p = reinterpret_cast<const scalar_t*>(rows[k]);
    if (p == zero) continue;
    grad_t* gp = grad_value + (p - value);
    acc_t total = 0;
    for (int64_t c = d; c < D; ++c) {
      total += g[c] * static_cast<acc_t>(p[c]);
      gp[c] = static_cast<grad_t>(static_cast<acc_t>(gp[c]) + coef[k] * g[c]);
    }
    dot[k] += total;
  }
}

constexpr int64_t kPrefetchQueries = 4;

inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
#else
  (void)p;  // no portable prefetch; only the speed changes
#endif
}

template <typename scalar_t, typename grad_t, bool kLanes>
void backward_heads(const BackwardArgs<scalar_t, grad_t>& a, const Scratch& s, int64_t begin,
                    int64_t end) {
  const Problem& pb = a.pb;
  const int64_t row = pb.M * pb.D, samples = pb.L * pb.P;
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / pb.M, m = nm % pb.M;
    const scalar_t* value_nm = a.value + n * pb.S * row + m * pb.D;
    grad_t* grad_value_nm = a.grad_value + n * pb.S * row + m * pb.D;
    for (int64_t q = 0; q < pb.Lq; ++q) {
      const int64_t nq = n * pb.Lq + q;
      const int64_t i0 = (nq * pb.M + m) * samples;
      // This task reads the queries of one head: locations and weights M * L * P apart,
      // a stride the hardware prefetchers did not follow (the geometry cost 4.6x the
      // forward's on AVX2). Ask for those of the query 4 steps ahead (measured: AVX2
      // forward + backward 15% faster at encoder 512 px, 8 steps less, AVX-512 unchanged).
      if (q + kPrefetchQueries < pb.Lq) {
        const int64_t ahead = i0 + kPrefetchQueries * pb.M * samples;
        for (int64_t b = 0; b < 2 * samples * int64_t(sizeof(scalar_t)); b += 64) {
          prefetch(reinterpret_cast<const char*>(a.loc + 2 * ahead) + b);
        }
        for (int64_t b = 0; b < samples * int64_t(sizeof(scalar_t)); b += 64) {
          prefetch(reinterpret_cast<const char*>(a.attn + ahead) + b);
        }
      }
      if constexpr (kLanes && kLaneGeometry) {
        locate_lanes(std::true_type{}, pb, s, a.loc + 2 * i0, a.attn + i0, value_nm);
      } else {
        locate_scalar<true>(pb, s, a.loc + 2 * i0, a.attn + i0, value_nm);
      }
      dot_scatter(pb, s, value_nm, grad_value_nm, a.grad_out + nq * row + m * pb.D);
      sample_gradients(pb, s, a.grad_attn + i0, a.grad_loc + 2 * i0);
    }
  }
}

template <typename scalar_t, typename grad_t>
void backward_impl(const BackwardArgs<scalar_t, grad_t>& a, const Scratch& s, int64_t begin,
                   int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::memset(s.zero_row, 0, a.pb.D * sizeof(scalar_t));
  if constexpr (std::is_same_v<scalar_t, float> && kLaneGeometry) {
    if (a.lane_geometry) {
      fill_level_table<float, true>(a.pb, s);
      return backward_heads<float, grad_t, true>(a, s, begin, end);
    }
  }
  fill_level_table<acc_t, false>(a.pb, s);
  backward_heads<scalar_t, grad_t, false>(a, s, begin, end);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points (declared in ms_deform_attn_cpu_kernels.h).

void run(const ForwardArgs<float>& a, const Scratch& s, int64_t begin, int64_t end) {
  forward_impl(a, s, begin, end);
}
void run(const ForwardArgs<double>& a, const Scratch& s, int64_t begin, int64_t end) {
  forward_impl(a, s, begin, end);
}
void run(const BackwardArgs<float, float>& a, const Scratch& s, int64_t begin, int64_t end) {
  backward_impl(a, s, begin, end);
}
void run(const BackwardArgs<double, double>& a, const Scratch& s, int64_t begin, int64_t end) {
  backward_impl(a, s, begin, end);
}
#ifdef UNIP_V2_CPU_KERNELS_REDUCED_PRECISION
void run(const ForwardArgs<c10::Half>& a, const Scratch& s, int64_t begin, int64_t end) {
  forward_impl(a, s, begin, end);
}
void run(const ForwardArgs<c10::BFloat16>& a, const Scratch& s, int64_t begin, int64_t end) {
  forward_impl(a, s, begin, end);
}
void run(const BackwardArgs<c10::Half, float>& a, const Scratch& s, int64_t begin, int64_t end) {
  backward_impl(a, s, begin, end);
}
void run(const BackwardArgs<c10::BFloat16, float>& a, const Scratch& s, int64_t begin,
         int64_t end) {
  backward_impl(a, s, begin, end);
}
#endif

}  // namespace UNIP_V2_CPU_KERNELS
}  // namespace cpu
}  // namespace unip_v2
