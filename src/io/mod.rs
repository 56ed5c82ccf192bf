//! Reading and writing what genrec keeps on disk: pinned real assets
//! (`fetch`), safetensors weights (`safetensors`), GGUF models with
//! dequantization (`gguf`), and training checkpoints (`checkpoint`).
//!
//! Everything here runs on the host; tensors are plain `Vec<f32>` in
//! row-major order (`HostTensor`) that higher layers upload to the GPU.

pub mod checkpoint;
pub mod fetch;
pub mod gguf;
pub mod safetensors;

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A dense f32 tensor on the host: `data` is row-major with `shape`
/// (`data.len() == shape.iter().product()`).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from data and shape; errors when the element count differs.
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<HostTensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            bail!("HostTensor: shape {shape:?} holds {n} elements but {} values were given", data.len());
        }
        Ok(HostTensor { shape: shape.to_vec(), data })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Write a file atomically: `write` fills a temporary file beside `path`
/// (same directory, so the final rename is atomic on POSIX), which is synced
/// and then renamed over `path`. On error the temporary file is removed and
/// `path` is left untouched.
pub fn atomic_write(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `dir/.name.tmp-<pid>-<n>`: a unique temporary name beside `path`.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let tmp_name = format!(".{name}.tmp-{}-{n}", std::process::id());
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(tmp_name),
        _ => PathBuf::from(tmp_name),
    }
}

/// A unique scratch directory for tests, removed on drop.
#[cfg(test)]
pub(crate) struct TestDir(pub PathBuf);

#[cfg(test)]
impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let p = temp_sibling(&std::env::temp_dir().join(format!("genrec-test-{tag}")));
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_cleans_up_on_error() {
        let dir = TestDir::new("atomic");
        let p = dir.path().join("f.txt");
        atomic_write(&p, |w| Ok(w.write_all(b"one")?)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        let err = atomic_write(&p, |w| {
            w.write_all(b"partial")?;
            bail!("boom")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one", "failed write must leave the old file");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "temporary file left behind: {names:?}");
    }

    #[test]
    fn host_tensor_checks_count() {
        assert!(HostTensor::new(&[2, 3], vec![0.0; 6]).is_ok());
        let e = HostTensor::new(&[2, 3], vec![0.0; 5]).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains('5'), "{e}");
    }
}
