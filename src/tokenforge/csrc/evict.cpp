// Evicts a buffer from every cache level, so that a timed call reads it from memory as a decode step
// reads weights that a whole model's worth of other weights pushed out (layers/matmul_plan.py).
#include <immintrin.h>

#include <cstdint>

extern "C" {

// clflushopt: unordered flushes that pipeline (~50x faster than clflush); the caller checks the CPU flag.
__attribute__((target("clflushopt"))) void tf_evict(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_clflushopt(const_cast<char*>(c + i));
  _mm_sfence();
}
}
