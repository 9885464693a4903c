// What this build of the kernels is: its vector width per kernel family and its bf16 dot product, as the
// compiler's target flags made them (see simd.h). tokenforge.kernels reports it and the tests check it.
#include "simd.h"  // first: it includes immintrin.h (see there)

#define TF_STR2(x) #x
#define TF_STR(x) TF_STR2(x)

extern "C" {

const char* tf_build_info() {
  static const char info[] = "avx512=" TF_STR(TF_AVX512) " gemv=" TF_STR(TF_WIDE_GEMV) " panel=" TF_STR(
      TF_WIDE_PANEL) " attention=" TF_STR(TF_WIDE_ATTN) " fused=" TF_STR(TF_WIDE_FUSED) " bf16_dot=" TF_STR(TF_BF16_DOT);
  return info;
}
}
