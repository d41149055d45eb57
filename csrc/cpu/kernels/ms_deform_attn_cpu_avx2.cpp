// The CPU kernels built for AVX2 + FMA (setup.py compiles this file with -mavx2 -mfma).
#if !defined(__AVX2__) || !defined(__FMA__)
#error "ms_deform_attn_cpu_avx2.cpp must be compiled with -mavx2 -mfma (see setup.py)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define UNIP_V2_CPU_KERNELS kernels_avx2
#include "ms_deform_attn_cpu_impl.h"
