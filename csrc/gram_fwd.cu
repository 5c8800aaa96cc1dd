// Grouped Gram forward: K_l = X_l X_l^T for every layer, symmetric tiles, split-K, one launch.
#include "gram_cross_fwd.cuh"

namespace gk {
cudaError_t launch_gram_fwd(DType dt, const FwdJob* jobs, int num_jobs,
                            const FwdWork* work, int64_t num_work, cudaStream_t stream) {
  return launch_forward</*CROSS=*/false>(dt, jobs, num_jobs, work, num_work, stream);
}
}  // namespace gk
