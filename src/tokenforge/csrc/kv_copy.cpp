// Whole KV blocks between the pool (one tensor per layer and per K/V) and a host tensor of block rows,
// [rows, pools, block bytes]: what a lower KV tier saves at eviction and loads back at admission. One
// memcpy per (block, pool) instead of a gather, a temporary and a scatter per pool in torch.
#include <cstdint>
#include <cstring>

extern "C" {

// pools: num_pools data pointers; block b of pool p starts at pools[p] + b * block_bytes. Row r of host
// holds its blocks' pools back to back (pool-major within the row). to_host: pool -> host, else host -> pool.
void tf_kv_copy_blocks(const int64_t* pools, int num_pools, int64_t block_bytes, const int64_t* block_ids,
                       const int64_t* rows, int n, char* host, int to_host) {
  const int64_t row_bytes = block_bytes * num_pools;
#pragma omp parallel for collapse(2) schedule(static)
  for (int i = 0; i < n; ++i) {
    for (int p = 0; p < num_pools; ++p) {
      char* pool = reinterpret_cast<char*>(pools[p]) + block_ids[i] * block_bytes;
      char* row = host + rows[i] * row_bytes + p * block_bytes;
      if (to_host)
        std::memcpy(row, pool, block_bytes);
      else
        std::memcpy(pool, row, block_bytes);
    }
  }
}
}
