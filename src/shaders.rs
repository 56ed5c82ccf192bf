//! The registry of every compiled kernel variant, across layers (ops, quant,
//! bench probes), and the device-free WGSL validation tests over it.

use crate::gpu::Kernel;

/// Every kernel variant genrec compiles.
pub fn all_kernels() -> Vec<Kernel> {
    [
        crate::ops::kernels(),
        crate::quant::kernels(),
        crate::bench::kernels(),
        crate::decode::kernels(),
        crate::tokenize::mq::kernels(),
    ]
    .concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernel::{shader_files, validate_wgsl};

    #[test]
    fn all_wgsl_passes_naga_validation() {
        let mut errors = Vec::new();
        for k in all_kernels() {
            if let Err(e) = validate_wgsl(&k) {
                errors.push(format!("{e:#}"));
            }
        }
        assert!(errors.is_empty(), "{}", errors.join("\n\n"));
    }

    #[test]
    fn every_shader_file_is_covered_by_a_kernel() {
        let used: std::collections::HashSet<&str> = all_kernels().iter().map(|k| k.shader).collect();
        // Snippet files (only included by others) start with an underscore.
        let missing: Vec<&str> = shader_files().filter(|s| !s.starts_with('_') && !used.contains(s)).collect();
        assert!(missing.is_empty(), "shaders not listed in shaders::all_kernels(): {missing:?}");
    }
}
