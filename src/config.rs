//! System configuration: `models/systems.toml` (compiled in) or a user file of
//! the same layout, plus `--set STAGE.KEY=VALUE` overrides.
//!
//! The file holds one table per stage (`sasrec`, `tokenizer`, `model`) under
//! three headings that are merged key by key: `[tiger.*]` (the full budget,
//! the papers' settings), `[letter.*]` (LETTER-TIGER's changes) and `[small.*]`
//! (the CPU-adapter budget's changes). The merged tables are deserialized into
//! the stages' Rust types, which reject unknown keys, so a typo in a file or an
//! override is an error naming the file, the stage and the key.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use toml::{Table, Value};

use crate::cf::sasrec::SasRecConfig;
use crate::pipeline::System;
use crate::systems::lcrec::LcRecConfig;
use crate::systems::tiger::TigerConfig;
use crate::tokenize::{Method, TokenizerConfig};

/// The compiled-in defaults (`models/systems.toml`).
pub const DEFAULTS: &str = include_str!("../models/systems.toml");
const DEFAULTS_NAME: &str = "models/systems.toml";

/// The stages a system file configures.
const STAGES: [&str; 4] = ["sasrec", "tokenizer", "model", "llm"];
const HEADINGS: [&str; 4] = ["tiger", "letter", "letter-llm", "small"];

/// Where a configuration comes from besides the system, budget and seed.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    /// A file in the layout of `models/systems.toml` replacing the defaults.
    pub file: Option<PathBuf>,
    /// `STAGE.KEY=VALUE` overrides, applied last in order (VALUE is a TOML
    /// value; anything that does not parse as one is taken as a string).
    pub sets: Vec<String>,
}

impl ConfigSource {
    /// Whether this is exactly the compiled-in defaults.
    pub fn is_default(&self) -> bool {
        self.file.is_none() && self.sets.is_empty()
    }
}

/// Every setting of one system at one budget.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    /// The collaborative model whose item embeddings LETTER uses (and the SASRec baseline).
    pub sasrec: SasRecConfig,
    pub tokenizer: TokenizerConfig,
    /// The T5 generator (TIGER, LETTER-TIGER).
    pub model: TigerConfig,
    /// The LLM generator (LETTER-LLM only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LcRecConfig>,
}

impl SystemConfig {
    /// The compiled-in defaults of `system` at a budget.
    pub fn defaults(system: System, full: bool, seed: u64, history: usize) -> Result<SystemConfig> {
        Self::resolve(system, full, seed, history, &ConfigSource::default())
    }

    /// Merge `[tiger.*]`, then `[letter.*]` (LETTER systems), then `[small.*]`
    /// (small budget), then the overrides; seeds are `seed`, and
    /// `sasrec.max_len` is `history` unless set.
    pub fn resolve(system: System, full: bool, seed: u64, history: usize, src: &ConfigSource) -> Result<SystemConfig> {
        let (text, name) = match &src.file {
            Some(p) => (
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (DEFAULTS.to_string(), DEFAULTS_NAME.to_string()),
        };
        let root: Table = text.parse().with_context(|| format!("{name}: not valid TOML"))?;
        for key in root.keys() {
            if !HEADINGS.contains(&key.as_str()) {
                bail!(
                    "{name}: unknown heading [{key}]; expected one of {}",
                    HEADINGS.map(|h| format!("[{h}.*]")).join(", ")
                );
            }
        }
        let mut headings = vec!["tiger"];
        if matches!(system, System::Letter | System::LetterLlm) {
            headings.push("letter");
        }
        if system == System::LetterLlm {
            headings.push("letter-llm");
        }
        if !full {
            headings.push("small");
        }
        let mut stages: Vec<Table> = vec![Table::new(); STAGES.len()];
        for heading in headings {
            let Some(h) = root.get(heading) else { continue };
            let h = h.as_table().with_context(|| format!("{name}: [{heading}] must be a table"))?;
            for (stage, v) in h {
                let Some(i) = STAGES.iter().position(|s| s == stage) else {
                    bail!("{name}: unknown stage [{heading}.{stage}]; expected one of {}", STAGES.join(", "));
                };
                let t = v.as_table().with_context(|| format!("{name}: [{heading}.{stage}] must be a table"))?;
                stages[i].extend(t.clone());
            }
        }
        for set in &src.sets {
            let (path, value) = parse_set(set)?;
            let (stage, key) = path.split_once('.').unwrap_or(("", path));
            let Some(i) = STAGES.iter().position(|s| *s == stage) else {
                bail!("--set {set:?}: expected STAGE.KEY=VALUE with STAGE one of {}", STAGES.join(", "));
            };
            if key == "seed" {
                bail!("--set {set:?}: seeds come from --seed");
            }
            if stage == "llm" && system != System::LetterLlm {
                bail!("--set {set:?}: llm settings apply to --system letter-llm only");
            }
            stages[i].insert(key.to_string(), value);
        }
        for t in &mut stages {
            t.insert("seed".into(), Value::Integer(seed as i64));
        }
        let [sasrec, tokenizer, model, llm] = stages.try_into().expect("four stages");
        let mut sasrec = sasrec;
        sasrec.entry("max_len").or_insert(Value::Integer(history.max(1) as i64));

        // Tokenizer keys not given take the method's own defaults.
        let method: Method = match tokenizer.get("method") {
            Some(m) => m.clone().try_into().with_context(|| format!("{name}: tokenizer.method"))?,
            None => Method::RqVae,
        };
        let mut tok = Table::try_from(TokenizerConfig::for_method(method)).context("serializing tokenizer defaults")?;
        tok.extend(tokenizer);

        let what = |stage: &str| format!("{name} (with the overrides): the merged [{stage}] settings");
        Ok(SystemConfig {
            sasrec: Value::Table(sasrec).try_into().with_context(|| what("sasrec"))?,
            tokenizer: Value::Table(tok).try_into().with_context(|| what("tokenizer"))?,
            model: Value::Table(model).try_into().with_context(|| what("model"))?,
            llm: match system {
                System::LetterLlm => Some(Value::Table(llm).try_into().with_context(|| what("llm"))?),
                _ => None,
            },
        })
    }

    /// The resolved configuration as TOML (what `genrec config` prints and a
    /// run directory keeps).
    pub fn to_toml(&self) -> Result<String> {
        // Through JSON text so f32 settings print as written (0.2, not 0.20000000298023224);
        // TOML has no null, so unset options are left out.
        let mut v: serde_json::Value = serde_json::from_str(&serde_json::to_string(self)?)?;
        fn drop_nulls(v: &mut serde_json::Value) {
            if let serde_json::Value::Object(m) = v {
                m.retain(|_, x| !x.is_null());
                m.values_mut().for_each(drop_nulls);
            }
        }
        drop_nulls(&mut v);
        toml::to_string(&v).context("serializing the configuration")
    }
}

/// `stage.key=value` -> (`stage.key`, value).
fn parse_set(s: &str) -> Result<(&str, Value)> {
    let Some((path, raw)) = s.split_once('=') else {
        bail!("--set {s:?}: expected STAGE.KEY=VALUE");
    };
    let (path, raw) = (path.trim(), raw.trim());
    let value = match format!("v = {raw}").parse::<Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => Value::String(raw.to_string()),
    };
    Ok((path, value))
}

/// A short tag naming a non-default configuration (for run directories).
pub fn tag(cfg: &SystemConfig) -> Result<String> {
    let fp = crate::io::checkpoint::fingerprint_json(cfg)?;
    Ok(fp.chars().take(8).collect())
}

impl SystemConfig {
    /// Read a configuration written by [`SystemConfig::to_toml`] back (a run
    /// directory's record of how it was trained).
    pub fn read(path: &Path) -> Result<SystemConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: not a genrec system configuration", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers_and_the_small_budget() {
        let full = SystemConfig::defaults(System::Tiger, true, 7, 20).unwrap();
        // TIGER as the LETTER code configures it (letter.spec.md §2.4).
        let m = &full.model;
        assert_eq!((m.d_model, m.heads, m.d_kv, m.d_ff, m.enc_layers, m.dec_layers), (128, 6, 64, 1024, 4, 4));
        assert_eq!((m.lr, m.batch_size, m.epochs, m.beams, m.tau, m.seed), (5e-4, 1024, 200, 20, 1.0, 7));
        assert_eq!((full.sasrec.d_model, full.sasrec.max_len, full.sasrec.seed), (32, 20, 7));
        // The tokenizer is the method's defaults except the epoch budget.
        let want = TokenizerConfig { epochs: 2000, eval_every: 100, seed: 7, ..TokenizerConfig::rqvae() };
        assert_eq!(serde_json::to_value(&full.tokenizer).unwrap(), serde_json::to_value(&want).unwrap());

        let letter = SystemConfig::defaults(System::Letter, true, 7, 20).unwrap();
        assert_eq!(letter.model, TigerConfig { tau: 0.7, ..full.model.clone() });
        let want = TokenizerConfig { epochs: 2000, eval_every: 100, seed: 7, ..TokenizerConfig::letter() };
        assert_eq!(serde_json::to_value(&letter.tokenizer).unwrap(), serde_json::to_value(&want).unwrap());

        assert!(letter.llm.is_none());
        let llm = SystemConfig::defaults(System::LetterLlm, true, 7, 20).unwrap().llm.unwrap();
        assert_eq!((llm.lora_r, llm.lora_alpha, llm.lora_dropout, llm.lr, llm.tau), (8, 32.0, 0.05, 1e-4, 0.7));
        assert_eq!((llm.max_items, llm.beams, llm.seed), (20, 20, 7));
        let llm_small = SystemConfig::defaults(System::LetterLlm, false, 7, 20).unwrap().llm.unwrap();
        assert_eq!((llm_small.max_items, llm_small.samples_per_epoch, llm_small.lora_r), (5, 256, 8));

        let small = SystemConfig::defaults(System::Letter, false, 7, 20).unwrap();
        assert_eq!((small.model.d_model, small.model.epochs, small.model.tau), (64, 4, 0.7));
        assert_eq!((small.tokenizer.epochs, small.tokenizer.method), (60, Method::Letter));
        assert_eq!((small.sasrec.epochs, small.sasrec.batch_size), (8, 256));
    }

    #[test]
    fn overrides_apply_last_and_typos_are_errors() {
        let src = ConfigSource {
            file: None,
            sets: vec!["model.tau=0.8".into(), "model.epochs = 3".into(), "sasrec.max_len=9".into()],
        };
        let c = SystemConfig::resolve(System::Letter, false, 1, 20, &src).unwrap();
        assert_eq!((c.model.tau, c.model.epochs, c.sasrec.max_len), (0.8, 3, 9));
        assert_ne!(tag(&c).unwrap(), tag(&SystemConfig::defaults(System::Letter, false, 1, 20).unwrap()).unwrap());

        for (set, needle) in [
            ("model.lrr=1", "lrr"),
            ("modle.lr=1", "STAGE"),
            ("model.lr", "STAGE.KEY=VALUE"),
            ("model.seed=3", "--seed"),
            ("model.epochs=many", "epochs"),
            ("llm.lora_r=4", "letter-llm only"),
        ] {
            let src = ConfigSource { file: None, sets: vec![set.into()] };
            let e = format!("{:#}", SystemConfig::resolve(System::Tiger, true, 1, 20, &src).unwrap_err());
            assert!(e.contains(needle), "{set}: {e}");
        }
    }

    #[test]
    fn a_user_file_replaces_the_defaults_and_names_itself_in_errors() {
        let dir = crate::io::TestDir::new("config");
        let good = dir.path().join("mine.toml");
        let text = DEFAULTS.replace("tau = 0.7", "tau = 0.9");
        std::fs::write(&good, text).unwrap();
        let src = ConfigSource { file: Some(good), sets: vec![] };
        let c = SystemConfig::resolve(System::Letter, true, 1, 20, &src).unwrap();
        assert_eq!(c.model.tau, 0.9);

        // The resolved form reads back unchanged.
        let out = dir.path().join("resolved.toml");
        std::fs::write(&out, c.to_toml().unwrap()).unwrap();
        let back = SystemConfig::read(&out).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&c).unwrap());

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, DEFAULTS.replace("d_model = 128", "d_model = \"wide\"")).unwrap();
        let src = ConfigSource { file: Some(bad.clone()), sets: vec![] };
        let e = format!("{:#}", SystemConfig::resolve(System::Tiger, true, 1, 20, &src).unwrap_err());
        assert!(e.contains("bad.toml") && e.contains("[model]") && e.contains("d_model"), "{e}");
        std::fs::write(&bad, "[tigre.model]\n").unwrap();
        let e = format!("{:#}", SystemConfig::resolve(System::Tiger, true, 1, 20, &src).unwrap_err());
        assert!(e.contains("bad.toml") && e.contains("tigre"), "{e}");
    }
}
