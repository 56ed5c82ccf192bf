//! GGUF (v2/v3) reader written against the spec in ggml's docs/gguf.md,
//! dequantization to f32, llama.cpp -> Hugging Face tensor naming, and a
//! small writer (used by the tests and by tools that need tiny GGUF files).
//!
//! File layout (all little-endian):
//! `"GGUF"` u32 version, u64 tensor_count, u64 kv_count, then kv_count
//! metadata entries (string key, u32 value type, value), then tensor infos
//! (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset),
//! padding to `general.alignment` (default 32), then the data section;
//! each tensor's offset is relative to the data section and aligned.
//! Strings are u64 length + UTF-8 bytes; arrays are u32 element type +
//! u64 count + elements.
//!
//! Shapes: GGUF stores `ne` innermost first (`ne[0]` = row length). This
//! module reports `shape()` row-major, outermost first (`ne` reversed), the
//! PyTorch convention: a HF `nn.Linear` weight [out, in] has ne = [in, out].

use super::HostTensor;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The 4 magic bytes at the start of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml tensor element types (the numbering of ggml.h's `enum ggml_type`).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// Any other id (IQ* types and newer): readable as raw bytes only.
    Other(u32),
}

impl GgmlType {
    /// From the numeric id stored in the file.
    pub fn from_id(id: u32) -> GgmlType {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            other => Other(other),
        }
    }

    /// The numeric id stored in the file.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            Other(id) => id,
        }
    }

    /// (elements per block, bytes per block), or None for unknown types.
    pub fn block(self) -> Option<(u64, u64)> {
        use GgmlType::*;
        Some(match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            Other(_) => return None,
        })
    }

    /// Whether `dequantize` supports this type.
    pub fn dequantizable(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1)
    }
}

/// A metadata value. Arrays keep their element type so that empty arrays
/// round-trip through the writer.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// (element type id, items)
    Array(u32, Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The value type id of the GGUF spec (0 = u8 ... 12 = f64).
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(..) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Any integer type (and bool) as u64, when non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            MetaValue::Bool(b) => Some(b as u64),
            _ => None,
        }
    }

    /// Any integer or float type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v as f64),
            MetaValue::I16(v) => Some(v as f64),
            MetaValue::I32(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The string, for `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items, for `Array`.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(_, v) => Some(v),
            _ => None,
        }
    }

    /// The bool, for `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// One tensor's entry in the tensor-info table.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// `ne`, innermost first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Row-major shape, outermost first (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data, or None for unknown types or a row length that is not
    /// a multiple of the block size.
    pub fn n_bytes(&self) -> Option<u64> {
        let (bs, bb) = self.ggml_type.block()?;
        let ne0 = *self.dims.first().unwrap_or(&1);
        if !ne0.is_multiple_of(bs) {
            return None;
        }
        self.numel().checked_div(bs)?.checked_mul(bb)
    }
}

/// A GGUF file: parsed header, metadata and tensor table. Tensor data is
/// read from the file on demand.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    /// Metadata keys in file order.
    key_order: Vec<String>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
    file_len: u64,
}

/// Reads the header with bounds checks against the file length, so a
/// truncated or corrupt file gives an error instead of a huge allocation.
struct Rd<'a, R: Read> {
    r: R,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl<R: Read> Rd<'_, R> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.len.saturating_sub(self.pos) {
            bail!(
                "{}: truncated or corrupt: {what} needs {n} bytes at offset {} but the file has {} bytes",
                self.path.display(),
                self.pos,
                self.len
            );
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).with_context(|| format!("{}: reading {what}", self.path.display()))?;
        self.pos += n;
        Ok(buf)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.bytes(N as u64, what)?.try_into().unwrap())
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| anyhow!("{}: {what} is not valid UTF-8", self.path.display()))
    }
    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(what)?[0]),
            1 => MetaValue::I8(self.arr::<1>(what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => {
                let b = self.arr::<1>(what)?[0];
                if b > 1 {
                    bail!("{}: {what}: bool byte is {b}, not 0 or 1", self.path.display());
                }
                MetaValue::Bool(b == 1)
            }
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                if depth > 8 {
                    bail!("{}: {what}: arrays nested too deeply", self.path.display());
                }
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count larger than
                // the rest of the file is corrupt.
                if n > self.len.saturating_sub(self.pos) {
                    bail!(
                        "{}: truncated or corrupt: {what} claims {n} array elements at offset {} but the file has {} bytes",
                        self.path.display(),
                        self.pos,
                        self.len
                    );
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(et, what, depth + 1)?);
                }
                MetaValue::Array(et, items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(what)?)),
            other => bail!("{}: {what}: unknown metadata value type {other}", self.path.display()),
        })
    }
}

impl Gguf {
    /// Parse the header, metadata and tensor table of `path`, and check that
    /// every tensor's data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf> {
        let path = path.as_ref().to_path_buf();
        let f = std::fs::File::open(&path).with_context(|| format!("opening GGUF file {}", path.display()))?;
        let file_len = f.metadata()?.len();
        let mut rd = Rd { r: BufReader::new(f), pos: 0, len: file_len, path: &path };
        let magic = rd.arr::<4>("magic")?;
        if &magic != MAGIC {
            bail!(
                "{}: not a GGUF file (magic {:?}, expected \"GGUF\")",
                path.display(),
                String::from_utf8_lossy(&magic)
            );
        }
        let version = rd.u32("version")?;
        if version != 2 && version != 3 {
            bail!(
                "{}: unsupported GGUF version {version} (supported: 2, 3{})",
                path.display(),
                if version > 0xFFFF { "; a big-endian file?" } else { "" }
            );
        }
        let n_tensors = rd.u64("tensor count")?;
        let n_kv = rd.u64("metadata count")?;
        // Each kv and tensor info takes well over 8 bytes.
        if n_tensors > file_len / 8 || n_kv > file_len / 8 {
            bail!(
                "{}: truncated or corrupt header: {n_tensors} tensors, {n_kv} metadata entries in {file_len} bytes",
                path.display()
            );
        }
        let mut metadata = BTreeMap::new();
        let mut key_order = Vec::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = rd.string(&format!("metadata key #{i}"))?;
            let ty = rd.u32(&format!("type of metadata {key:?}"))?;
            let v = rd.value(ty, &format!("metadata {key:?}"), 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                bail!("{}: duplicate metadata key {key:?}", path.display());
            }
            key_order.push(key);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => bail!("{}: general.alignment {v:?} is not a power of two", path.display()),
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut by_name = HashMap::new();
        for i in 0..n_tensors {
            let name = rd.string(&format!("name of tensor #{i}"))?;
            let what = format!("info of tensor {name:?}");
            let nd = rd.u32(&what)?;
            if nd > 4 {
                bail!("{}: tensor {name:?} has {nd} dimensions (max 4)", path.display());
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(rd.u64(&what)?);
            }
            let ggml_type = GgmlType::from_id(rd.u32(&what)?);
            let offset = rd.u64(&what)?;
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                bail!("{}: duplicate tensor name {name:?}", path.display());
            }
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
        }
        let data_start = rd.pos.div_ceil(alignment) * alignment;
        let data_len = file_len.saturating_sub(data_start);
        for t in &tensors {
            if t.offset % alignment != 0 {
                bail!(
                    "{}: tensor {:?} offset {} is not a multiple of the alignment {alignment}",
                    path.display(),
                    t.name,
                    t.offset
                );
            }
            if let Some((bs, _)) = t.ggml_type.block() {
                let n = t.n_bytes().ok_or_else(|| {
                    anyhow!(
                        "{}: tensor {:?} of type {:?} has row length {} that is not a multiple of its block size {bs} (or a size overflow)",
                        path.display(),
                        t.name,
                        t.ggml_type,
                        t.dims.first().copied().unwrap_or(1)
                    )
                })?;
                if t.offset.checked_add(n).is_none_or(|end| end > data_len) {
                    bail!(
                        "{}: tensor {:?} data [{}, {}) is out of range: the data section (from byte {data_start}) holds {data_len} bytes (truncated file?)",
                        path.display(),
                        t.name,
                        t.offset,
                        t.offset as u128 + n as u128
                    );
                }
            }
        }
        Ok(Gguf { path, version, metadata, key_order, tensors, by_name, alignment, data_start, file_len })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Data alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Byte offset of the data section in the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
    /// All metadata by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }
    /// Metadata keys in file order.
    pub fn metadata_keys(&self) -> &[String] {
        &self.key_order
    }
    /// Metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    /// Tensor table in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// Info of tensor `name`; the error names the file and the tensor.
    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i]).ok_or_else(|| {
            anyhow!("{}: no tensor {name:?} ({} tensors in file)", self.path.display(), self.tensors.len())
        })
    }

    /// The stored bytes of tensor `name`.
    pub fn read_raw(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.tensor_info(name)?;
        let n = t.n_bytes().ok_or_else(|| {
            anyhow!("{}: tensor {name:?} has type {:?} of unknown size", self.path.display(), t.ggml_type)
        })?;
        let start = self.data_start + t.offset;
        if start + n > self.file_len {
            bail!(
                "{}: tensor {name:?} data [{start}, {}) is past the end of the file ({} bytes)",
                self.path.display(),
                start + n,
                self.file_len
            );
        }
        let mut f = std::fs::File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        f.seek(SeekFrom::Start(start))?;
        let mut buf = vec![0u8; n as usize];
        f.read_exact(&mut buf).with_context(|| format!("{}: reading data of tensor {name:?}", self.path.display()))?;
        Ok(buf)
    }

    /// Tensor `name` dequantized to f32, in the file's layout and naming
    /// (shape = `dims` reversed).
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        let t = self.tensor_info(name)?;
        let raw = self.read_raw(name)?;
        let data = dequantize(t.ggml_type, &raw, t.numel() as usize)
            .with_context(|| format!("{}: tensor {name:?}", self.path.display()))?;
        Ok(HostTensor { shape: t.shape(), data })
    }

    /// `general.architecture` ("llama", "qwen2", ...).
    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("{}: no general.architecture string", self.path.display()))
    }

    fn arch_u64(&self, arch: &str, key: &str) -> Result<u64> {
        let k = format!("{arch}.{key}");
        self.get(&k)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| anyhow!("{}: missing integer metadata {k}", self.path.display()))
    }

    fn arch_opt_f64(&self, arch: &str, key: &str) -> Option<f64> {
        self.get(&format!("{arch}.{key}")).and_then(|v| v.as_f64())
    }

    /// Transformer hyper-parameters of a llama-family model (llama, qwen2,
    /// mistral, ...), from the `<arch>.*` metadata, with llama.cpp's defaults
    /// where a key is optional.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?.to_string();
        let n_layer = self.arch_u64(&arch, "block_count")? as usize;
        let n_embd = self.arch_u64(&arch, "embedding_length")? as usize;
        let n_ff = self.arch_u64(&arch, "feed_forward_length")? as usize;
        let n_head = self.arch_u64(&arch, "attention.head_count")? as usize;
        let n_head_kv = self.arch_u64(&arch, "attention.head_count_kv").map(|v| v as usize).unwrap_or(n_head);
        if n_head == 0 || !n_embd.is_multiple_of(n_head) || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            bail!(
                "{}: inconsistent heads: n_embd {n_embd}, n_head {n_head}, n_head_kv {n_head_kv}",
                self.path.display()
            );
        }
        let head_dim = self.arch_u64(&arch, "attention.key_length").map(|v| v as usize).unwrap_or(n_embd / n_head);
        let vocab_size = match self.arch_u64(&arch, "vocab_size") {
            Ok(v) => v as usize,
            Err(_) => match self.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
                Some(t) => t.len(),
                None => self.tensor_info("token_embd.weight")?.dims.get(1).copied().unwrap_or(0) as usize,
            },
        };
        Ok(LlamaConfig {
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            vocab_size,
            context_length: self.arch_u64(&arch, "context_length").map(|v| v as usize).unwrap_or(0),
            rope_theta: self.arch_opt_f64(&arch, "rope.freq_base").unwrap_or(10000.0) as f32,
            rope_dim: self.arch_u64(&arch, "rope.dimension_count").map(|v| v as usize).unwrap_or(head_dim),
            rms_norm_eps: self.arch_opt_f64(&arch, "attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            tied_embeddings: !self.by_name.contains_key("output.weight"),
            arch,
        })
    }

    /// The tokenizer stored in the metadata (`tokenizer.ggml.*`).
    pub fn tokenizer(&self) -> Result<GgufTokenizer> {
        let p = self.path.display();
        let model = self
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("{p}: no tokenizer.ggml.model"))?
            .to_string();
        let strings = |key: &str| -> Result<Vec<String>> {
            match self.get(key) {
                None => Ok(Vec::new()),
                Some(v) => v
                    .as_array()
                    .ok_or_else(|| anyhow!("{p}: {key} is not an array"))?
                    .iter()
                    .map(|s| s.as_str().map(str::to_string).ok_or_else(|| anyhow!("{p}: {key} holds a non-string")))
                    .collect(),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            bail!("{p}: no tokenizer.ggml.tokens");
        }
        let merges = strings("tokenizer.ggml.merges")?;
        let token_types: Vec<i32> = match self.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(|v| v.as_f64().map(|x| x as i32))
                .collect::<Option<_>>()
                .ok_or_else(|| anyhow!("{p}: bad token_type"))?,
        };
        let scores: Vec<f32> = match self.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| anyhow!("{p}: bad scores"))?,
        };
        for (key, len) in [("token_type", token_types.len()), ("scores", scores.len())] {
            if len != 0 && len != tokens.len() {
                bail!("{p}: tokenizer.ggml.{key} has {len} entries for {} tokens", tokens.len());
            }
        }
        let id = |key: &str| -> Result<Option<u32>> {
            match self.get(&format!("tokenizer.ggml.{key}")) {
                None => Ok(None),
                Some(v) => {
                    let id = v.as_u64().ok_or_else(|| anyhow!("{p}: tokenizer.ggml.{key} is not an integer"))?;
                    if id as usize >= tokens.len() {
                        bail!("{p}: tokenizer.ggml.{key} = {id} is outside the vocabulary ({} tokens)", tokens.len());
                    }
                    Ok(Some(id as u32))
                }
            }
        };
        let flag = |key: &str| self.get(&format!("tokenizer.ggml.{key}")).and_then(|v| v.as_bool());
        Ok(GgufTokenizer {
            pre: self.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).map(str::to_string),
            bos_id: id("bos_token_id")?,
            eos_id: id("eos_token_id")?,
            unk_id: id("unknown_token_id")?,
            pad_id: id("padding_token_id")?,
            add_bos: flag("add_bos_token"),
            add_eos: flag("add_eos_token"),
            chat_template: self.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string),
            model,
            tokens,
            token_types,
            merges,
            scores,
        })
    }

    /// Tensor `gguf_name` with its Hugging Face name, dequantized, and for
    /// llama models with Q/K rows put back in HF order (undoing
    /// convert_hf_to_gguf.py's `permute`). Tensors without a HF counterpart
    /// (e.g. `rope_freqs.weight`) keep their GGUF name.
    pub fn hf_tensor(&self, gguf_name: &str, cfg: &LlamaConfig) -> Result<(String, HostTensor)> {
        let mut t = self.tensor_f32(gguf_name)?;
        let hf = hf_name(gguf_name).unwrap_or_else(|| gguf_name.to_string());
        if cfg.arch == "llama" {
            let heads = if gguf_name.contains(".attn_q.") {
                Some(cfg.n_head)
            } else if gguf_name.contains(".attn_k.") {
                Some(cfg.n_head_kv)
            } else {
                None
            };
            if let Some(h) = heads {
                let rows = t.shape[0];
                let cols = t.numel() / rows.max(1);
                t.data = unpermute_rows(&t.data, rows, cols, h)
                    .with_context(|| format!("{}: tensor {gguf_name:?}", self.path.display()))?;
            }
        }
        Ok((hf, t))
    }

    /// Every tensor via `hf_tensor`, by HF name.
    pub fn hf_tensors(&self) -> Result<BTreeMap<String, HostTensor>> {
        let cfg = self.llama_config()?;
        let mut out = BTreeMap::new();
        for t in &self.tensors {
            let (name, v) = self.hf_tensor(&t.name, &cfg)?;
            out.insert(name, v);
        }
        Ok(out)
    }
}

/// Hyper-parameters of a llama-family model read from GGUF metadata.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    /// `general.architecture`.
    pub arch: String,
    pub n_layer: usize,
    /// Hidden size d.
    pub n_embd: usize,
    /// FFN inner size.
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Trained context length (0 if absent).
    pub context_length: usize,
    /// RoPE base frequency (default 10000).
    pub rope_theta: f32,
    /// Rotated dimensions per head (default head_dim).
    pub rope_dim: usize,
    pub rms_norm_eps: f32,
    /// True when there is no `output.weight`: the LM head reuses `token_embd`.
    pub tied_embeddings: bool,
}

/// Tokenizer description from `tokenizer.ggml.*` metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTokenizer {
    /// "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    pub model: String,
    /// Pre-tokenizer name (e.g. "smollm"), when present.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// llama.cpp token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte); may be empty.
    pub token_types: Vec<i32>,
    /// BPE merges "a b", in priority order; empty for SentencePiece.
    pub merges: Vec<String>,
    /// SentencePiece scores; may be empty.
    pub scores: Vec<f32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub chat_template: Option<String>,
}

/// Hugging Face name of a llama.cpp tensor name (llama/qwen2/mistral
/// families), or None when there is no counterpart.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

fn check_perm(rows: usize, cols: usize, n_head: usize, len: usize) -> Result<usize> {
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) || rows * cols != len {
        bail!("Q/K row permutation: {rows} rows x {cols} cols ({len} values) do not split into {n_head} heads of even size");
    }
    Ok(rows / n_head)
}

/// llama.cpp's `permute` (convert_hf_to_gguf.py) on a row-major [rows, cols]
/// matrix: within each head of `head_dim = rows / n_head` rows, HF row
/// `s * head_dim/2 + j` (s in {0,1}: first/second rotary half) moves to row
/// `2j + s` (interleaved pairs). Applied to q_proj with n_head and to k_proj
/// with n_head_kv.
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    let hd = check_perm(rows, cols, n_head, w.len())?;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for j in 0..hd / 2 {
                let src = h * hd + s * hd / 2 + j;
                let dst = h * hd + 2 * j + s;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Inverse of `permute_rows`: GGUF row order back to HF order.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    let hd = check_perm(rows, cols, n_head, w.len())?;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for j in 0..hd / 2 {
                let hf = h * hd + s * hd / 2 + j;
                let gg = h * hd + 2 * j + s;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&w[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    Ok(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantize `n` elements of type `ty` stored in `raw` to f32.
///
/// Block layouts (ggml-common.h), 32 elements per block:
/// Q8_0 = f16 d, i8 q[32]: x = d*q.
/// Q4_0 = f16 d, u8 qs[16]: x[j] = d*((qs[j] & 15) - 8), x[j+16] = d*((qs[j] >> 4) - 8).
/// Q4_1 = f16 d, f16 m, u8 qs[16]: x[j] = d*(qs[j] & 15) + m, x[j+16] = d*(qs[j] >> 4) + m.
pub fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Result<Vec<f32>> {
    let (bs, bb) = ty.block().ok_or_else(|| anyhow!("unsupported ggml type {ty:?}"))?;
    let (bs, bb) = (bs as usize, bb as usize);
    if !n.is_multiple_of(bs) || raw.len() != n / bs * bb {
        bail!("{ty:?}: {} bytes do not hold {n} elements ({bb} bytes per {bs})", raw.len());
    }
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::BF16 => out.extend(raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for b in raw.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        GgmlType::Q4_0 => {
            for b in raw.chunks_exact(18) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * ((q & 15) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
        }
        GgmlType::Q4_1 => {
            for b in raw.chunks_exact(20) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| d * (q & 15) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        other => bail!("dequantization of {other:?} is not implemented (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"),
    }
    Ok(out)
}

fn check_blocks(x: &[f32], what: &str) -> Result<()> {
    if !x.len().is_multiple_of(32) {
        bail!("{what}: {} values are not a multiple of the block size 32", x.len());
    }
    Ok(())
}

/// Quantize to Q8_0 like llama.cpp's `quantize_row_q8_0_ref`.
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>> {
    check_blocks(x, "quantize_q8_0")?;
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for blk in x.chunks_exact(32) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}

/// Quantize to Q4_0 like llama.cpp's `quantize_row_q4_0_ref`.
pub fn quantize_q4_0(x: &[f32]) -> Result<Vec<u8>> {
    check_blocks(x, "quantize_q4_0")?;
    let mut out = Vec::with_capacity(x.len() / 32 * 18);
    for blk in x.chunks_exact(32) {
        // The value of largest magnitude, with its sign.
        let max = blk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
    }
    Ok(out)
}

/// Quantize to Q4_1 like llama.cpp's `quantize_row_q4_1_ref`.
pub fn quantize_q4_1(x: &[f32]) -> Result<Vec<u8>> {
    check_blocks(x, "quantize_q4_1")?;
    let mut out = Vec::with_capacity(x.len() / 32 * 20);
    for blk in x.chunks_exact(32) {
        let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
        let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&half::f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
        out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
    }
    Ok(out)
}

/// Builds a GGUF v3 file: metadata in insertion order, tensors given as
/// already-encoded bytes (see `quantize_*`), data aligned to
/// `general.alignment` (default 32).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file description.
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Add a metadata entry.
    pub fn meta(&mut self, key: &str, v: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    /// Add a tensor with GGUF dims (`ne`, innermost first) and encoded data.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    /// Add an f32 tensor given in row-major `shape` (outermost first),
    /// encoded as `ty` (F32, F16, Q8_0, Q4_0 or Q4_1).
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], x: &[f32], ty: GgmlType) -> Result<&mut Self> {
        let data = match ty {
            GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            GgmlType::Q8_0 => quantize_q8_0(x)?,
            GgmlType::Q4_0 => quantize_q4_0(x)?,
            GgmlType::Q4_1 => quantize_q4_1(x)?,
            other => bail!("GgufWriter: cannot encode {other:?}"),
        };
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        Ok(self.tensor(name, &dims, ty, data))
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let alignment = match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => {
                v.as_u64().filter(|a| *a > 0 && a.is_power_of_two()).ok_or_else(|| anyhow!("bad general.alignment"))?
            }
            None => DEFAULT_ALIGNMENT,
        };
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut b, k);
            b.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut b, v)?;
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.id().to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(alignment) * alignment;
        }
        let pad = |b: &mut Vec<u8>| b.resize((b.len() as u64).div_ceil(alignment) as usize * alignment as usize, 0);
        pad(&mut b);
        for (_, _, _, data) in &self.tensors {
            b.extend_from_slice(data);
            pad(&mut b);
        }
        Ok(b)
    }

    /// Write the file atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.to_bytes()?;
        super::atomic_write(path.as_ref(), |w| Ok(w.write_all(&bytes)?))
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &MetaValue) -> Result<()> {
    match v {
        MetaValue::U8(x) => b.push(*x),
        MetaValue::I8(x) => b.push(*x as u8),
        MetaValue::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => b.push(*x as u8),
        MetaValue::Str(s) => put_str(b, s),
        MetaValue::Array(et, items) => {
            b.extend_from_slice(&et.to_le_bytes());
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                if it.type_id() != *et {
                    bail!("GGUF array of type {et} holds a value of type {}", it.type_id());
                }
                put_value(b, it)?;
            }
        }
        MetaValue::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::TestDir;
    use crate::ops::testing::{assert_close, rand_vec};

    fn f16b(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q8_0_block_by_hand() {
        // d = 0.5; q = -16..16 => x = 0.5 * q.
        let mut raw = f16b(0.5).to_vec();
        raw.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let x = dequantize(GgmlType::Q8_0, &raw, 32).unwrap();
        let want: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
        assert_eq!(x, want);
    }

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.25, m = -1.0; low nibbles j, high nibbles 15 - j.
        let mut raw = f16b(0.25).to_vec();
        raw.extend_from_slice(&f16b(-1.0));
        raw.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let x = dequantize(GgmlType::Q4_1, &raw, 32).unwrap();
        for j in 0..16 {
            assert_eq!(x[j], 0.25 * j as f32 - 1.0, "low nibble {j}");
            assert_eq!(x[j + 16], 0.25 * (15 - j) as f32 - 1.0, "high nibble {j}");
        }
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 2.0: x[j] = 2*((j) - 8), x[j+16] = 2*((15-j) - 8).
        let mut raw = f16b(2.0).to_vec();
        raw.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let x = dequantize(GgmlType::Q4_0, &raw, 32).unwrap();
        for j in 0..16 {
            assert_eq!(x[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(x[j + 16], 2.0 * (7.0 - j as f32));
        }
    }

    #[test]
    fn quantizers_roundtrip_within_half_step() {
        let x = rand_vec(7, 32 * 9, 3.0);
        for (ty, q) in [
            (GgmlType::Q8_0, quantize_q8_0(&x).unwrap()),
            (GgmlType::Q4_0, quantize_q4_0(&x).unwrap()),
            (GgmlType::Q4_1, quantize_q4_1(&x).unwrap()),
        ] {
            let y = dequantize(ty, &q, x.len()).unwrap();
            for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let range = xb.iter().copied().fold(f32::MIN, f32::max) - xb.iter().copied().fold(f32::MAX, f32::min);
                // Half a quantization step, plus f16 rounding of the scale.
                let step = match ty {
                    GgmlType::Q8_0 => amax / 127.0,
                    GgmlType::Q4_0 => amax / 8.0,
                    _ => range / 15.0,
                };
                for (i, (a, b2)) in xb.iter().zip(yb).enumerate() {
                    let tol = match ty {
                        // Q4_0's grid is asymmetric: +max maps to 7/8 of it.
                        GgmlType::Q4_0 => step + 2e-3 * amax,
                        _ => 0.5 * step + 2e-3 * amax,
                    };
                    assert!((a - b2).abs() <= tol, "{ty:?} block {b} elem {i}: {a} vs {b2} (tol {tol})");
                }
            }
        }
        assert!(quantize_q8_0(&x[..33]).is_err());
    }

    #[test]
    fn permute_matches_llama_cpp_formula_and_inverts() {
        // rows = n_head * head_dim; reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).
        let (n_head, hd, cols) = (3, 4, 2);
        let rows = n_head * hd;
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = permute_rows(&w, rows, cols, n_head).unwrap();
        // numpy: new[h, j, s] = old[h, s, j]; row index h*hd + j*2 + s <- h*hd + s*hd/2 + j.
        let mut want = vec![0f32; w.len()];
        for h in 0..n_head {
            for j in 0..hd / 2 {
                for s in 0..2 {
                    for c in 0..cols {
                        want[(h * hd + j * 2 + s) * cols + c] = w[(h * hd + s * hd / 2 + j) * cols + c];
                    }
                }
            }
        }
        assert_eq!(p, want);
        assert_eq!(unpermute_rows(&p, rows, cols, n_head).unwrap(), w);
        // Row 1 of head 0 in GGUF order is HF row hd/2 (the first element of the second half).
        assert_eq!(p[cols..2 * cols], w[(hd / 2) * cols..(hd / 2 + 1) * cols]);
        assert!(unpermute_rows(&p, rows, cols, 5).is_err());
    }

    #[test]
    fn hf_names() {
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_name("blk.12.attn_q.weight").unwrap(), "model.layers.12.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.attn_k.bias").unwrap(), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_name("blk.3.ffn_norm.weight").unwrap(), "model.layers.3.post_attention_layernorm.weight");
        assert_eq!(hf_name("blk.3.ffn_down.weight").unwrap(), "model.layers.3.mlp.down_proj.weight");
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }

    /// A tiny llama model: 1 layer, d = 64, 2 heads / 1 KV head (head_dim 32), vocab 4.
    fn tiny_llama(w: &mut GgufWriter) -> BTreeMap<String, (Vec<usize>, Vec<f32>, GgmlType)> {
        let s = |v: &str| MetaValue::Str(v.into());
        let strs = |v: &[&str]| MetaValue::Array(8, v.iter().map(|x| MetaValue::Str(x.to_string())).collect());
        w.meta("general.architecture", s("llama"))
            .meta("general.alignment", MetaValue::U32(64))
            .meta("llama.block_count", MetaValue::U32(1))
            .meta("llama.context_length", MetaValue::U32(128))
            .meta("llama.embedding_length", MetaValue::U32(64))
            .meta("llama.feed_forward_length", MetaValue::U32(96))
            .meta("llama.attention.head_count", MetaValue::U32(2))
            .meta("llama.attention.head_count_kv", MetaValue::U32(1))
            .meta("llama.rope.freq_base", MetaValue::F32(100000.0))
            .meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
            .meta("tokenizer.ggml.model", s("gpt2"))
            .meta("tokenizer.ggml.pre", s("smollm"))
            .meta("tokenizer.ggml.tokens", strs(&["<|endoftext|>", "<|im_start|>", "a", "b"]))
            .meta(
                "tokenizer.ggml.token_type",
                MetaValue::Array(5, vec![MetaValue::I32(3), MetaValue::I32(3), MetaValue::I32(1), MetaValue::I32(1)]),
            )
            .meta("tokenizer.ggml.merges", strs(&["a b"]))
            .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(0))
            .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
            // Every other value type, for the reader.
            .meta("test.u8", MetaValue::U8(200))
            .meta("test.i8", MetaValue::I8(-5))
            .meta("test.u16", MetaValue::U16(60000))
            .meta("test.i16", MetaValue::I16(-300))
            .meta("test.i64", MetaValue::I64(-1 << 40))
            .meta("test.u64", MetaValue::U64(1 << 50))
            .meta("test.f64", MetaValue::F64(0.1))
            .meta("test.empty", MetaValue::Array(6, vec![]))
            .meta(
                "test.nested",
                MetaValue::Array(9, vec![MetaValue::Array(0, vec![MetaValue::U8(1), MetaValue::U8(2)])]),
            );
        let mut m = BTreeMap::new();
        let specs: &[(&str, &[usize], GgmlType)] = &[
            ("token_embd.weight", &[4, 64], GgmlType::Q8_0),
            ("output_norm.weight", &[64], GgmlType::F32),
            ("blk.0.attn_norm.weight", &[64], GgmlType::F32),
            ("blk.0.attn_q.weight", &[64, 64], GgmlType::Q4_1),
            ("blk.0.attn_k.weight", &[32, 64], GgmlType::Q4_0),
            ("blk.0.attn_v.weight", &[32, 64], GgmlType::F16),
            ("blk.0.attn_output.weight", &[64, 64], GgmlType::Q8_0),
            ("blk.0.ffn_gate.weight", &[96, 64], GgmlType::Q4_1),
        ];
        for (i, (name, shape, ty)) in specs.iter().enumerate() {
            let x = rand_vec(100 + i as u64, shape.iter().product(), 1.0);
            w.tensor_f32(name, shape, &x, *ty).unwrap();
            m.insert(name.to_string(), (shape.to_vec(), x, *ty));
        }
        m
    }

    #[test]
    fn tiny_file_roundtrips() {
        let t = TestDir::new("gguf");
        let p = t.path().join("tiny.gguf");
        let mut w = GgufWriter::new();
        let want = tiny_llama(&mut w);
        w.write(&p).unwrap();
        let g = Gguf::open(&p).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.alignment(), 64);
        assert_eq!(g.data_start() % 64, 0);
        assert_eq!(g.tensors().len(), want.len());
        assert_eq!(g.metadata_keys()[0], "general.architecture");
        assert_eq!(g.get("test.u8"), Some(&MetaValue::U8(200)));
        assert_eq!(g.get("test.i8"), Some(&MetaValue::I8(-5)));
        assert_eq!(g.get("test.u16"), Some(&MetaValue::U16(60000)));
        assert_eq!(g.get("test.i16"), Some(&MetaValue::I16(-300)));
        assert_eq!(g.get("test.i64"), Some(&MetaValue::I64(-1 << 40)));
        assert_eq!(g.get("test.u64"), Some(&MetaValue::U64(1 << 50)));
        assert_eq!(g.get("test.f64"), Some(&MetaValue::F64(0.1)));
        assert_eq!(g.get("test.empty"), Some(&MetaValue::Array(6, vec![])));
        assert_eq!(g.get("test.nested").unwrap().as_array().unwrap()[0].as_array().unwrap().len(), 2);
        for (name, (shape, x, ty)) in &want {
            let info = g.tensor_info(name).unwrap();
            assert_eq!(&info.shape(), shape, "{name}");
            assert_eq!(info.ggml_type, *ty);
            assert_eq!(info.offset % 64, 0);
            let got = g.tensor_f32(name).unwrap();
            assert_eq!(&got.shape, shape);
            // Bit-exact against dequantizing our own encoding.
            let mut w1 = GgufWriter::new();
            w1.tensor_f32("x", shape, x, *ty).unwrap();
            let enc = &w1.tensors[0].3;
            assert_eq!(got.data, dequantize(*ty, enc, x.len()).unwrap(), "{name}");
            let tol = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => 1e-3,
                GgmlType::Q8_0 => 1e-2,
                _ => 0.15,
            };
            assert_close(name, &got.data, x, 0.0, tol);
        }

        let cfg = g.llama_config().unwrap();
        assert_eq!(
            cfg,
            LlamaConfig {
                arch: "llama".into(),
                n_layer: 1,
                n_embd: 64,
                n_ff: 96,
                n_head: 2,
                n_head_kv: 1,
                head_dim: 32,
                vocab_size: 4,
                context_length: 128,
                rope_theta: 100000.0,
                rope_dim: 32,
                rms_norm_eps: 1e-5,
                tied_embeddings: true,
            }
        );
        let tok = g.tokenizer().unwrap();
        assert_eq!(tok.model, "gpt2");
        assert_eq!(tok.pre.as_deref(), Some("smollm"));
        assert_eq!(tok.tokens, vec!["<|endoftext|>", "<|im_start|>", "a", "b"]);
        assert_eq!(tok.token_types, vec![3, 3, 1, 1]);
        assert_eq!(tok.merges, vec!["a b"]);
        assert_eq!((tok.bos_id, tok.eos_id, tok.unk_id), (Some(1), Some(0), None));
        assert_eq!(tok.add_bos, Some(false));

        // HF view: names mapped; Q (2 heads) and K (1 KV head) rows unpermuted.
        let hf = g.hf_tensors().unwrap();
        assert!(hf.contains_key("model.embed_tokens.weight") && hf.contains_key("model.norm.weight"));
        let q_gguf = g.tensor_f32("blk.0.attn_q.weight").unwrap();
        let q_hf = &hf["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!(permute_rows(&q_hf.data, 64, 64, 2).unwrap(), q_gguf.data);
        let k_gguf = g.tensor_f32("blk.0.attn_k.weight").unwrap();
        let k_hf = &hf["model.layers.0.self_attn.k_proj.weight"];
        assert_eq!(k_hf.shape, vec![32, 64]);
        assert_eq!(permute_rows(&k_hf.data, 32, 64, 1).unwrap(), k_gguf.data);
        assert_ne!(k_hf.data, k_gguf.data);
        assert_eq!(
            hf["model.layers.0.self_attn.v_proj.weight"].data,
            g.tensor_f32("blk.0.attn_v.weight").unwrap().data
        );
    }

    fn tiny_bytes() -> Vec<u8> {
        let mut w = GgufWriter::new();
        tiny_llama(&mut w);
        w.to_bytes().unwrap()
    }

    fn open_err(t: &TestDir, name: &str, bytes: &[u8]) -> String {
        let p = t.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        format!("{:#}", Gguf::open(&p).unwrap_err())
    }

    #[test]
    fn corrupt_files_give_named_errors() {
        let t = TestDir::new("gguf-bad");
        let good = tiny_bytes();

        let mut bad = good.clone();
        bad[0] = b'X';
        let e = open_err(&t, "magic.gguf", &bad);
        assert!(e.contains("magic.gguf") && e.contains("not a GGUF file"), "{e}");

        let mut bad = good.clone();
        bad[4] = 9;
        let e = open_err(&t, "version.gguf", &bad);
        assert!(e.contains("version.gguf") && e.contains("version 9"), "{e}");

        // Truncated inside the metadata.
        let e = open_err(&t, "short.gguf", &good[..100]);
        assert!(e.contains("short.gguf") && e.contains("truncated"), "{e}");

        // Truncated inside the data of the last tensor: the error names it.
        let g_path = t.path().join("ok.gguf");
        std::fs::write(&g_path, &good).unwrap();
        let g = Gguf::open(&g_path).unwrap();
        let last = g.tensors().iter().max_by_key(|ti| ti.offset).unwrap().name.clone();
        let e = open_err(&t, "trunc.gguf", &good[..good.len() - 100]);
        assert!(e.contains("trunc.gguf") && e.contains(&last) && e.contains("out of range"), "{e}");

        // A tensor offset pointing past the end.
        let hdr_end = g.data_start() as usize;
        let needle = {
            let mut n = Vec::new();
            put_str(&mut n, "output_norm.weight");
            n
        };
        let pos = good[..hdr_end].windows(needle.len()).position(|w| w == needle.as_slice()).unwrap();
        // name, n_dims u32, 1 dim u64, type u32, then the offset u64.
        let off_at = pos + needle.len() + 4 + 8 + 4;
        let mut bad = good.clone();
        bad[off_at..off_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = open_err(&t, "range.gguf", &bad);
        assert!(e.contains("range.gguf") && e.contains("output_norm.weight") && e.contains("out of range"), "{e}");
        // A misaligned offset.
        bad[off_at..off_at + 8].copy_from_slice(&8u64.to_le_bytes());
        let e = open_err(&t, "align.gguf", &bad);
        assert!(e.contains("output_norm.weight") && e.contains("alignment"), "{e}");

        // A string length larger than the file.
        let mut bad = good.clone();
        bad[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = open_err(&t, "strlen.gguf", &bad);
        assert!(e.contains("strlen.gguf") && e.contains("metadata key #0"), "{e}");

        // Unknown type ids: readable header, clear error on dequantize.
        let mut w = GgufWriter::new();
        w.tensor("weird", &[32], GgmlType::Q6_K, vec![0; 0]);
        let p = t.path().join("weird.gguf");
        // Q6_K with 32 elements is not a whole block: rejected at open, naming the tensor.
        std::fs::write(&p, w.to_bytes().unwrap()).unwrap();
        let e = format!("{:#}", Gguf::open(&p).unwrap_err());
        assert!(e.contains("weird") && e.contains("block size"), "{e}");
        let mut w = GgufWriter::new();
        w.tensor("q6", &[256], GgmlType::Q6_K, vec![0; 210]);
        w.write(&p).unwrap();
        let g = Gguf::open(&p).unwrap();
        let e = format!("{:#}", g.tensor_f32("q6").unwrap_err());
        assert!(e.contains("weird.gguf") && e.contains("q6") && e.contains("Q6_K"), "{e}");
        let e = format!("{:#}", g.tensor_f32("absent").unwrap_err());
        assert!(e.contains("absent"), "{e}");
    }

    /// The real SmolLM2 file, when fetched (`genrec fetch smollm2`): prints
    /// the tensor table and config, checks shapes against the published
    /// architecture. With GENREC_GGUF_DUMP=path it also writes every tensor
    /// dequantized (GGUF names) plus the HF-order q/k of layer 0 to a
    /// safetensors file for tools/gguf_crosscheck.py.
    #[test]
    fn real_smollm2_when_present() {
        let Some(dir) = crate::io::fetch::local("smollm2") else {
            eprintln!("skipping: asset smollm2 not fetched (genrec fetch smollm2)");
            return;
        };
        let g = Gguf::open(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
        let cfg = g.llama_config().unwrap();
        println!("config: {}", serde_json::to_string(&cfg).unwrap());
        assert_eq!((cfg.n_layer, cfg.n_embd, cfg.n_ff, cfg.n_head, cfg.n_head_kv), (30, 576, 1536, 9, 3));
        assert_eq!((cfg.vocab_size, cfg.head_dim, cfg.rope_theta), (49152, 64, 100000.0));
        assert!(cfg.tied_embeddings);
        let mut types: BTreeMap<String, usize> = BTreeMap::new();
        for ti in g.tensors() {
            *types.entry(format!("{:?}", ti.ggml_type)).or_default() += 1;
            if ti.name.starts_with("blk.0.") || !ti.name.starts_with("blk.") {
                println!("{} {:?} {:?}", ti.name, ti.ggml_type, ti.shape());
            }
        }
        println!("{} tensors, types {types:?}, data at byte {}", g.tensors().len(), g.data_start());
        let tok = g.tokenizer().unwrap();
        println!(
            "tokenizer: model {} pre {:?} {} tokens {} merges bos {:?} eos {:?} unk {:?} pad {:?} add_bos {:?}",
            tok.model,
            tok.pre,
            tok.tokens.len(),
            tok.merges.len(),
            tok.bos_id,
            tok.eos_id,
            tok.unk_id,
            tok.pad_id,
            tok.add_bos
        );
        assert_eq!(tok.tokens.len(), 49152);
        assert_eq!(g.tensor_info("blk.0.attn_k.weight").unwrap().shape(), vec![192, 576]);
        let hf = g.hf_tensors().unwrap();
        assert_eq!(hf.len(), g.tensors().len());
        assert_eq!(hf["model.embed_tokens.weight"].shape, vec![49152, 576]);
        assert!(hf.values().all(|t| t.data.iter().all(|v| v.is_finite())));
        if let Ok(out) = std::env::var("GENREC_GGUF_DUMP") {
            let mut m: BTreeMap<String, HostTensor> = BTreeMap::new();
            for ti in g.tensors() {
                m.insert(ti.name.clone(), g.tensor_f32(&ti.name).unwrap());
            }
            for n in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"] {
                m.insert(format!("hf.{n}"), hf[n].clone());
            }
            crate::io::safetensors::save(&out, &m, None, crate::io::safetensors::StoreDtype::F32).unwrap();
            println!("wrote {out}");
        }
    }
}
