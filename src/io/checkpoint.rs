//! Training checkpoints: a safetensors file of named f32 tensors whose
//! `__metadata__` holds `"format": "genrec-checkpoint-v1"` and, under
//! `"genrec.checkpoint"`, a JSON string with the step, the model/training
//! config and fingerprints of the dataset and tokenizer it was trained on.
//! Written atomically (temporary file + rename), so a crash mid-save leaves
//! the previous checkpoint intact. Loading checks the fingerprints (and,
//! optionally, the config and tensor shapes) and names every mismatch.

use super::safetensors::{save as st_save, SafeTensorsFile, StoreDtype};
use super::HostTensor;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// `__metadata__["format"]` of a checkpoint.
pub const FORMAT: &str = "genrec-checkpoint-v1";
/// `__metadata__` key holding the JSON of `CheckpointMeta`.
pub const META_KEY: &str = "genrec.checkpoint";

/// What a checkpoint records besides its tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Optimizer steps taken.
    pub step: u64,
    /// Model and training configuration (any JSON).
    pub config: serde_json::Value,
    /// `fingerprint` of the prepared dataset (items, splits).
    pub dataset_fingerprint: String,
    /// `fingerprint` of the item tokenizer / vocabulary.
    pub tokenizer_fingerprint: String,
    /// Anything else (metrics, seeds); not checked on load.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: BTreeMap<String, HostTensor>,
}

/// What `load` checks; `None` fields are not checked.
#[derive(Clone, Debug, Default)]
pub struct Expect<'a> {
    pub dataset_fingerprint: Option<&'a str>,
    pub tokenizer_fingerprint: Option<&'a str>,
    /// Compared key by key; differing JSON paths are named.
    pub config: Option<&'a serde_json::Value>,
    /// Tensors that must be present with these shapes.
    pub shapes: Option<&'a BTreeMap<String, Vec<usize>>>,
}

/// Short stable fingerprint of some bytes: the first 16 hex digits of their sha256.
pub fn fingerprint(bytes: &[u8]) -> String {
    super::fetch::hex(&Sha256::digest(bytes))[..16].to_string()
}

/// `fingerprint` of a value's canonical JSON (serde_json with sorted map keys).
pub fn fingerprint_json<T: Serialize>(v: &T) -> Result<String> {
    // Round-trip through Value so that map keys are sorted (BTreeMap).
    let v = serde_json::to_value(v)?;
    Ok(fingerprint(serde_json::to_string(&v)?.as_bytes()))
}

/// Write a checkpoint atomically.
pub fn save(path: impl AsRef<Path>, tensors: &BTreeMap<String, HostTensor>, meta: &CheckpointMeta) -> Result<()> {
    let path = path.as_ref();
    let mut md = HashMap::new();
    md.insert("format".to_string(), FORMAT.to_string());
    md.insert(META_KEY.to_string(), serde_json::to_string(meta)?);
    st_save(path, tensors, Some(&md), StoreDtype::F32).with_context(|| format!("saving checkpoint {}", path.display()))
}

fn read_meta_of(f: &SafeTensorsFile) -> Result<CheckpointMeta> {
    let md = f.metadata();
    let p = f.path().display();
    match md.get("format") {
        Some(v) if v == FORMAT => {}
        Some(v) => bail!("{p}: checkpoint format {v:?}, expected {FORMAT:?}"),
        None => bail!("{p}: not a genrec checkpoint (no \"format\" in the safetensors metadata)"),
    }
    let s = md.get(META_KEY).ok_or_else(|| anyhow!("{p}: checkpoint lacks metadata {META_KEY:?}"))?;
    serde_json::from_str(s).with_context(|| format!("{p}: corrupt checkpoint metadata {META_KEY:?}"))
}

/// Only the metadata of a checkpoint.
pub fn read_meta(path: impl AsRef<Path>) -> Result<CheckpointMeta> {
    read_meta_of(&SafeTensorsFile::open(path)?)
}

/// Load a checkpoint and check it against `expect`; the error lists every
/// mismatch (fingerprints with both values, differing config paths, missing
/// or mis-shaped tensors).
pub fn load(path: impl AsRef<Path>, expect: &Expect) -> Result<Checkpoint> {
    let f = SafeTensorsFile::open(path)?;
    let meta = read_meta_of(&f)?;
    let mut problems = Vec::new();
    if let Some(want) = expect.dataset_fingerprint {
        if want != meta.dataset_fingerprint {
            problems.push(format!("dataset fingerprint: checkpoint has {}, expected {want}", meta.dataset_fingerprint));
        }
    }
    if let Some(want) = expect.tokenizer_fingerprint {
        if want != meta.tokenizer_fingerprint {
            problems
                .push(format!("tokenizer fingerprint: checkpoint has {}, expected {want}", meta.tokenizer_fingerprint));
        }
    }
    if let Some(want) = expect.config {
        let mut diffs = Vec::new();
        json_diff(&meta.config, want, "config", &mut diffs);
        problems.extend(diffs);
    }
    if let Some(shapes) = expect.shapes {
        for (name, shape) in shapes {
            if !f.contains(name) {
                problems.push(format!("tensor {name:?} is missing"));
            } else {
                let (_, got) = f.dtype_shape(name)?;
                if &got != shape {
                    problems.push(format!("tensor {name:?} has shape {got:?}, expected {shape:?}"));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("checkpoint {} does not match: {}", f.path().display(), problems.join("; "));
    }
    let tensors = f.all_f32()?;
    Ok(Checkpoint { meta, tensors })
}

/// Push "path: checkpoint has A, expected B" for every leaf where `got` and
/// `want` differ.
fn json_diff(got: &serde_json::Value, want: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            let keys: std::collections::BTreeSet<&String> = g.keys().chain(w.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (g.get(k), w.get(k)) {
                    (Some(a), Some(b)) => json_diff(a, b, &p, out),
                    (Some(a), None) => out.push(format!("{p}: checkpoint has {a}, expected it absent")),
                    (None, Some(b)) => out.push(format!("{p}: absent in checkpoint, expected {b}")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{path}: checkpoint has {a}, expected {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::TestDir;
    use crate::ops::testing::rand_vec;
    use serde_json::json;

    fn tensors() -> BTreeMap<String, HostTensor> {
        let mut m = BTreeMap::new();
        m.insert("enc.w".to_string(), HostTensor::new(&[4, 3], rand_vec(3, 12, 1.0)).unwrap());
        m.insert("enc.b".to_string(), HostTensor::new(&[3], rand_vec(4, 3, 1.0)).unwrap());
        m
    }

    fn meta() -> CheckpointMeta {
        CheckpointMeta {
            step: 1234,
            config: json!({"d_model": 128, "layers": 4, "lr": 1e-3, "rq": {"levels": 3, "codebook": 256}}),
            dataset_fingerprint: fingerprint(b"ml-100k items"),
            tokenizer_fingerprint: fingerprint(b"semantic ids"),
            extra: json!({"recall@10": 0.1}),
        }
    }

    #[test]
    fn roundtrip_and_checks_pass() {
        let t = TestDir::new("ckpt");
        let p = t.path().join("step1234.safetensors");
        save(&p, &tensors(), &meta()).unwrap();
        let m = meta();
        let shapes: BTreeMap<String, Vec<usize>> = [("enc.w".to_string(), vec![4, 3])].into();
        let c = load(
            &p,
            &Expect {
                dataset_fingerprint: Some(&m.dataset_fingerprint),
                tokenizer_fingerprint: Some(&m.tokenizer_fingerprint),
                config: Some(&m.config),
                shapes: Some(&shapes),
            },
        )
        .unwrap();
        assert_eq!(c.meta, m);
        assert_eq!(c.tensors, tensors());
        assert_eq!(read_meta(&p).unwrap().step, 1234);
        // Overwriting keeps only the file (atomic write leaves no temporaries).
        save(&p, &tensors(), &CheckpointMeta { step: 1235, ..meta() }).unwrap();
        assert_eq!(read_meta(&p).unwrap().step, 1235);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn mismatches_are_all_named() {
        let t = TestDir::new("ckpt-bad");
        let p = t.path().join("c.safetensors");
        save(&p, &tensors(), &meta()).unwrap();
        let want_cfg =
            json!({"d_model": 256, "layers": 4, "lr": 1e-3, "rq": {"levels": 4, "codebook": 256}, "new": true});
        let shapes: BTreeMap<String, Vec<usize>> =
            [("enc.w".to_string(), vec![3, 4]), ("dec.w".to_string(), vec![2])].into();
        let e = load(
            &p,
            &Expect {
                dataset_fingerprint: Some("0123456789abcdef"),
                tokenizer_fingerprint: Some("fedcba9876543210"),
                config: Some(&want_cfg),
                shapes: Some(&shapes),
            },
        )
        .unwrap_err()
        .to_string();
        let m = meta();
        for needle in [
            "c.safetensors",
            "dataset fingerprint",
            m.dataset_fingerprint.as_str(),
            "0123456789abcdef",
            "tokenizer fingerprint",
            "fedcba9876543210",
            "config.d_model: checkpoint has 128, expected 256",
            "config.rq.levels",
            "config.new",
            "\"enc.w\" has shape [4, 3], expected [3, 4]",
            "\"dec.w\" is missing",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in: {e}");
        }
        assert!(!e.contains("config.layers"), "{e}");
        // Only the tokenizer differs: only it is named.
        let e = load(&p, &Expect { tokenizer_fingerprint: Some("x"), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("tokenizer fingerprint") && !e.contains("dataset"), "{e}");
    }

    #[test]
    fn plain_safetensors_is_not_a_checkpoint() {
        let t = TestDir::new("ckpt-plain");
        let p = t.path().join("plain.safetensors");
        crate::io::safetensors::save(&p, &tensors(), None, StoreDtype::F32).unwrap();
        let e = load(&p, &Expect::default()).unwrap_err().to_string();
        assert!(e.contains("plain.safetensors") && e.contains("not a genrec checkpoint"), "{e}");
    }

    #[test]
    fn fingerprints_are_stable_and_key_order_free() {
        assert_eq!(fingerprint(b"abc"), "ba7816bf8f01cfea"); // sha256("abc") prefix
        let a = fingerprint_json(&json!({"x": 1, "y": [1, 2]})).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"y": [1, 2], "x": 1}"#).unwrap();
        assert_eq!(a, fingerprint_json(&b).unwrap());
        assert_ne!(a, fingerprint_json(&json!({"x": 2, "y": [1, 2]})).unwrap());
    }
}
