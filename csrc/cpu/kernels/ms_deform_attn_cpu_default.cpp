// The CPU kernels built for the baseline of the target architecture (x86-64: SSE2; Arm: NEON),
// with no extra compiler flags: every machine can run them. fp16 / bf16 are built here only.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define UNIP_V2_CPU_KERNELS kernels_default
#define UNIP_V2_CPU_KERNELS_REDUCED_PRECISION
#include "ms_deform_attn_cpu_impl.h"
