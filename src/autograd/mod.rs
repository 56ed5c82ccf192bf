//! Reverse-mode automatic differentiation over GPU tensors.
//!
//! ```ignore
//! let tape = Tape::new();
//! let x = tape.constant(batch);
//! let h = x.linear(&tape.param(&w1), Some(&tape.param(&b1)), false, Act::Relu)?;
//! let loss = cross_entropy(&h.linear(&tape.param(&w2), None, false, Act::None)?, &targets, &Default::default())?;
//! tape.backward(&loss)?;          // grads land in w1.grad, b1.grad, w2.grad
//! ```

pub mod check;
pub mod ops;
pub mod tape;

pub use ops::{attention, cross_entropy, embedding, embedding_csr, CeOptions, LoraTerm};
pub use tape::{Gradients, Param, Tape, Var};
