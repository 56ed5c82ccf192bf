//! Tokenizer report: per-level code utilization and perplexity, collision
//! rates, the first-level code histogram (JSON + PNG bar chart), and LETTER's
//! Table 4 code similarity.

use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::ids::{IdStats, ItemCodes};
use crate::gpu::{Gpu, Tensor};
use crate::quant::nearest::nearest_topk;

/// Code statistics of one level over all items.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LevelStats {
    /// Distinct codes used by at least one item.
    pub used: usize,
    /// `used / codebook_size`.
    pub utilization: f64,
    /// `exp(H)` of the code frequency distribution (natural log); equals
    /// `used` when the used codes are equally frequent.
    pub perplexity: f64,
}

/// Per-epoch training record.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    /// Means over the epoch's batches.
    pub total: f64,
    pub recon: f64,
    pub quant: f64,
    pub cf: f64,
    /// Argmin collision rate over all items when evaluated this epoch.
    pub collision_rate: Option<f64>,
}

/// Everything `genrec tokenize` reports (written as report.json).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerReport {
    pub method: String,
    pub n_items: usize,
    pub levels: usize,
    pub codebook_size: usize,
    /// Per level, over the final identifiers' first `levels` codes.
    pub per_level: Vec<LevelStats>,
    pub ids: IdStats,
    /// Collision rate of the final identifiers (0: they are unique).
    pub collision_rate_final: f64,
    /// Items per first-level code, `[codebook_size]`.
    pub first_level_histogram: Vec<usize>,
    /// LETTER Table 4 code similarity (see [`code_similarity`]); None without CF embeddings.
    pub code_similarity: Option<f64>,
    /// Epoch (0-based) of the kept checkpoint (lowest collision rate).
    pub best_epoch: usize,
    pub best_collision_rate: f64,
    pub epochs: Vec<EpochLog>,
    pub train_seconds: f64,
    pub adapter: String,
    /// The `TokenizerConfig` used (JSON), for reproducibility.
    pub config: serde_json::Value,
}

/// Per-level utilization and perplexity of the first `levels` codes.
pub fn level_stats(codes: &[Vec<u32>], levels: usize, codebook_size: usize) -> Vec<LevelStats> {
    (0..levels)
        .map(|l| {
            let h = histogram(codes, l, codebook_size);
            let n: usize = h.iter().sum();
            let used = h.iter().filter(|&&c| c > 0).count();
            let ent: f64 = h
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / n as f64;
                    -p * p.ln()
                })
                .sum();
            LevelStats { used, utilization: used as f64 / codebook_size as f64, perplexity: ent.exp() }
        })
        .collect()
}

/// Items per code at `level`, `[codebook_size]` (codes out of range ignored).
pub fn histogram(codes: &[Vec<u32>], level: usize, codebook_size: usize) -> Vec<usize> {
    let mut h = vec![0usize; codebook_size];
    for c in codes {
        if let Some(&v) = c.get(level) {
            if (v as usize) < codebook_size {
                h[v as usize] += 1;
            }
        }
    }
    h
}

/// LETTER Table 4 code similarity: for every item i, its CF-nearest
/// neighbour j != i is the item with the highest cosine similarity of the CF
/// embeddings `cf: [M, dc]` (ties: lowest index); the item's overlap is the
/// fraction of the first `levels` code positions where `codes[i][l] ==
/// codes[j][l]`; the measure is the mean overlap over all items. Neighbours
/// are found on the GPU (top-2 nearest on L2-normalized rows, excluding
/// the item itself). Needs M >= 2.
pub fn code_similarity(gpu: &Gpu, codes: &[Vec<u32>], levels: usize, cf: &[f32]) -> Result<f64> {
    let m = codes.len();
    if m < 2 || cf.is_empty() || !cf.len().is_multiple_of(m) {
        bail!("code_similarity: need >= 2 items and CF embeddings [M, dc], got {} values for {m} items", cf.len());
    }
    let dc = cf.len() / m;
    crate::quant::check_finite_host("code_similarity", "cf", cf, &[m, dc])?;
    let mut unit = cf.to_vec();
    for r in unit.chunks_mut(dc) {
        let n = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        if n > 0.0 {
            r.iter_mut().for_each(|v| *v = (*v as f64 / n) as f32);
        }
    }
    let t = Tensor::from_f32(gpu, &unit, &[m, dc])?;
    let mut total = 0.0;
    // In chunks so the query block stays small; the codebook is all items.
    let chunk = 4096;
    for s in (0..m).step_by(chunk) {
        let rows = chunk.min(m - s);
        let q = Tensor::from_f32(gpu, &unit[s * dc..(s + rows) * dc], &[rows, dc])?;
        let idx = nearest_topk(&q, &t, 2)?.idx.to_vec_u32()?;
        for r in 0..rows {
            let i = s + r;
            let j = if idx[r * 2] as usize != i { idx[r * 2] } else { idx[r * 2 + 1] } as usize;
            let same = (0..levels).filter(|&l| codes[i].get(l) == codes[j].get(l)).count();
            total += same as f64 / levels as f64;
        }
    }
    let _ = t;
    Ok(total / m as f64)
}

/// Fill the code statistics of `rep` from the final identifiers.
pub fn fill_code_stats(rep: &mut TokenizerReport, ids: &ItemCodes) {
    rep.n_items = ids.n_items();
    rep.levels = ids.levels;
    rep.codebook_size = ids.codebook_size;
    rep.per_level = level_stats(&ids.codes, ids.levels, ids.codebook_size);
    rep.first_level_histogram = histogram(&ids.codes, 0, ids.codebook_size);
    rep.collision_rate_final = super::ids::collision_rate(&ids.codes);
}

/// Write `rep` as pretty JSON (atomic).
pub fn save_report(rep: &TokenizerReport, path: &Path) -> Result<()> {
    crate::io::atomic_write(path, |w| {
        serde_json::to_writer_pretty(&mut *w, rep)?;
        Ok(())
    })
    .with_context(|| format!("writing tokenizer report {}", path.display()))
}

// ---- PNG bar chart (no image dependency: a minimal RGB PNG writer) ----

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let crc = crc32(&out[start..]);
    out.extend(crc.to_be_bytes());
}

/// Encode an 8-bit RGB image (`rgb: [h, w, 3]`) as PNG bytes.
pub fn encode_png(w: usize, h: usize, rgb: &[u8]) -> Result<Vec<u8>> {
    if w == 0 || h == 0 || rgb.len() != w * h * 3 {
        bail!("encode_png: {} bytes are not a {w}x{h} RGB image", rgb.len());
    }
    let mut raw = Vec::with_capacity(h * (w * 3 + 1));
    for row in rgb.chunks(w * 3) {
        raw.push(0); // filter: none
        raw.extend(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw)?;
    let idat = z.finish()?;
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = Vec::new();
    ihdr.extend((w as u32).to_be_bytes());
    ihdr.extend((h as u32).to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit, truecolour, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

/// Render a bar chart of `counts` (one bar per entry, in order) as RGB pixels:
/// returns (width, height, pixels). Bars are scaled so the largest count
/// fills the plot height; a baseline and faint horizontal grid lines at
/// quarters of the maximum are drawn.
pub fn bar_chart(counts: &[usize]) -> (usize, usize, Vec<u8>) {
    let n = counts.len().max(1);
    let bar_w = (1024 / n).clamp(1, 16);
    let margin = 10;
    let plot_h = 240;
    let w = n * bar_w + 2 * margin;
    let h = plot_h + 2 * margin;
    let mut px = vec![255u8; w * h * 3];
    let mut set = |x: usize, y: usize, c: [u8; 3]| {
        if x < w && y < h {
            px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    let max = counts.iter().cloned().max().unwrap_or(0).max(1);
    for q in 1..=4 {
        let y = margin + plot_h - plot_h * q / 4;
        for x in margin..w - margin {
            set(x, y, [225, 225, 225]);
        }
    }
    for (i, &c) in counts.iter().enumerate() {
        let bh = ((c as f64 / max as f64) * plot_h as f64).round() as usize;
        let x0 = margin + i * bar_w;
        let gap = usize::from(bar_w >= 3);
        for x in x0..x0 + bar_w - gap {
            for y in (margin + plot_h - bh)..(margin + plot_h) {
                set(x, y, [49, 99, 168]);
            }
        }
    }
    for x in margin..w - margin {
        set(x, margin + plot_h, [0, 0, 0]);
    }
    (w, h, px)
}

/// Write the bar chart of `counts` as a PNG file (atomic).
pub fn save_histogram_png(counts: &[usize], path: &Path) -> Result<()> {
    let (w, h, px) = bar_chart(counts);
    let bytes = encode_png(w, h, &px)?;
    crate::io::atomic_write(path, |out| Ok(out.write_all(&bytes)?))
        .with_context(|| format!("writing histogram {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_stats_and_histogram_by_hand() {
        // 4 items, 2 levels, 4 codes. Level 0: codes 0,0,1,1 -> 2 used, perplexity 2.
        // Level 1: 0,1,2,3 -> 4 used, perplexity 4.
        let c = vec![vec![0, 0], vec![0, 1], vec![1, 2], vec![1, 3, 0]];
        let s = level_stats(&c, 2, 4);
        assert_eq!(s[0].used, 2);
        assert!((s[0].utilization - 0.5).abs() < 1e-12);
        assert!((s[0].perplexity - 2.0).abs() < 1e-9);
        assert_eq!(s[1].used, 4);
        assert!((s[1].perplexity - 4.0).abs() < 1e-9);
        assert_eq!(histogram(&c, 0, 4), vec![2, 2, 0, 0]);
        // Skewed level: counts 3, 1 -> H = -(.75 ln .75 + .25 ln .25).
        let c2 = vec![vec![0], vec![0], vec![0], vec![2]];
        let p = level_stats(&c2, 1, 4)[0].perplexity;
        let want = (-(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln())).exp();
        assert!((p - want).abs() < 1e-12, "{p} vs {want}");
    }

    #[test]
    fn code_similarity_by_hand() {
        let gpu = Gpu::shared().unwrap();
        // CF: items 0 and 1 point the same way, 2 and 3 the same way (scaled).
        let cf = [1.0f32, 0.1, 2.0, 0.25, -0.1, 1.0, -0.3, 3.0];
        let codes = vec![vec![5, 1, 2], vec![5, 1, 3], vec![7, 0, 0], vec![6, 0, 0]];
        // NN: 0<->1 (overlap 2/3 each), 2<->3 (overlap 2/3 each) -> mean 2/3.
        let s = code_similarity(&gpu, &codes, 3, &cf).unwrap();
        assert!((s - 2.0 / 3.0).abs() < 1e-9, "{s}");
        let e = code_similarity(&gpu, &codes[..1], 3, &cf[..2]).unwrap_err().to_string();
        assert!(e.contains("code_similarity"), "{e}");
    }

    #[test]
    fn png_is_well_formed() {
        let (w, h, px) = bar_chart(&[3, 0, 1, 7]);
        let png = encode_png(w, h, &px).unwrap();
        assert_eq!(&png[..8], &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]);
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()) as usize, w);
        // CRC of IHDR matches the standard CRC-32 (check value of "123456789").
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        // The IDAT inflates back to h rows of 1 + 3w bytes.
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let mut d = flate2::read::ZlibDecoder::new(&png[41..41 + idat_len]);
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut raw).unwrap();
        assert_eq!(raw.len(), h * (1 + 3 * w));
        // The tallest bar (code 3) reaches the top of the plot; code 1 has none.
        let at = |x: usize, y: usize| &px[(y * w + x) * 3..(y * w + x) * 3 + 3];
        let bw = (w - 20) / 4;
        assert_eq!(at(10 + 3 * bw, 10), &[49, 99, 168]);
        assert_eq!(at(10 + bw, 10 + 239), &[255, 255, 255]);
        assert!(encode_png(2, 2, &[0; 5]).is_err());
    }
}
