//! genrec: LLM-based generative recommenders on any GPU through WebGPU.
//!
//! Layers, lowest first: `gpu` (device, tensors) -> `ops` (WGSL kernels with
//! CPU references) -> `autograd` -> `nn` -> models/quant/cf -> systems ->
//! decode/eval. Lower layers never import higher ones.

pub mod gpu;
pub mod io;
pub mod ops;
