// Grouped Gram backward: dX_l = M_l X_l (M_l fp32 n x n), one launch for every layer.
#include "mixed_bwd.cuh"

namespace gk {
cudaError_t launch_gram_bwd(DType dt, const MixedJob* jobs, int num_jobs, int64_t num_blocks,
                            cudaStream_t stream) {
  return launch_mixed_bwd</*A_IS_ACT=*/false>(dt, jobs, num_jobs, num_blocks, stream);
}
}  // namespace gk
