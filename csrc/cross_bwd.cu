// Grouped feature-space backward: dX_l = X_l M_l + Y_l N_l + 1 v_l^T, one launch for all pairs.
#include "gram_cross_bwd.cuh"

namespace gk {
cudaError_t launch_cross_bwd(DType dt, const BwdJob* jobs, int num_jobs, int64_t num_blocks,
                             cudaStream_t stream) {
  return launch_backward</*CROSS=*/true>(dt, jobs, num_jobs, num_blocks, stream);
}
}  // namespace gk
