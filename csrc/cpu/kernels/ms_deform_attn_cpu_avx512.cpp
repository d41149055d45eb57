// The CPU kernels built for AVX-512 (F, BW, VL, DQ) + FMA (setup.py compiles this file with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma).
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__)
#error "compile ms_deform_attn_cpu_avx512.cpp with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define UNIP_V2_CPU_KERNELS kernels_avx512
#include "ms_deform_attn_cpu_impl.h"
