// The work buffers of one thread of the CPU kernels (cpu::Scratch), laid out for a problem.
// Used by the dispatcher (ms_deform_attn_cpu.cpp) and by the standalone kernel check
// (tests/csrc/ms_deform_attn_cpu_check.cpp); compiled for the baseline only, never in the
// per-instruction-set kernel sources (see ms_deform_attn_cpu_kernels.h).
#pragma once

#include "ms_deform_attn_cpu_kernels.h"

#include <cstdint>
#include <vector>

namespace unip_v2 {
namespace cpu {

// 8 bytes per element covers every dtype and both offset widths; each array starts on a
// 64-byte boundary.
class ScratchBuffer {
 public:
  explicit ScratchBuffer(const Problem& pb) {
    const int64_t samples = pb.L * pb.P;
    const int64_t padded = (samples + kMaxLanes - 1) / kMaxLanes * kMaxLanes;
    const int64_t sizes[] = {2 * padded * 8, 4 * padded * 8, 4 * padded * 8,
                             4 * padded * 8, 2 * padded * 8, padded * 8,
                             4 * padded * kMaxLanes * 4, 4 * padded * 8, pb.D * 8,
                             pb.D * 8};
    int64_t total = 64;
    for (int64_t b : sizes) total += (b + 63) / 64 * 64;
    bytes_.resize(total);
    uint8_t* p = bytes_.data() + (64 - reinterpret_cast<uintptr_t>(bytes_.data()) % 64) % 64;
    void* parts[10];
    for (int i = 0; i < 10; ++i) {
      parts[i] = p;
      p += (sizes[i] + 63) / 64 * 64;
    }
    s_ = Scratch{padded,   parts[0], parts[1], parts[2], parts[3], parts[4],
                 parts[5], parts[6], parts[7], parts[8], parts[9]};
  }
  const Scratch& get() const { return s_; }

 private:
  std::vector<uint8_t> bytes_;
  Scratch s_;
};

}  // namespace cpu
}  // namespace unip_v2
