// Grouped Gram backward: dX_l = M_l X_l (M_l fp32 n x n), one launch for every layer.
#include "gram_cross_bwd.cuh"

namespace gk {
cudaError_t launch_gram_bwd(DType dt, const BwdJob* jobs, int num_jobs, int64_t num_blocks,
                            cudaStream_t stream) {
  return launch_backward</*CROSS=*/false>(dt, jobs, num_jobs, num_blocks, stream);
}
}  // namespace gk
