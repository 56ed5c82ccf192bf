//! Kernel descriptions: which shader file, entry point and compile-time
//! constants. The source is assembled from `shaders/*.wgsl` (embedded at build
//! time) with a tiny include step: a line `//!include name` is replaced by the
//! contents of `shaders/name.wgsl`.

use anyhow::{anyhow, bail, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/shaders.rs"));
}

/// The raw text of `shaders/<stem>.wgsl`.
pub fn shader_file(stem: &str) -> Result<&'static str> {
    embedded::SHADERS
        .iter()
        .find(|(n, _)| *n == stem)
        .map(|(_, s)| *s)
        .ok_or_else(|| anyhow!("no shader file shaders/{stem}.wgsl"))
}

/// All embedded shader file stems.
pub fn shader_files() -> impl Iterator<Item = &'static str> {
    embedded::SHADERS.iter().map(|(n, _)| *n)
}

/// One compute pipeline variant.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Op name used in errors and debug labels, e.g. "matmul".
    pub name: &'static str,
    /// Shader file stem in `shaders/`.
    pub shader: &'static str,
    /// Entry point function.
    pub entry: &'static str,
    /// Compile-time constants, prepended as `const NAME = VALUE;` (VALUE is WGSL text,
    /// e.g. "64u" or "1.0").
    pub defines: Vec<(&'static str, String)>,
    /// Prepend `enable f16;`.
    pub f16: bool,
    /// Compile without runtime bounds checks. Only for kernels whose indexing is
    /// proven in-bounds by their tests at awkward shapes.
    pub trusted: bool,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct PipelineKey(String);

impl Kernel {
    pub fn new(name: &'static str, shader: &'static str, entry: &'static str) -> Kernel {
        Kernel { name, shader, entry, defines: Vec::new(), f16: false, trusted: false }
    }
    /// Add a compile-time constant (`value` is WGSL text).
    pub fn define(mut self, name: &'static str, value: impl ToString) -> Kernel {
        self.defines.push((name, value.to_string()));
        self
    }
    pub fn with_f16(mut self, on: bool) -> Kernel {
        self.f16 = on;
        self
    }
    pub fn trusted(mut self, on: bool) -> Kernel {
        self.trusted = on;
        self
    }

    pub(crate) fn key(&self) -> PipelineKey {
        let mut k = format!("{}:{}:{}:{}", self.shader, self.entry, self.f16, self.trusted);
        for (n, v) in &self.defines {
            k.push_str(&format!(";{n}={v}"));
        }
        PipelineKey(k)
    }

    /// The full WGSL source of this variant.
    pub fn source(&self) -> Result<String> {
        let mut out = String::new();
        if self.f16 {
            out.push_str("enable f16;\n");
        }
        for (n, v) in &self.defines {
            out.push_str(&format!("const {n} = {v};\n"));
        }
        expand_includes(self.shader, &mut out, 0)?;
        Ok(out)
    }
}

fn expand_includes(stem: &str, out: &mut String, depth: usize) -> Result<()> {
    if depth > 8 {
        bail!("shader include nesting too deep at shaders/{stem}.wgsl");
    }
    for line in shader_file(stem)?.lines() {
        if let Some(rest) = line.trim().strip_prefix("//!include ") {
            expand_includes(rest.trim(), out, depth + 1)?;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(())
}

/// Validate a kernel's WGSL with naga (no device needed). Used by the shader tests.
pub fn validate_wgsl(kernel: &Kernel) -> Result<()> {
    let src = kernel.source()?;
    let module = naga::front::wgsl::parse_str(&src)
        .map_err(|e| anyhow!("{} ({}): WGSL parse error:\n{}", kernel.name, kernel.shader, e.emit_to_string(&src)))?;
    let mut caps = naga::valid::Capabilities::default();
    caps |= naga::valid::Capabilities::SHADER_FLOAT16;
    caps |= naga::valid::Capabilities::SUBGROUP;
    // unpack2x16float & co. are core WGSL; wgpu grants this on Vulkan/Metal/DX12.
    caps |= naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
        .subgroup_operations(naga::valid::SubgroupOperationSet::all())
        .validate(&module)
        .map_err(|e| {
            anyhow!("{} ({}): WGSL validation error:\n{}", kernel.name, kernel.shader, e.emit_to_string(&src))
        })?;
    if !module.entry_points.iter().any(|e| e.name == kernel.entry) {
        bail!("{}: shaders/{}.wgsl has no entry point {}", kernel.name, kernel.shader, kernel.entry);
    }
    Ok(())
}

/// Ceil-divide, for dispatch grids.
pub fn div_ceil(a: usize, b: usize) -> u32 {
    a.div_ceil(b) as u32
}
