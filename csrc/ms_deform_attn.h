// Multi-scale deformable attention (Zhu et al., Deformable DETR), the sampling op of the
// region proposal network's pixel encoder and proposal decoder.
//
// Layout (all tensors contiguous, value / locations / weights of one floating dtype):
//   value               (N, S, M, D)        S = sum_l H_l * W_l, M heads, D channels per head
//   spatial_shapes      (L, 2)   int64      (H_l, W_l), finest level first
//   level_start_index   (L,)     int64      exclusive cumulative sum of H_l * W_l
//   sampling_locations  (N, Lq, M, L, P, 2) x first, normalised to [0, 1] per level
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
//
// A location (x, y) on level l is read at pixel coordinate (x * W_l - 0.5, y * H_l - 0.5) with
// bilinear interpolation and zeros outside the map: exactly grid_sample(align_corners=False,
// padding_mode="zeros") at 2 * loc - 1. Non-finite locations sample zeros and get zero gradient.
#pragma once

// Only at::Tensor is needed here. <torch/extension.h> (pybind11, the C++ frontend) costs a
// translation unit over a minute of compiling on 2 cores; only the bindings include it.
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace unip_v2 {

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value,
                                      const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// Returns {grad_value, grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output);

// The instruction set the CPU kernels run with: "avx512", "avx2" or "default".
std::string ms_deform_attn_cpu_isa();

#ifdef UNIP_V2_WITH_CUDA
at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value,
                                       const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output);
#endif

// Shape, dtype, device, layout and contiguity checks shared by both backends, and the level
// table (spatial_shapes, level_start_index) against value's S with overflow-checked
// arithmetic. They raise c10::Error (a Python RuntimeError) naming the tensor and its shape;
// the Python face runs friendlier checks first, these keep a direct caller of the extension
// from crashing. Cheap: no pass over any tensor but the two L-entry tables (copied to the
// host for CUDA tensors).
void check_ms_deform_attn_inputs(const at::Tensor& value,
                                 const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights);

}  // namespace unip_v2
