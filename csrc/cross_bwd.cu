// Grouped feature-space backward: dX_l = X_l M_l + Y_l N_l + 1 v_l^T, one launch for all pairs.
#include "mixed_bwd.cuh"

namespace gk {
cudaError_t launch_cross_bwd(DType dt, const MixedJob* jobs, int num_jobs, int64_t num_blocks,
                             cudaStream_t stream) {
  return launch_mixed_bwd</*A_IS_ACT=*/true>(dt, jobs, num_jobs, num_blocks, stream);
}
}  // namespace gk
