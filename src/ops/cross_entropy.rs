//! wip
use crate::gpu::Kernel;
/// wip
pub fn kernels() -> Vec<Kernel> {
    vec![]
}
