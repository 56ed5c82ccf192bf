//! Model architectures built on `nn` and `autograd`: T5 (TIGER-sized
//! encoder-decoder, trained from scratch), BERT (MiniLM item-text encoder) and
//! the LLaMA family (SmolLM2), each trainable and with an inference fast path.

pub mod bert;
pub mod embed;
pub mod llama;
pub mod llama_tokenizer;
pub mod t5;
