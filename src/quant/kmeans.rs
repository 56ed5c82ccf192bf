//! stub
pub fn kernels() -> Vec<crate::gpu::Kernel> { Vec::new() }
