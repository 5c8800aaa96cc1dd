// Grouped feature-space forward: X^T X, Y^T Y, X^T Y and column sums for every pair, one launch.
#include "gram_cross_fwd.cuh"

namespace gk {
cudaError_t launch_cross_fwd(DType dt, const FwdJob* jobs, int num_jobs,
                             const FwdWork* work, int64_t num_work, cudaStream_t stream) {
  return launch_forward</*CROSS=*/true>(dt, jobs, num_jobs, work, num_work, stream);
}
}  // namespace gk
