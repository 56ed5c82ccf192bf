//! genrec: LLM-based generative recommenders on any GPU through WebGPU.
//!
//! Layers, lowest first: `gpu` (device, tensors) -> `ops` (WGSL kernels with
//! CPU references) -> `autograd` -> `nn` -> models/quant/cf -> systems ->
//! decode/eval. Lower layers never import higher ones.

pub mod autograd;
pub mod bench;
pub mod cf;
pub mod config;
pub mod data;
pub mod decode;
pub mod eval;
pub mod gpu;
pub mod io;
pub mod models;
pub mod nn;
pub mod ops;
pub mod pipeline;
pub mod quant;
pub mod shaders;
pub mod systems;
pub mod tokenize;
