// Grouped Gram forward: K_l = X_l X_l^T for every layer, symmetric tiles, split-K, one launch.
#include "product_fwd.cuh"

namespace gk {
cudaError_t launch_gram_fwd(DType dt, const ProductJob* jobs, int num_jobs,
                            const ProductWork* work, int64_t num_work, cudaStream_t stream) {
  return launch_product_fwd</*TN=*/false>(dt, jobs, num_jobs, work, num_work, stream);
}
}  // namespace gk
