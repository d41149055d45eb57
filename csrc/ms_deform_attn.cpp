// Checks and device dispatch for the multi-scale deformable attention op, and the Python
// module `unip_v2._C`.
#include "ms_deform_attn.h"
#include "mt_adamw.h"

#include <c10/util/safe_numerics.h>
// torch/python.h, not torch/extension.h: the bindings need only pybind11 and torch's Tensor
// casters, and extension.h (all of the C++ frontend) made this file the build's critical path,
// 43 s of compiling against 24 s (gcc 12, one core)
#include <torch/python.h>

#include <algorithm>
#include <initializer_list>
#include <sstream>

namespace unip_v2 {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK(t.defined(), "ms_deform_attn: ", name, " is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "ms_deform_attn: ", name, " must be a dense (strided) ",
              "tensor, got layout ", t.layout());
  TORCH_CHECK(t.dim() == dim, "ms_deform_attn: ", name, " must have ", dim,
              " dimensions, got shape ", shape_of(t));
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name, " of shape ", shape_of(t),
              " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), "ms_deform_attn: ", name, " is on ", t.device(),
              " but value is on ", like.device());
}

// The product of `sizes`, counting a zero size as one, or an error. A tensor with a zero
// size holds nothing whatever its other sizes, so those may be arbitrarily large; the kernels
// still form products of them (M * D, N * Lq, offsets), which must not overflow int64.
int64_t product_without_zeros(std::initializer_list<int64_t> sizes, const char* what) {
  int64_t total = 1;
  for (int64_t s : sizes) {
    TORCH_CHECK(!c10::mul_overflows(total, std::max<int64_t>(s, 1), &total),
                "ms_deform_attn: the sizes of ", what, " overflow int64");
  }
  return total;
}

// spatial_shapes against level_start_index and value's S, on a host copy of the two tables
// (L x 2 and L entries; for CUDA tensors one small device-to-host copy). Every kernel indexes
// value rows through these numbers, so an inconsistent table must be an error, never an
// out-of-bounds read: H * W and the running sum are computed with overflow checks (H = W =
// 2^32 would otherwise wrap to a small, plausible-looking size).
void check_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  int64_t S) {
  const at::Tensor shapes = spatial_shapes.to(at::kCPU);
  const at::Tensor starts = level_start_index.to(at::kCPU);
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    const int64_t H = hw[2 * l], W = hw[2 * l + 1];
    TORCH_CHECK(H >= 0 && W >= 0, "ms_deform_attn: spatial_shapes[", l, "] = (", H, ", ", W,
                ") is negative");
    TORCH_CHECK(start[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", start[l],
                " but the levels before it hold ", total, " positions");
    int64_t size = 0;
    TORCH_CHECK(!c10::mul_overflows(H, W, &size), "ms_deform_attn: spatial_shapes[", l,
                "] = (", H, ", ", W, "): H * W overflows int64");
    TORCH_CHECK(!c10::add_overflows(total, size, &total), "ms_deform_attn: spatial_shapes up to ",
                "level ", l, " hold more than 2^63 positions (value has S = ", S, ")");
  }
  TORCH_CHECK(total == S, "ms_deform_attn: spatial_shapes hold ", total,
              " positions but value has S = ", S);
}

}  // namespace

void check_ms_deform_attn_inputs(const at::Tensor& value,
                                 const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights) {
  check_tensor(value, "value", 4, value);
  TORCH_CHECK(value.is_cpu() || value.is_cuda(), "ms_deform_attn: value is on ", value.device(),
              "; only CPU and CUDA tensors are supported");
  check_tensor(spatial_shapes, "spatial_shapes", 2, value);
  check_tensor(level_start_index, "level_start_index", 1, value);
  check_tensor(sampling_locations, "sampling_locations", 6, value);
  check_tensor(attention_weights, "attention_weights", 5, value);

  // The kernels are instantiated for these four (AT_DISPATCH_FLOATING_TYPES_AND2).
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(sampling_locations.scalar_type() == dtype &&
                  attention_weights.scalar_type() == dtype,
              "ms_deform_attn: sampling_locations (", sampling_locations.scalar_type(),
              ") and attention_weights (", attention_weights.scalar_type(),
              ") must have value's dtype (", dtype, ")");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes (", spatial_shapes.scalar_type(),
              ") and level_start_index (", level_start_index.scalar_type(), ") must be int64");

  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(spatial_shapes.size(1) == 2, "ms_deform_attn: spatial_shapes must be (L, 2), got ",
              shape_of(spatial_shapes));
  TORCH_CHECK(level_start_index.size(0) == L, "ms_deform_attn: level_start_index of shape ",
              shape_of(level_start_index), " does not match spatial_shapes ",
              shape_of(spatial_shapes));
  const auto& loc = sampling_locations;
  TORCH_CHECK(loc.size(0) == N && loc.size(2) == M && loc.size(3) == L && loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N=", N, ", Lq, M=", M, ", L=", L,
              ", P, 2), got ", shape_of(loc));
  const int64_t Lq = loc.size(1), P = loc.size(4);
  const auto& w = attention_weights;
  TORCH_CHECK(w.size(0) == N && w.size(1) == Lq && w.size(2) == M && w.size(3) == L &&
                  w.size(4) == P,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = (", N, ", ", Lq,
              ", ", M, ", ", L, ", ", P, "), got ", shape_of(w));
  // Every product the kernels form is a sub-product of one of these two.
  product_without_zeros({N, S, M, D, 2}, "value");
  product_without_zeros({N, Lq, M, D, L, P, 2}, "the output and sampling_locations");
  check_levels(spatial_shapes, level_start_index, S);
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value,
                                  const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  if (value.is_cuda()) {
#ifdef UNIP_V2_WITH_CUDA
    return ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights);
#else
    TORCH_CHECK(false, "ms_deform_attn: unip_v2._C was built without CUDA");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_cpu_forward(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights);
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value,
                                                const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights,
                                                const at::Tensor& grad_output) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1);
  check_tensor(grad_output, "grad_output", 3, value);
  TORCH_CHECK(grad_output.size(0) == N && grad_output.size(1) == Lq &&
                  grad_output.size(2) == M * D,
              "ms_deform_attn: grad_output must be (N, Lq, M*D) = (", N, ", ", Lq, ", ", M * D,
              "), got ", shape_of(grad_output));
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn: grad_output (",
              grad_output.scalar_type(), ") must have value's dtype (", value.scalar_type(), ")");
  if (value.is_cuda()) {
#ifdef UNIP_V2_WITH_CUDA
    return ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights, grad_output);
#else
    TORCH_CHECK(false, "ms_deform_attn: unip_v2._C was built without CUDA");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_cpu_backward(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights, grad_output);
}

}  // namespace unip_v2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unip_v2 compiled ops: multi-scale deformable attention (CPU and, if built, CUDA) "
            "and MT-AdamW's fused CPU update";
  m.def("mt_adamw_step_cpu", &unip_v2::mt_adamw_step_cpu,
        "MT-AdamW's update of CPU parameters in one pass each (csrc/cpu/mt_adamw_cpu.cpp)");
  m.def("ms_deform_attn_forward", &unip_v2::ms_deform_attn_forward,
        "multi-scale deformable attention, forward");
  m.def("ms_deform_attn_backward", &unip_v2::ms_deform_attn_backward,
        "multi-scale deformable attention, backward: (grad_value, grad_locations, grad_weights)");
  m.def("cpu_isa", &unip_v2::ms_deform_attn_cpu_isa,
        "instruction set of the CPU kernels: avx512, avx2 or default (UNIP_V2_CPU_ISA caps it)");
  m.def("with_cuda", []() {
#ifdef UNIP_V2_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether this build holds the CUDA kernels");
}
