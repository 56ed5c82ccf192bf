//! Prepared-dataset directory format (version 1):
//!
//! ```text
//! OUT/manifest.json       name, format, options, input hash, stats, load report,
//!                         counts, sha256 of every other file; written last
//! OUT/arrays.safetensors  offsets [n_users+1] I64, items [N] U32, times [N] I64, split [N] U8
//! OUT/ids.json            {"users": [raw ids by dense id], "items": [...]}
//! OUT/items.jsonl         one ItemMeta object per dense item id (line i = item i)
//! OUT/user_texts.jsonl    one UserText object per line
//! ```
//!
//! Every file is written to `<name>.tmp` and renamed; the old manifest is
//! removed first and the new one renamed into place last, so a directory with
//! a manifest is always complete. [`prepare_cached`] reuses a directory whose
//! manifest's `input_hash` (sha256 of the format version, the input format,
//! the options and every input file's name and bytes) matches.

use super::prepare::{Prepared, Stats, UserText};
use super::{input_files, load, Format, ItemMeta, LoadReport, PrepareOptions};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

/// Version of the prepared directory layout (bump on any change).
pub const FORMAT_VERSION: u32 = 1;

/// Contents of `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub genrec_prepared_version: u32,
    pub name: String,
    pub format: Option<Format>,
    pub input_hash: String,
    pub options: PrepareOptions,
    pub n_users: usize,
    pub n_items: usize,
    pub n_interactions: usize,
    pub stats: Stats,
    pub load_report: LoadReport,
    /// sha256 (hex) of each data file in the directory.
    pub files: BTreeMap<String, String>,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of everything that determines a prepared dataset: layout version,
/// format, options (JSON) and each input file's name and content.
pub fn input_hash(format: Format, input_dir: &Path, opts: &PrepareOptions) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("genrec-prepared-v{FORMAT_VERSION}\n{}\n", format.name()).as_bytes());
    h.update(serde_json::to_vec(opts)?);
    for f in input_files(format, input_dir)? {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        h.update(format!("\nfile {name}\n").as_bytes());
        let mut file = std::fs::File::open(&f).with_context(|| format!("{}: cannot open", f.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let k = file.read(&mut buf).with_context(|| format!("{}: read error", f.display()))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
        }
    }
    Ok(hex(&h.finalize()))
}

/// Writes `bytes` to `dir/name` through a temporary file and a rename.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<String> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("{}: write failed", tmp.display()))?;
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("rename {} -> {}", tmp.display(), dst.display()))?;
    Ok(hex(&Sha256::digest(bytes)))
}

fn jsonl<T: Serialize>(rows: &[T]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut out, r)?;
        out.push(b'\n');
    }
    Ok(out)
}

#[derive(Serialize, Deserialize)]
struct Ids {
    users: Vec<String>,
    items: Vec<String>,
}

impl Prepared {
    /// Writes the prepared directory `out` (created if needed). `format` and
    /// `input_hash` are recorded in the manifest (`input_hash` may be empty).
    pub fn save(&self, out: &Path, format: Option<Format>, input_hash: &str) -> Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create directory", out.display()))?;
        let manifest_path = out.join("manifest.json");
        if manifest_path.exists() {
            std::fs::remove_file(&manifest_path)
                .with_context(|| format!("{}: cannot remove", manifest_path.display()))?;
        }
        let offsets: Vec<u8> = bytemuck::cast_slice(&self.offsets).to_vec();
        let items: Vec<u8> = bytemuck::cast_slice(&self.items).to_vec();
        let times: Vec<u8> = bytemuck::cast_slice(&self.times).to_vec();
        let nu = self.offsets.len();
        let n = self.items.len();
        let views = vec![
            ("offsets", TensorView::new(Dtype::I64, vec![nu], &offsets)?),
            ("items", TensorView::new(Dtype::U32, vec![n], &items)?),
            ("times", TensorView::new(Dtype::I64, vec![n], &times)?),
            ("split", TensorView::new(Dtype::U8, vec![n], &self.split)?),
        ];
        let arrays = safetensors::serialize(views, &None)?;
        let mut files = BTreeMap::new();
        files.insert("arrays.safetensors".to_string(), write_atomic(out, "arrays.safetensors", &arrays)?);
        let ids = serde_json::to_vec(&Ids { users: self.user_ids.clone(), items: self.item_ids.clone() })?;
        files.insert("ids.json".to_string(), write_atomic(out, "ids.json", &ids)?);
        files.insert("items.jsonl".to_string(), write_atomic(out, "items.jsonl", &jsonl(&self.item_meta)?)?);
        files.insert("user_texts.jsonl".to_string(), write_atomic(out, "user_texts.jsonl", &jsonl(&self.user_texts)?)?);
        let m = Manifest {
            genrec_prepared_version: FORMAT_VERSION,
            name: self.name.clone(),
            format,
            input_hash: input_hash.to_string(),
            options: self.options.clone(),
            n_users: self.n_users(),
            n_items: self.n_items(),
            n_interactions: n,
            stats: self.stats.clone(),
            load_report: self.load_report.clone(),
            files,
        };
        write_atomic(out, "manifest.json", &serde_json::to_vec_pretty(&m)?)?;
        Ok(())
    }

    /// Reads a prepared directory's manifest only.
    pub fn read_manifest(dir: &Path) -> Result<Manifest> {
        let p = dir.join("manifest.json");
        let bytes = std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let m: Manifest =
            serde_json::from_slice(&bytes).with_context(|| format!("{}: invalid manifest", p.display()))?;
        if m.genrec_prepared_version != FORMAT_VERSION {
            bail!(
                "{}: prepared format version {} (this build reads {FORMAT_VERSION})",
                p.display(),
                m.genrec_prepared_version
            );
        }
        Ok(m)
    }

    /// Loads a prepared directory, checking file hashes and array shapes.
    pub fn load(dir: &Path) -> Result<Prepared> {
        let m = Prepared::read_manifest(dir)?;
        let read = |name: &str| -> Result<Vec<u8>> {
            let p = dir.join(name);
            let b = std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
            if let Some(want) = m.files.get(name) {
                if &hex(&Sha256::digest(&b)) != want {
                    bail!("{}: sha256 does not match the manifest (corrupt or modified)", p.display());
                }
            }
            Ok(b)
        };
        let arrays = read("arrays.safetensors")?;
        let st = SafeTensors::deserialize(&arrays).map_err(|e| anyhow!("{}/arrays.safetensors: {e}", dir.display()))?;
        let get = |name: &str, dt: Dtype, len: usize| -> Result<Vec<u8>> {
            let t = st.tensor(name).map_err(|e| anyhow!("{}/arrays.safetensors: {name}: {e}", dir.display()))?;
            if t.dtype() != dt || t.shape() != [len] {
                bail!(
                    "{}/arrays.safetensors: {name} is {:?} {:?}, expected {dt:?} [{len}]",
                    dir.display(),
                    t.dtype(),
                    t.shape()
                );
            }
            Ok(t.data().to_vec())
        };
        let n = m.n_interactions;
        let offsets: Vec<u64> = bytemuck::pod_collect_to_vec(&get("offsets", Dtype::I64, m.n_users + 1)?);
        let items: Vec<u32> = bytemuck::pod_collect_to_vec(&get("items", Dtype::U32, n)?);
        let times: Vec<i64> = bytemuck::pod_collect_to_vec(&get("times", Dtype::I64, n)?);
        let split = get("split", Dtype::U8, n)?;
        let ids: Ids =
            serde_json::from_slice(&read("ids.json")?).with_context(|| format!("{}/ids.json", dir.display()))?;
        let parse_lines = |name: &str| -> Result<Vec<String>> {
            let b = read(name)?;
            BufReader::new(&b[..]).lines().map(|l| l.with_context(|| format!("{}/{name}", dir.display()))).collect()
        };
        let item_meta: Vec<ItemMeta> = parse_lines("items.jsonl")?
            .iter()
            .enumerate()
            .map(|(k, l)| serde_json::from_str(l).with_context(|| format!("{}/items.jsonl:{}", dir.display(), k + 1)))
            .collect::<Result<_>>()?;
        let user_texts: Vec<UserText> = parse_lines("user_texts.jsonl")?
            .iter()
            .enumerate()
            .map(|(k, l)| {
                serde_json::from_str(l).with_context(|| format!("{}/user_texts.jsonl:{}", dir.display(), k + 1))
            })
            .collect::<Result<_>>()?;
        if ids.users.len() != m.n_users || ids.items.len() != m.n_items || item_meta.len() != m.n_items {
            bail!("{}: id or item tables do not match the manifest counts", dir.display());
        }
        if offsets.first() != Some(&0)
            || offsets.last() != Some(&(n as u64))
            || offsets.windows(2).any(|w| w[0] > w[1])
            || items.iter().any(|&i| i as usize >= m.n_items)
            || split.iter().any(|&s| s > 2)
        {
            bail!("{}/arrays.safetensors: inconsistent offsets, item ids or split labels", dir.display());
        }
        Ok(Prepared {
            name: m.name,
            options: m.options,
            user_ids: ids.users,
            item_ids: ids.items,
            offsets,
            items,
            times,
            split,
            item_meta,
            user_texts,
            stats: m.stats,
            load_report: m.load_report,
        })
    }
}

/// Loads `input_dir` in `format`, prepares it with `opts` and saves it to
/// `out_dir`, unless `out_dir` already holds a prepared dataset with the same
/// input hash, which is then loaded instead. Returns the dataset and whether
/// the cached copy was reused.
pub fn prepare_cached(
    format: Format,
    input_dir: &Path,
    out_dir: &Path,
    opts: &PrepareOptions,
) -> Result<(Prepared, bool)> {
    let hash = input_hash(format, input_dir, opts)?;
    if let Ok(m) = Prepared::read_manifest(out_dir) {
        if m.input_hash == hash {
            if let Ok(p) = Prepared::load(out_dir) {
                return Ok((p, true));
            }
        }
    }
    let raw = load(format, input_dir)?;
    let p = super::prepare(&raw, opts)?;
    p.save(out_dir, Some(format), &hash)?;
    Ok((p, false))
}
