//! The generative recommenders, each composed from models, tokenizers and
//! constrained decoding: TIGER and LETTER-TIGER (T5 over semantic IDs).

pub mod seq;
pub mod tiger;
