// CUDA kernels of multi-scale deformable attention (same semantics as
// csrc/cpu/ms_deform_attn_cpu.cpp; the layout is described in csrc/ms_deform_attn.h).
//
// Thread mapping:
//   forward   one thread per output element (n, q, m, d). The thread walks the L * P samples
//             of its (n, q, m) and gathers the four bilinear corners of channel d. Neighbouring
//             threads hold neighbouring channels of the same (n, q, m), so the location and
//             weight loads are broadcasts and the value loads are contiguous; every output
//             element is written by exactly one thread, without atomics.
//   backward  one group of G lanes per sample (n, q, m, l, p), G = next power of two of D,
//             at most 32, so a group never straddles a warp. The lanes of a group split the D
//             channels: each reads grad_output and the corner value rows for its channels
//             (contiguous across the group), scatters attn * weight * grad_output into
//             grad_value with atomicAdd (several samples may share a corner), and keeps partial
//             dot products <grad_output, corner value>. The four partial dots are summed over
//             the group with warp shuffles, and the group's first lane writes the sample's
//             attention-weight and location gradients. Every lane of a warp takes part in the
//             shuffles (the grid-stride loop advances whole warps), idle lanes with zeros.
// grad_value is accumulated in at::opmath_type (fp32 for fp16 / bf16, cast once at the end);
// the result does not depend on the thread mapping beyond the order of floating-point
// additions, which atomics make nondeterministic (determinism is only promised on CPU).
// Index arithmetic is 64-bit throughout: N * S * M * D may exceed 2^31.
// torch/extension.h (through ms_deform_attn.h) makes nvcc 13 warn that the identifier
// "module" in torch/python.h is not the C++20 keyword (diagnostic 3189): not our code.
#pragma nv_diag_suppress 3189
#include "../ms_deform_attn.h"
#pragma nv_diag_default 3189

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuSPARSE/cuBLAS headers

#include <algorithm>
#include <cstdint>

namespace unip_v2 {
namespace {

constexpr int kThreads = 256;        // threads per block, a multiple of the warp size
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover anything beyond this
constexpr unsigned kFullMask = 0xffffffffu;

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

// ---------------------------------------------------------------------------------------
// Geometry: where one sampling location lands on one level.

// Round-to-nearest arithmetic that the compiler may not fuse into FMAs, so the pixel
// coordinate is computed with exactly the roundings of the CPU expression.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float floor_acc(float a) { return floorf(a); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double floor_acc(double a) { return ::floor(a); }

template <typename acc_t>
struct Corners {
  int64_t pos[4];   // position s of the corner in value's S axis (valid corners only)
  acc_t weight[4];  // bilinear weight; 0 for corners that are not read
  bool valid[4];    // corners (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1)
  acc_t fx, fy;     // fractional position inside the cell (for the location gradient)
  bool any;         // false when nothing is read (outside the map, or not finite)
};

// loc_x, loc_y: normalised location on a level of H x W positions that starts at position
// `start` of the S axis. A corner is read when it lies inside the map and, as a guard against
// inconsistent level metadata, when its position lies in [0, S).
template <typename acc_t>
__device__ __forceinline__ Corners<acc_t> locate(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W,
                                                 int64_t start, int64_t S) {
  Corners<acc_t> c;
  // grid_sample's unnormalisation for align_corners=False, in the CPU's order of operations:
  // pixel = (2 * loc - 1 + 1) * (size * 0.5) - 0.5.
  const acc_t one(1), two(2), half(0.5);
  const acc_t x = sub_rn(mul_rn(add_rn(sub_rn(mul_rn(loc_x, two), one), one),
                                mul_rn(static_cast<acc_t>(W), half)),
                         half);
  const acc_t y = sub_rn(mul_rn(add_rn(sub_rn(mul_rn(loc_y, two), one), one),
                                mul_rn(static_cast<acc_t>(H), half)),
                         half);
  // Written so that NaN fails the test: a NaN location reads nothing.
  c.any = x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(W) &&
          y < static_cast<acc_t>(H);
  c.fx = acc_t(0);
  c.fy = acc_t(0);
  for (int k = 0; k < 4; ++k) {
    c.pos[k] = 0;
    c.weight[k] = acc_t(0);
    c.valid[k] = false;
  }
  if (!c.any) return c;
  const acc_t xf = floor_acc(x), yf = floor_acc(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  c.fx = x - xf;
  c.fy = y - yf;
  const acc_t gx = one - c.fx, gy = one - c.fy;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < W, y0_in = y0 >= 0, y1_in = y0 + 1 < H;
  const int64_t p = start + y0 * W + x0;
  c.pos[0] = p;
  c.pos[1] = p + 1;
  c.pos[2] = p + W;
  c.pos[3] = p + W + 1;
  c.valid[0] = y0_in && x0_in;
  c.valid[1] = y0_in && x1_in;
  c.valid[2] = y1_in && x0_in;
  c.valid[3] = y1_in && x1_in;
  const acc_t weight[4] = {gy * gx, gy * c.fx, c.fy * gx, c.fy * c.fx};
  for (int k = 0; k < 4; ++k) {
    c.valid[k] = c.valid[k] && c.pos[k] >= 0 && c.pos[k] < S;
    c.weight[k] = c.valid[k] ? weight[k] : acc_t(0);
  }
  return c;
}

// ---------------------------------------------------------------------------------------
// Forward.

// value    (N, S, M, D)
// shapes   (L, 2) int64, (H_l, W_l)
// starts   (L,) int64
// loc      (N, Lq, M, L, P, 2), x first
// attn     (N, Lq, M, L, P)
// out      (N, Lq, M * D); total = N * Lq * M * D threads, one per element
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,
                                  const int64_t* __restrict__ shapes,
                                  const int64_t* __restrict__ starts,
                                  const scalar_t* __restrict__ loc,
                                  const scalar_t* __restrict__ attn,
                                  scalar_t* __restrict__ out, const Dims dims,
                                  const int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = dims.M * dims.D;  // value elements per position
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += stride) {
    const int64_t d = t % dims.D;
    const int64_t nqm = t / dims.D;  // (n * Lq + q) * M + m
    const int64_t m = nqm % dims.M;
    const int64_t n = nqm / (dims.M * dims.Lq);
    // value[n, s, m, d] = value_nmd[s * row]
    const scalar_t* value_nmd = value + n * dims.S * row + m * dims.D + d;
    const int64_t i0 = nqm * dims.L * dims.P;  // first sample of this (n, q, m)
    acc_t acc(0);
    for (int64_t l = 0; l < dims.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const int64_t start = starts[l];
      for (int64_t p = 0; p < dims.P; ++p) {
        const int64_t i = i0 + l * dims.P + p;
        const Corners<acc_t> c =
            locate<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]),
                          H, W, start, dims.S);
        // The definition's order of products, weight times the bilinear sample (0 for a
        // sample that reads nothing), as the reference computes it: for an infinite or NaN
        // weight, (w * b_k) * v per corner would give NaN for a corner of bilinear weight 0
        // where w * (sum of the corners) is +-inf, and skipping a sample outside the map
        // would drop the reference's inf * 0 = NaN. Same as the CPU kernels.
        acc_t sampled(0);
        for (int k = 0; k < 4; ++k) {
          if (!c.valid[k]) continue;
          sampled += c.weight[k] * static_cast<acc_t>(value_nmd[c.pos[k] * row]);
        }
        acc += static_cast<acc_t>(attn[i]) * sampled;
      }
    }
    out[t] = static_cast<scalar_t>(acc);  // out[n, q, m * D + d] is element nqm * D + d
  }
}

// ---------------------------------------------------------------------------------------
// Backward.

// value        (N, S, M, D)
// shapes       (L, 2) int64;  starts (L,) int64
// loc          (N, Lq, M, L, P, 2);  attn (N, Lq, M, L, P)
// grad_out     (N, Lq, M * D)
// grad_value   (N, S, M, D) in acc_t, zero-initialised, scatter-added
// grad_loc     (N, Lq, M, L, P, 2), zero-initialised;  grad_attn (N, Lq, M, L, P), likewise
// group        lanes per sample, a power of two <= 32;  total = N * Lq * M * L * P * group
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_backward_kernel(const scalar_t* __restrict__ value,
                                   const int64_t* __restrict__ shapes,
                                   const int64_t* __restrict__ starts,
                                   const scalar_t* __restrict__ loc,
                                   const scalar_t* __restrict__ attn,
                                   const scalar_t* __restrict__ grad_out,
                                   acc_t* __restrict__ grad_value,
                                   scalar_t* __restrict__ grad_loc,
                                   scalar_t* __restrict__ grad_attn, const Dims dims,
                                   const int group, const int64_t total) {
  const int64_t row = dims.M * dims.D;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;  // multiple of 32
  const int lane = static_cast<int>(threadIdx.x) % group;  // lane within the sample's group
  const int warp_lane = static_cast<int>(threadIdx.x) % 32;
  // The loop condition looks at the warp's first thread, so whole warps iterate together
  // and the shuffles below always see all 32 lanes; threads past the end only add zeros.
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t - warp_lane < total; t += stride) {
    const bool active = t < total;  // the same for all lanes of a group (total % group == 0)
    const int64_t i = t / group;    // sample ((n * Lq + q) * M + m) * L * P + l * P + p
    acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};  // <grad_out, corner value>
    Corners<acc_t> c;
    c.any = false;
    acc_t w(0);
    int64_t H = 0, W = 0;
    if (active) {
      const int64_t lp = i % (dims.L * dims.P);
      const int64_t nqm = i / (dims.L * dims.P);  // (n * Lq + q) * M + m
      const int64_t l = lp / dims.P;
      const int64_t m = nqm % dims.M;
      const int64_t n = nqm / (dims.M * dims.Lq);
      H = shapes[2 * l];
      W = shapes[2 * l + 1];
      c = locate<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H,
                        W, starts[l], dims.S);
      if (c.any) {
        w = static_cast<acc_t>(attn[i]);
        const int64_t base = n * dims.S * row + m * dims.D;  // value[n, 0, m, 0]
        const scalar_t* go = grad_out + nqm * dims.D;       // grad_out[n, q, m * D]
        acc_t coef[4];
        for (int k = 0; k < 4; ++k) coef[k] = w * c.weight[k];
        for (int64_t d = lane; d < dims.D; d += group) {
          const acc_t g = static_cast<acc_t>(go[d]);
          for (int k = 0; k < 4; ++k) {
            if (!c.valid[k]) continue;
            const int64_t o = base + c.pos[k] * row + d;
            dot[k] += g * static_cast<acc_t>(value[o]);
            atomicAdd(grad_value + o, coef[k] * g);
          }
        }
      }
    }
    // Sum the partial dots over the group (xor partners stay inside an aligned group).
    for (int offset = group / 2; offset > 0; offset /= 2) {
      for (int k = 0; k < 4; ++k) dot[k] += __shfl_xor_sync(kFullMask, dot[k], offset, group);
    }
    if (active && c.any && lane == 0) {
      acc_t sampled(0);
      for (int k = 0; k < 4; ++k) sampled += c.weight[k] * dot[k];
      grad_attn[i] = static_cast<scalar_t>(sampled);
      // d(sample)/d(fx) and d(sample)/d(fy) of the bilinear form; pixel x = loc_x * W - 0.5.
      const acc_t one(1);
      const acc_t d_fx = (dot[1] - dot[0]) * (one - c.fy) + (dot[3] - dot[2]) * c.fy;
      const acc_t d_fy = (dot[2] - dot[0]) * (one - c.fx) + (dot[3] - dot[1]) * c.fx;
      grad_loc[2 * i] = static_cast<scalar_t>(w * d_fx * static_cast<acc_t>(W));
      grad_loc[2 * i + 1] = static_cast<scalar_t>(w * d_fy * static_cast<acc_t>(H));
    }
  }
}

// ---------------------------------------------------------------------------------------

Dims make_dims(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return Dims{value.size(0),
              value.size(1),
              value.size(2),
              value.size(3),
              sampling_locations.size(1),
              sampling_locations.size(3),
              sampling_locations.size(4)};
}

unsigned grid_for(int64_t threads) {
  return static_cast<unsigned>(std::min<int64_t>((threads + kThreads - 1) / kThreads, kMaxBlocks));
}

// Lanes per sample in the backward kernel: the next power of two >= D, at most a warp.
int group_for(int64_t D) {
  int g = 1;
  while (g < 32 && g < D) g *= 2;
  return g;
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value,
                                       const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Dims dims = make_dims(value, sampling_locations);
  const int64_t total = dims.N * dims.Lq * dims.M * dims.D;
  // Nothing to read (S == 0) or nothing to write: zeros of the right shape, no launch.
  if (total == 0 || value.numel() == 0) {
    return at::zeros({dims.N, dims.Lq, dims.M * dims.D}, value.options());
  }
  auto out = at::empty({dims.N, dims.Lq, dims.M * dims.D}, value.options());  // fully written
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
        ms_deform_attn_forward_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
            value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
            attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), dims, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Dims dims = make_dims(value, sampling_locations);
  auto grad_loc = at::zeros(sampling_locations.sizes(), sampling_locations.options());
  auto grad_attn = at::zeros(attention_weights.sizes(), attention_weights.options());
  // fp16/bf16 scatter into an fp32 buffer (atomics on 16-bit types are slow), cast at the end.
  const bool reduced = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  auto grad_value =
      at::zeros(value.sizes(), reduced ? value.options().dtype(at::kFloat) : value.options());
  const int64_t samples = dims.N * dims.Lq * dims.M * dims.L * dims.P;
  if (samples > 0 && dims.D > 0 && value.numel() > 0) {
    const int group = group_for(dims.D);
    const int64_t total = samples * group;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          ms_deform_attn_backward_kernel<scalar_t, acc_t>
              <<<grid_for(total), kThreads, 0, stream>>>(
                  value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                  level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
                  attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                  grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(),
                  grad_attn.data_ptr<scalar_t>(), dims, group, total);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  if (reduced) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace unip_v2
