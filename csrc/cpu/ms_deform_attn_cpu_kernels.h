// The interface between the CPU dispatcher (ms_deform_attn_cpu.cpp) and the CPU kernels.
//
// The kernels (kernels/ms_deform_attn_cpu_impl.h) are one source compiled once per
// instruction set, each translation unit with its own compiler flags (setup.py:
// CPU_KERNEL_ISAS), the way PyTorch builds its own CPU kernels: every function of such a unit,
// ATen's at::vec::Vectorized included, is compiled for that target, so vectors have the
// target's native width. The dispatcher, compiled for the baseline, picks one namespace at run
// time (kernels_avx512, kernels_avx2 or kernels_default).
//
// Only plain structs and function declarations cross this boundary: no inline code, so
// nothing compiled for a wider target can be linked into baseline code (see setup.py).
#pragma once

#include <cstdint>

namespace c10 {
struct Half;
struct BFloat16;
}  // namespace c10

namespace unip_v2 {
namespace cpu {

// Sizes of one call; see ms_deform_attn.h for the layout of the tensors.
struct Problem {
  int64_t N, S, M, D, Lq, L, P;
  const int64_t* shapes;  // (L, 2): H, W of each level
  const int64_t* starts;  // (L,): first position of each level
};

// Work buffers of one thread, laid out by the dispatcher (kernels allocate nothing). Sample j
// of a (query, head) is j = l * P + p; per-sample arrays hold `padded` entries (L * P rounded
// up to a multiple of kMaxLanes), per-corner arrays 4 * padded, corner-major (k * padded + j).
struct Scratch {
  int64_t padded;
  void* level_real;  // (2, padded) acc_t: W, H of the sample's level (fp32 lanes geometry:
                     // (4, padded) floats W, H, W / 2, H / 2 in the same bytes)
  void* level_int;   // (4, padded) int32 or int64: W, H, and in units of the geometry's
                     // offsets (bytes for int32, elements for int64) W * M * D, start * M * D
  void* row;         // (4, padded) int64: address of the corner's value row, or of zero_row
                     // where the corner is outside the map
  void* coef;        // (4, padded) acc_t: attention weight x bilinear weight
  void* frac;        // (2, padded) acc_t: the sample's fractional position fx, fy in its cell
  void* weight;      // (padded,) acc_t: the sample's attention weight, 0 where it reads nothing
  void* partial;     // (4, padded, kMaxLanes * 4 bytes) acc_t: per-corner partial dot products
  void* dot;         // (4, padded) acc_t: <grad_output, corner row>
  void* zero_row;    // (D,) scalar_t zeros: what a corner outside the map reads
  void* grad_row;    // (D,) acc_t: the grad_output row of the (query, head), as acc_t
};

constexpr int64_t kMaxLanes = 16;  // fp32 lanes of the widest target (AVX-512)

template <typename scalar_t>
struct ForwardArgs {
  using scalar_type = scalar_t;
  Problem pb;
  const scalar_t* value;
  const scalar_t* loc;
  const scalar_t* attn;
  scalar_t* out;
  bool lane_geometry;  // fp32 only: vector geometry with 32-bit offsets (see the dispatcher)
};

template <typename scalar_t, typename grad_t>
struct BackwardArgs {
  using scalar_type = scalar_t;
  Problem pb;
  const scalar_t* value;
  const scalar_t* loc;
  const scalar_t* attn;
  const scalar_t* grad_out;
  grad_t* grad_value;  // scalar_t, or float for fp16 / bf16 (cast once at the end)
  scalar_t* grad_loc;
  scalar_t* grad_attn;
  bool lane_geometry;
};

// One entry point per pass, overloaded on its arguments:
//   run(ForwardArgs)   output rows of queries [begin, end) of the flattened (N * Lq) index;
//   run(BackwardArgs)  the (batch, head) pairs [begin, end) of the flattened (N * M) index; only
//                      the owner of (n, m) writes grad_value[n, :, m, :], so the scatter needs
//                      no atomics.
#define UNIP_V2_DECLARE_CPU_KERNELS(NS, T, G)                                                 \
  namespace NS {                                                                           \
  void run(const ForwardArgs<T>& a, const Scratch& s, int64_t begin, int64_t end);         \
  void run(const BackwardArgs<T, G>& a, const Scratch& s, int64_t begin, int64_t end);     \
  }

UNIP_V2_DECLARE_CPU_KERNELS(kernels_default, float, float)
UNIP_V2_DECLARE_CPU_KERNELS(kernels_default, double, double)
// fp16 / bf16 accumulate in fp32 and are built for the baseline only (correct, not tuned).
UNIP_V2_DECLARE_CPU_KERNELS(kernels_default, c10::Half, float)
UNIP_V2_DECLARE_CPU_KERNELS(kernels_default, c10::BFloat16, float)
#ifdef UNIP_V2_CPU_KERNELS_AVX2
UNIP_V2_DECLARE_CPU_KERNELS(kernels_avx2, float, float)
UNIP_V2_DECLARE_CPU_KERNELS(kernels_avx2, double, double)
#endif
#ifdef UNIP_V2_CPU_KERNELS_AVX512
UNIP_V2_DECLARE_CPU_KERNELS(kernels_avx512, float, float)
UNIP_V2_DECLARE_CPU_KERNELS(kernels_avx512, double, double)
#endif

#undef UNIP_V2_DECLARE_CPU_KERNELS

}  // namespace cpu
}  // namespace unip_v2
