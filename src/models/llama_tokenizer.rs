//! Byte-level BPE tokenizer of a LLaMA-family model, built from GGUF metadata
//! (`tokenizer.ggml.*`: tokens, merges, token types, special ids) with the `tokenizers` crate,
//! or read from a Hugging Face `tokenizer.json`.
//!
//! GGUF pre-tokenizers: `smollm` (SmolLM2: every digit split off, then GPT-2's byte-level
//! regex, as its tokenizer.json) and `gpt2`/`default`/absent (byte-level only). Tokens typed
//! control (3) or user-defined (4) become added special tokens, so `<|im_start|>` in text
//! encodes as one id.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::io::gguf::GgufTokenizer;

/// A tokenizer plus the special ids generation needs.
pub struct LlamaTokenizer {
    pub inner: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Prepend BOS in [`LlamaTokenizer::encode`] when asked for special tokens.
    pub add_bos: bool,
}

impl LlamaTokenizer {
    /// From GGUF tokenizer metadata (`Gguf::tokenizer()`); `what` names the file in errors.
    pub fn from_gguf(t: &GgufTokenizer, what: &str) -> Result<LlamaTokenizer> {
        if t.model != "gpt2" {
            bail!("{what}: tokenizer model {:?} is not supported (only byte-level BPE, \"gpt2\")", t.model);
        }
        let mut vocab = Vocab::default();
        for (i, tok) in t.tokens.iter().enumerate() {
            if vocab.insert(tok.clone(), i as u32).is_some() {
                bail!("{what}: token {tok:?} appears twice in tokenizer.ggml.tokens (second at id {i})");
            }
        }
        let mut merges = Vec::with_capacity(t.merges.len());
        for (i, m) in t.merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| anyhow!("{what}: merge #{i} {m:?} is not \"a b\""))?;
            for part in [a, b] {
                if !vocab.contains_key(part) {
                    bail!("{what}: merge #{i} {m:?} uses {part:?}, which is not in the vocabulary");
                }
            }
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("{what}: building the BPE model: {e}"))?;
        let mut tok = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match t.pre.as_deref() {
            Some("smollm") => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            None | Some("gpt2") | Some("default") => byte_level.into(),
            Some(other) => bail!("{what}: pre-tokenizer {other:?} is not supported (smollm, gpt2, default)"),
        };
        tok.with_pre_tokenizer(Some(pre));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = t
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, &ty)| ty == 3 || ty == 4)
            .map(|(i, _)| AddedToken::from(t.tokens[i].clone(), true))
            .collect();
        tok.add_special_tokens(&special);
        Ok(LlamaTokenizer { inner: tok, bos_id: t.bos_id, eos_id: t.eos_id, add_bos: t.add_bos.unwrap_or(false) })
    }

    /// From a GGUF file's metadata.
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<LlamaTokenizer> {
        let g = crate::io::gguf::Gguf::open(path.as_ref())?;
        Self::from_gguf(&g.tokenizer()?, &path.as_ref().display().to_string())
    }

    /// From a HF `tokenizer.json` (special ids unknown).
    pub fn from_file(path: impl AsRef<Path>) -> Result<LlamaTokenizer> {
        let p = path.as_ref();
        let inner = Tokenizer::from_file(p).map_err(|e| anyhow!("{}: reading tokenizer: {e}", p.display()))?;
        Ok(LlamaTokenizer { inner, bos_id: None, eos_id: None, add_bos: false })
    }

    /// Token ids of `text`; with `special`, BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizer: encoding {text:?}: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if special && self.add_bos {
            if let Some(b) = self.bos_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids` (special tokens kept unless `skip_special`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("tokenizer: decoding {} ids: {e}", ids.len()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Error unless the tokenizer's ids fit a model with `model_vocab` embedding rows.
    pub fn check_model_vocab(&self, model_vocab: usize, what: &str) -> Result<()> {
        let n = self.vocab_size();
        if n > model_vocab {
            bail!("{what}: tokenizer has {n} tokens but the model's embedding has only {model_vocab} rows");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny byte-level BPE: the 256 byte symbols, merges for "he", "ll", "hell", "hello",
    /// "Ġw", and two control tokens.
    fn tiny() -> GgufTokenizer {
        let bl = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut tokens: Vec<String> = bl.into_iter().map(|c| c.to_string()).collect();
        tokens.sort();
        let merges: Vec<String> = ["h e", "l l", "he ll", "hell o", "Ġ w"].iter().map(|s| s.to_string()).collect();
        for m in &merges {
            tokens.push(m.replace(' ', ""));
        }
        tokens.push("<|im_start|>".into());
        tokens.push("<|endoftext|>".into());
        let mut types = vec![1; tokens.len()];
        let n = types.len();
        types[n - 2] = 3;
        types[n - 1] = 3;
        GgufTokenizer {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            token_types: types,
            merges,
            scores: vec![],
            bos_id: Some(n as u32 - 1),
            eos_id: Some(n as u32 - 1),
            unk_id: None,
            pad_id: None,
            add_bos: Some(false),
            add_eos: None,
            chat_template: None,
            tokens,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let t = tiny();
        let tok = LlamaTokenizer::from_gguf(&t, "tiny").unwrap();
        let id = |s: &str| t.tokens.iter().position(|x| x == s).unwrap() as u32;
        let ids = tok.encode("hello world", false).unwrap();
        assert_eq!(ids[0], id("hello"));
        assert_eq!(ids[1], id("Ġw"));
        for s in ["hello world", "Hello, wörld! 123 ∑ 🙂", "<|im_start|>user\nhello<|endoftext|>", " a  b\t\n", "x"]
        {
            let ids = tok.encode(s, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), s, "round trip of {s:?} via {ids:?}");
        }
        // Special tokens are single ids; digits are split one by one.
        assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![id("<|im_start|>")]);
        assert_eq!(tok.encode("123", false).unwrap(), vec![id("1"), id("2"), id("3")]);
        assert!(tok.check_model_vocab(t.tokens.len(), "m").is_ok());
        let e = tok.check_model_vocab(10, "model.gguf").unwrap_err().to_string();
        assert!(e.contains("model.gguf") && e.contains("10"), "{e}");
    }

    #[test]
    fn bad_metadata_is_an_error_naming_the_file() {
        let mut t = tiny();
        t.merges.push("h zz".into());
        let e = LlamaTokenizer::from_gguf(&t, "bad.gguf").err().unwrap().to_string();
        assert!(e.contains("bad.gguf") && e.contains("zz"), "{e}");
        let mut t = tiny();
        t.model = "llama".into();
        assert!(LlamaTokenizer::from_gguf(&t, "spm.gguf").is_err());
    }
}
