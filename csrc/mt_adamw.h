// MT-AdamW's fused CPU update (csrc/cpu/mt_adamw_cpu.cpp; Uni-Perceiver v2, Sec. 4.4).
#pragma once

// Only at::Tensor is needed here. <torch/extension.h> (pybind11, the C++ frontend) costs a
// translation unit over a minute of compiling on 2 cores; only the bindings include it.
#include <ATen/core/Tensor.h>

#include <vector>

namespace unip_v2 {

// One pass over each parameter: the moments and the parameter updated in place.
void mt_adamw_step_cpu(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                       std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                       std::vector<double> step_sizes, std::vector<double> inv_sqrt_bc2s,
                       double grad_scale, double beta1, double beta2, double m_coef,
                       double v_coef, double decay, double eps);

}  // namespace unip_v2
