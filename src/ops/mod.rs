//! Kernels: one family per file, paired with `shaders/<family>.wgsl`.
//!
//! Each file holds the launcher(s), a plain CPU reference (clear loops, f64
//! accumulation) and tests: GPU vs CPU at awkward sizes (1, 7, 33, 257, ...),
//! and for every backward kernel a finite-difference check against the CPU
//! reference forward evaluated in f64.
//!
//! Launchers take `&Tensor`s and return `Result<Tensor>`; they validate shapes
//! and dtypes and name the op and shapes in every error. They only *record*
//! work (see `gpu`), so a chain of ops is one submission.

use crate::gpu::Kernel;

#[cfg(test)]
pub mod testing;

/// Every kernel variant genrec compiles, for naga validation without a device.
/// Each op module lists its variants in a `kernels()` function.
pub fn all_kernels() -> Vec<Kernel> {
    let v: Vec<Kernel> = Vec::new();
    v
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
        assert!(missing.is_empty(), "shaders not listed in ops::all_kernels(): {missing:?}");
    }
}
