// Checks and device dispatch for the multi-scale deformable attention op, and the Python
// module `unip_v2._C`.
#include "ms_deform_attn.h"

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
  TORCH_CHECK(t.dim() == dim, "ms_deform_attn: ", name, " must have ", dim,
              " dimensions, got shape ", shape_of(t));
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name, " of shape ", shape_of(t),
              " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), "ms_deform_attn: ", name, " is on ", t.device(),
              " but value is on ", like.device());
}

}  // namespace

void check_ms_deform_attn_inputs(const at::Tensor& value,
                                 const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights) {
  check_tensor(value, "value", 4, value);
  check_tensor(spatial_shapes, "spatial_shapes", 2, value);
  check_tensor(level_start_index, "level_start_index", 1, value);
  check_tensor(sampling_locations, "sampling_locations", 6, value);
  check_tensor(attention_weights, "attention_weights", 5, value);

  TORCH_CHECK(at::isFloatingType(value.scalar_type()),
              "ms_deform_attn: value must be floating point, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: sampling_locations (", sampling_locations.scalar_type(),
              ") and attention_weights (", attention_weights.scalar_type(),
              ") must have value's dtype (", value.scalar_type(), ")");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");

  const int64_t N = value.size(0), M = value.size(2);
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
  const auto& w = attention_weights;
  TORCH_CHECK(w.size(0) == N && w.size(1) == loc.size(1) && w.size(2) == M && w.size(3) == L &&
                  w.size(4) == loc.size(4),
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = (", N, ", ",
              loc.size(1), ", ", M, ", ", L, ", ", loc.size(4), "), got ", shape_of(w));
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
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == N && grad_output.size(1) == Lq &&
                  grad_output.size(2) == M * D,
              "ms_deform_attn: grad_output must be (N, Lq, M*D) = (", N, ", ", Lq, ", ", M * D,
              "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.device() == value.device() &&
                  grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn: grad_output must be contiguous with value's dtype and device");
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
  m.doc() = "unip_v2 compiled ops: multi-scale deformable attention (CPU and, if built, CUDA)";
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
