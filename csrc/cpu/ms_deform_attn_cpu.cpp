// CPU multi-scale deformable attention: argument checks, work split, scratch buffers and the
// choice of instruction set. The kernels themselves are in kernels/ (one source, compiled once
// per instruction set; see ms_deform_attn_cpu_kernels.h).
//
// Work split:
//   forward   parallel over (batch, query); each task writes its own output rows.
//   backward  parallel over (batch, head). Only the task owning (n, m) touches the
//             grad_value slice value[n, :, m, :], and it visits queries in order, so the
//             scatter-add needs no atomics and gives bit-identical gradients on every run.
// The widest instruction set that is both built and supported by the CPU runs (AVX-512, AVX2 +
// FMA, or the baseline); UNIP_V2_CPU_ISA=avx512|avx2|default caps the choice, and
// UNIP_V2_CPU_SCALAR_GEOMETRY=1 turns the fp32 vector geometry off (tests use both to reach
// every path). fp16 / bf16 always run the baseline build. Accumulation is in at::opmath_type
// (fp32 for fp16 / bf16).
#include "../ms_deform_attn.h"
#include "ms_deform_attn_cpu_kernels.h"
#include "ms_deform_attn_cpu_scratch.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace unip_v2 {
namespace {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest build the CPU can run. __builtin_cpu_supports also checks that the OS saves the
// wider registers (XCR0).
Isa detect_isa() {
  Isa best = Isa::kDefault;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
#ifdef UNIP_V2_CPU_KERNELS_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
#endif
#ifdef UNIP_V2_CPU_KERNELS_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("fma")) {
    best = Isa::kAvx512;
  }
#endif
#endif
  if (const char* cap = std::getenv("UNIP_V2_CPU_ISA")) {
    const std::string c(cap);
    const Isa want = c == "default" ? Isa::kDefault
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

// Whether fp32 may take the vector geometry: byte offsets within one batch element's value fit
// in 32-bit lanes (values up to 2 GB). UNIP_V2_CPU_SCALAR_GEOMETRY=1 turns it off, so that tests
// reach the 64-bit path that otherwise only larger values take.
bool lane_geometry(const cpu::Problem& pb) {
  static const bool disabled = [] {
    const char* v = std::getenv("UNIP_V2_CPU_SCALAR_GEOMETRY");
    return v != nullptr && std::string(v) == "1";
  }();
  const int64_t bytes = (pb.S + 1) * pb.M * pb.D * static_cast<int64_t>(sizeof(float));
  return !disabled && bytes < (int64_t(1) << 31);
}

// Runs the kernels of the widest instruction set that is built and that the CPU supports, on
// the work items [begin, end) of one thread, with that thread's scratch buffers. Args:
// cpu::ForwardArgs or cpu::BackwardArgs; fp16 / bf16 have the baseline build only.
template <typename Args>
void run_kernels(const Args& a, int64_t begin, int64_t end) {
  using scalar_t = typename Args::scalar_type;
  const cpu::ScratchBuffer scratch(a.pb);
  const cpu::Scratch& s = scratch.get();
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    switch (cpu_isa()) {
#ifdef UNIP_V2_CPU_KERNELS_AVX512
      case Isa::kAvx512: return cpu::kernels_avx512::run(a, s, begin, end);
#endif
#ifdef UNIP_V2_CPU_KERNELS_AVX2
      case Isa::kAvx2: return cpu::kernels_avx2::run(a, s, begin, end);
#endif
      default: break;
    }
  }
  cpu::kernels_default::run(a, s, begin, end);
}

// The sizes of one call. The kernels index value rows through spatial_shapes and
// level_start_index; check_ms_deform_attn_inputs (ms_deform_attn.cpp) has checked them against
// each other and against S, with overflow checks, before any backend runs.
cpu::Problem make_problem(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index,
                          const at::Tensor& sampling_locations) {
  return cpu::Problem{value.size(0),
                      value.size(1),
                      value.size(2),
                      value.size(3),
                      sampling_locations.size(1),
                      sampling_locations.size(3),
                      sampling_locations.size(4),
                      spatial_shapes.data_ptr<int64_t>(),
                      level_start_index.data_ptr<int64_t>()};
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
  const cpu::Problem pb =
      make_problem(value, spatial_shapes, level_start_index, sampling_locations);
  auto out = at::empty({pb.N, pb.Lq, pb.M * pb.D}, value.options());  // fully written below
  if (out.numel() == 0) return out;
  const bool lanes = lane_geometry(pb);
  // 32 queries per task: small scheduling overhead, still balanced at decoder sizes.
  constexpr int64_t grain = 32;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
        const cpu::ForwardArgs<scalar_t> args{pb,
                                              value.data_ptr<scalar_t>(),
                                              sampling_locations.data_ptr<scalar_t>(),
                                              attention_weights.data_ptr<scalar_t>(),
                                              out.data_ptr<scalar_t>(),
                                              lanes};
        at::parallel_for(0, pb.N * pb.Lq, grain, [&](int64_t begin, int64_t end) {
          run_kernels(args, begin, end);
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
  const cpu::Problem pb =
      make_problem(value, spatial_shapes, level_start_index, sampling_locations);
  // The kernels write every sampling location's and attention weight's gradient (no zero
  // fill needed) whenever they run; grad_value is scatter-added into zeros.
  const bool run = pb.N * pb.Lq * pb.M * pb.D > 0 && value.numel() > 0;
  auto grad_loc = run ? at::empty_like(sampling_locations) : at::zeros_like(sampling_locations);
  auto grad_attn = run ? at::empty_like(attention_weights) : at::zeros_like(attention_weights);
  // fp16/bf16 scatter into an fp32 buffer, cast once at the end.
  const bool reduced = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  auto grad_value = at::zeros_like(value, reduced ? value.options().dtype(at::kFloat)
                                                  : value.options());
  if (run) {
    const bool lanes = lane_geometry(pb);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
          using grad_t = at::opmath_type<scalar_t>;
          const cpu::BackwardArgs<scalar_t, grad_t> args{
              pb,
              value.data_ptr<scalar_t>(),
              sampling_locations.data_ptr<scalar_t>(),
              attention_weights.data_ptr<scalar_t>(),
              grad_output.data_ptr<scalar_t>(),
              grad_value.data_ptr<grad_t>(),
              grad_loc.data_ptr<scalar_t>(),
              grad_attn.data_ptr<scalar_t>(),
              lanes};
          at::parallel_for(0, pb.N * pb.M, 1, [&](int64_t begin, int64_t end) {
            run_kernels(args, begin, end);
          });
        });
  }
  if (reduced) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace unip_v2
