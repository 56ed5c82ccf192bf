//! safetensors files: load named tensors as f32 host tensors (F32, F16 and
//! BF16 are converted on access), write f32/f16/bf16 files atomically.
//!
//! Errors name the file and, where one is involved, the tensor.

use super::HostTensor;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// f16 little-endian bytes -> f32 values (`bytes.len()` must be even).
pub fn f16_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

/// bf16 little-endian bytes -> f32 values (`bytes.len()` must be even).
pub fn bf16_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

/// f32 little-endian bytes -> f32 values (`bytes.len()` must be a multiple of 4).
pub fn f32_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A safetensors file held in memory with its parsed header; tensors are
/// converted to f32 when asked for, so a file may hold tensors of dtypes
/// genrec never reads (e.g. BERT's I64 `position_ids`).
pub struct SafeTensorsFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Start of the data section: 8 + header length.
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for SafeTensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SafeTensorsFile({}, {} tensors)", self.path.display(), self.metadata.tensors().len())
    }
}

impl SafeTensorsFile {
    /// Read and validate `path` (header JSON, offsets, total length).
    pub fn open(path: impl AsRef<Path>) -> Result<SafeTensorsFile> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).with_context(|| format!("reading safetensors file {}", path.display()))?;
        Self::from_bytes(path, bytes)
    }

    /// Parse an in-memory file; `path` is only used in messages.
    pub fn from_bytes(path: PathBuf, bytes: Vec<u8>) -> Result<SafeTensorsFile> {
        let (n, metadata) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow!("{}: corrupt safetensors header: {e:?}", path.display()))?;
        Ok(SafeTensorsFile { path, data_start: 8 + n, metadata, bytes })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.metadata.tensors().into_keys().collect();
        v.sort();
        v
    }

    /// Whether the file holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// The `__metadata__` string map (empty when absent).
    pub fn metadata(&self) -> HashMap<String, String> {
        self.metadata.metadata().clone().unwrap_or_default()
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.metadata.info(name).ok_or_else(|| {
            let names = self.names();
            let shown: Vec<&String> = names.iter().take(8).collect();
            anyhow!(
                "{}: no tensor {name:?} (file has {} tensors: {:?}{})",
                self.path.display(),
                names.len(),
                shown,
                if names.len() > 8 { ", ..." } else { "" }
            )
        })
    }

    /// Stored dtype name ("F32", "BF16", ...) and shape of `name`.
    pub fn dtype_shape(&self, name: &str) -> Result<(String, Vec<usize>)> {
        let i = self.info(name)?;
        Ok((format!("{:?}", i.dtype), i.shape.clone()))
    }

    /// Raw little-endian bytes of `name`.
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let i = self.info(name)?;
        let (a, b) = i.data_offsets;
        Ok(&self.bytes[self.data_start + a..self.data_start + b])
    }

    /// Tensor `name` converted to f32 (from F32, F16 or BF16).
    pub fn get(&self, name: &str) -> Result<HostTensor> {
        let i = self.info(name)?;
        let raw = self.raw(name)?;
        let data = match i.dtype {
            Dtype::F32 => f32_bytes_to_f32(raw),
            Dtype::F16 => f16_bytes_to_f32(raw),
            Dtype::BF16 => bf16_bytes_to_f32(raw),
            other => bail!(
                "{}: tensor {name:?} has unsupported dtype {other:?} (supported: F32, F16, BF16)",
                self.path.display()
            ),
        };
        Ok(HostTensor { shape: i.shape.clone(), data })
    }

    /// Tensor `name` as f32, checked to have shape `expected`.
    pub fn get_shaped(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let i = self.info(name)?;
        if i.shape != expected {
            bail!("{}: tensor {name:?} has shape {:?}, expected {expected:?}", self.path.display(), i.shape);
        }
        self.get(name)
    }

    /// Every tensor of a float dtype, as f32, by name. Tensors of other
    /// dtypes are skipped.
    pub fn all_f32(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for name in self.names() {
            let dt = self.info(&name)?.dtype;
            if matches!(dt, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                out.insert(name.clone(), self.get(&name)?);
            }
        }
        Ok(out)
    }
}

/// Load every F32/F16/BF16 tensor of `path` as f32 (other dtypes skipped).
pub fn load(path: impl AsRef<Path>) -> Result<BTreeMap<String, HostTensor>> {
    SafeTensorsFile::open(path)?.all_f32()
}

/// Element type to store when writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

struct Encoded {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Encoded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode(t: &HostTensor, dt: StoreDtype) -> Encoded {
    let (dtype, bytes) = match dt {
        StoreDtype::F32 => (Dtype::F32, t.data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        StoreDtype::F16 => (Dtype::F16, t.data.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()),
        StoreDtype::BF16 => (Dtype::BF16, t.data.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()),
    };
    Encoded { dtype, shape: t.shape.clone(), bytes }
}

/// Write `tensors` to `path` as safetensors with optional `__metadata__`,
/// atomically (temporary file + rename). Errors name the file and the
/// tensor whose data length does not match its shape.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<&HashMap<String, String>>,
    dtype: StoreDtype,
) -> Result<()> {
    let path = path.as_ref();
    let mut enc = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let n: usize = t.shape.iter().product();
        if n != t.data.len() {
            bail!(
                "{}: tensor {name:?} has shape {:?} ({n} elements) but {} values",
                path.display(),
                t.shape,
                t.data.len()
            );
        }
        enc.push((name.as_str(), encode(t, dtype)));
    }
    let bytes = safetensors::serialize(enc.iter().map(|(n, e)| (*n, e)), &metadata.cloned())
        .map_err(|e| anyhow!("{}: serializing safetensors: {e:?}", path.display()))?;
    super::atomic_write(path, |w| Ok(w.write_all(&bytes)?)).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::TestDir;
    use crate::ops::testing::rand_vec;

    fn sample() -> BTreeMap<String, HostTensor> {
        let mut m = BTreeMap::new();
        m.insert("a.weight".into(), HostTensor::new(&[3, 5], rand_vec(1, 15, 2.0)).unwrap());
        m.insert("b".into(), HostTensor::new(&[7], rand_vec(2, 7, 1.0)).unwrap());
        m.insert("scalar".into(), HostTensor::new(&[], vec![4.5]).unwrap());
        m
    }

    #[test]
    fn roundtrip_f32_exact_with_metadata() {
        let t = TestDir::new("st");
        let p = t.path().join("m.safetensors");
        let mut md = HashMap::new();
        md.insert("format".to_string(), "pt".to_string());
        save(&p, &sample(), Some(&md), StoreDtype::F32).unwrap();
        let f = SafeTensorsFile::open(&p).unwrap();
        assert_eq!(f.names(), vec!["a.weight", "b", "scalar"]);
        assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
        let back = f.all_f32().unwrap();
        assert_eq!(back, sample());
        assert_eq!(f.dtype_shape("a.weight").unwrap(), ("F32".to_string(), vec![3, 5]));
    }

    #[test]
    fn roundtrip_f16_bf16_within_rounding() {
        let t = TestDir::new("st16");
        for (dt, rel) in [(StoreDtype::F16, 1.0 / 1024.0), (StoreDtype::BF16, 1.0 / 128.0)] {
            let p = t.path().join(format!("{dt:?}.safetensors"));
            save(&p, &sample(), None, dt).unwrap();
            let f = SafeTensorsFile::open(&p).unwrap();
            assert_eq!(f.dtype_shape("b").unwrap().0, format!("{dt:?}"));
            for (name, want) in sample() {
                let got = f.get(&name).unwrap();
                assert_eq!(got.shape, want.shape);
                for (g, w) in got.data.iter().zip(&want.data) {
                    assert!((g - w).abs() <= rel * w.abs() + 1e-7, "{dt:?} {name}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn conversion_helpers_known_values() {
        // f16: 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800; bf16: 1.0 = 0x3F80, -2.0 = 0xC000.
        assert_eq!(f16_bytes_to_f32(&[0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38]), vec![1.0, -2.0, 0.5]);
        assert_eq!(bf16_bytes_to_f32(&[0x80, 0x3F, 0x00, 0xC0]), vec![1.0, -2.0]);
        assert_eq!(f32_bytes_to_f32(&1.25f32.to_le_bytes()), vec![1.25]);
    }

    #[test]
    fn errors_name_file_and_tensor() {
        let t = TestDir::new("st-err");
        let p = t.path().join("m.safetensors");
        save(&p, &sample(), None, StoreDtype::F32).unwrap();
        let f = SafeTensorsFile::open(&p).unwrap();
        let e = f.get("missing.weight").unwrap_err().to_string();
        assert!(e.contains("m.safetensors") && e.contains("missing.weight"), "{e}");
        let e = f.get_shaped("a.weight", &[5, 3]).unwrap_err().to_string();
        assert!(e.contains("m.safetensors") && e.contains("a.weight") && e.contains("[3, 5]"), "{e}");
        assert!(f.get_shaped("a.weight", &[3, 5]).is_ok());

        // Unsupported dtype: an I64 tensor written by hand.
        let header = r#"{"pos":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"w":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 16]);
        bytes.extend_from_slice(&3.0f32.to_le_bytes());
        let q = t.path().join("ints.safetensors");
        std::fs::write(&q, &bytes).unwrap();
        let f = SafeTensorsFile::open(&q).unwrap();
        let e = f.get("pos").unwrap_err().to_string();
        assert!(e.contains("ints.safetensors") && e.contains("pos") && e.contains("I64"), "{e}");
        // all_f32 skips it and keeps the float tensor.
        let all = f.all_f32().unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), vec!["w"]);
        assert_eq!(all["w"].data, vec![3.0]);

        // Corrupt header / truncated data.
        let c = t.path().join("corrupt.safetensors");
        std::fs::write(&c, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}").unwrap();
        let e = SafeTensorsFile::open(&c).unwrap_err().to_string();
        assert!(e.contains("corrupt.safetensors") && e.contains("header"), "{e}");
        std::fs::write(&c, &bytes[..bytes.len() - 2]).unwrap();
        let e = SafeTensorsFile::open(&c).unwrap_err().to_string();
        assert!(e.contains("corrupt.safetensors"), "{e}");
        let e = SafeTensorsFile::open(t.path().join("absent.safetensors")).unwrap_err().to_string();
        assert!(e.contains("absent.safetensors"), "{e}");
    }

    #[test]
    fn save_rejects_inconsistent_tensor() {
        let t = TestDir::new("st-bad");
        let p = t.path().join("bad.safetensors");
        let mut m = BTreeMap::new();
        m.insert("w".to_string(), HostTensor { shape: vec![2, 2], data: vec![0.0; 3] });
        let e = save(&p, &m, None, StoreDtype::F32).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors") && e.contains("\"w\""), "{e}");
        assert!(!p.exists());
    }

    /// The real MiniLM file, when fetched: shapes of a few tensors.
    #[test]
    fn real_minilm_when_present() {
        let Some(dir) = crate::io::fetch::local("minilm") else {
            eprintln!("skipping: asset minilm not fetched (genrec fetch minilm)");
            return;
        };
        let f = SafeTensorsFile::open(dir.join("model.safetensors")).unwrap();
        let emb = f.get_shaped("embeddings.word_embeddings.weight", &[30522, 384]).unwrap();
        assert!(emb.data.iter().all(|v| v.is_finite()));
        assert!(f.get("embeddings.position_ids").is_err(), "I64 is not a float tensor");
        assert_eq!(f.dtype_shape("encoder.layer.5.output.dense.weight").unwrap().1, vec![384, 1536]);
    }
}
