//! Low-level input helpers shared by the loaders: transparent gzip, line
//! iteration with 1-based line numbers, UTF-8 checks that name the file and
//! line, timestamp parsing, and a parser for the Python-literal lines of the
//! 2014 Amazon metadata dump.

use anyhow::{anyhow, bail, Context, Result};
use flate2::read::MultiGzDecoder;
use serde_json::{Map, Number, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Opens `path` for reading, decompressing it when it starts with the gzip
/// magic bytes (whatever its extension). Errors name the file.
pub fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead>> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut f, &mut magic).with_context(|| format!("{}: cannot read", path.display()))?;
    let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(f))))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 16, f)))
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Iterates over the lines of a (possibly gzipped) text file, yielding
/// `(line_number_1_based, line)` with the trailing `\n`/`\r\n` removed.
/// Read errors (e.g. a truncated gzip stream) and invalid UTF-8 become errors
/// naming the file and the line.
pub struct Lines {
    path: PathBuf,
    reader: Box<dyn BufRead>,
    line_no: usize,
    buf: Vec<u8>,
    done: bool,
}

impl Lines {
    /// Opens `path` (gzip detected by magic bytes).
    pub fn open(path: &Path) -> Result<Lines> {
        Ok(Lines { path: path.to_path_buf(), reader: open_maybe_gz(path)?, line_no: 0, buf: Vec::new(), done: false })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Iterator for Lines {
    type Item = Result<(usize, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.buf.clear();
        self.line_no += 1;
        match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => {
                self.done = true;
                None
            }
            Ok(_) => {
                while matches!(self.buf.last(), Some(b'\n') | Some(b'\r')) {
                    self.buf.pop();
                }
                match std::str::from_utf8(&self.buf) {
                    Ok(s) => Some(Ok((self.line_no, s.to_string()))),
                    Err(e) => {
                        self.done = true;
                        Some(Err(anyhow!(
                            "{}:{}: invalid UTF-8 at byte {} of the line",
                            self.path.display(),
                            self.line_no,
                            e.valid_up_to()
                        )))
                    }
                }
            }
            Err(e) => {
                self.done = true;
                Some(Err(anyhow!(
                    "{}:{}: read error (truncated or corrupt file?): {e}",
                    self.path.display(),
                    self.line_no
                )))
            }
        }
    }
}

/// Reads a whole (possibly gzipped) file into memory, naming the file on error.
pub fn read_all(path: &Path) -> Result<Vec<u8>> {
    let mut r = open_maybe_gz(path)?;
    let mut v = Vec::new();
    r.read_to_end(&mut v).with_context(|| format!("{}: read error (truncated or corrupt file?)", path.display()))?;
    Ok(v)
}

/// Parses a timestamp given as an integer or a finite float (seconds or any
/// monotone unit); floats are rounded to the nearest integer.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(v) = s.parse::<i64>() {
        return Some(v);
    }
    let f: f64 = s.parse().ok()?;
    if f.is_finite() && f.abs() < 9.0e18 {
        Some(f.round() as i64)
    } else {
        None
    }
}

/// Reads a JSON value as a timestamp (integer, float or numeric string).
pub fn json_timestamp(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().and_then(|f| parse_timestamp(&f.to_string()))),
        Value::String(s) => parse_timestamp(s),
        _ => None,
    }
}

/// Reads a JSON value as an id: strings as they are, integers in decimal.
pub fn json_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// Parses one line that is either strict JSON or a Python literal
/// (`{'asin': 'X', 'title': "It's", 'price': 3.5, 'x': None, ...}` as written
/// by Python's `str(dict)` in the 2014 Amazon metadata dump). Python `\xNN`
/// escapes in byte strings are collected as bytes and decoded as UTF-8 when
/// valid, else as Latin-1.
pub fn parse_json_or_python(line: &str) -> Result<Value> {
    match serde_json::from_str::<Value>(line) {
        Ok(v) => Ok(v),
        Err(json_err) => {
            let mut p = PyParser { s: line.as_bytes(), i: 0 };
            p.ws();
            match p.value().and_then(|v| {
                p.ws();
                if p.i != p.s.len() {
                    bail!("trailing characters at column {}", p.i + 1)
                }
                Ok(v)
            }) {
                Ok(v) => Ok(v),
                Err(py_err) => bail!("neither JSON ({json_err}) nor a Python literal ({py_err})"),
            }
        }
    }
}

struct PyParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl PyParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            bail!("expected '{}' at column {}", c as char, self.i + 1)
        }
    }

    fn value(&mut self) -> Result<Value> {
        self.ws();
        let c = self.peek().ok_or_else(|| anyhow!("unexpected end of line"))?;
        match c {
            b'{' => self.dict(),
            b'[' => self.seq(b']'),
            b'(' => self.seq(b')'),
            b'\'' | b'"' => Ok(Value::String(self.string(false)?)),
            b'u' | b'U' | b'b' | b'B' | b'r' | b'R' if matches!(self.s.get(self.i + 1), Some(b'\'') | Some(b'"')) => {
                let unicode = c == b'u' || c == b'U';
                let raw = c == b'r' || c == b'R';
                self.i += 1;
                if raw {
                    Ok(Value::String(self.raw_string()?))
                } else {
                    Ok(Value::String(self.string(unicode)?))
                }
            }
            _ => self.atom(),
        }
    }

    fn dict(&mut self) -> Result<Value> {
        self.expect(b'{')?;
        let mut m = Map::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Value::Object(m));
        }
        loop {
            let k = self.value()?;
            let key = match k {
                Value::String(s) => s,
                other => other.to_string(),
            };
            self.expect(b':')?;
            let v = self.value()?;
            m.insert(key, v);
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        return Ok(Value::Object(m));
                    }
                }
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Value::Object(m));
                }
                _ => bail!("expected ',' or '}}' at column {}", self.i + 1),
            }
        }
    }

    fn seq(&mut self, close: u8) -> Result<Value> {
        self.i += 1;
        let mut v = Vec::new();
        self.ws();
        if self.peek() == Some(close) {
            self.i += 1;
            return Ok(Value::Array(v));
        }
        loop {
            v.push(self.value()?);
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(close) {
                        self.i += 1;
                        return Ok(Value::Array(v));
                    }
                }
                Some(c) if c == close => {
                    self.i += 1;
                    return Ok(Value::Array(v));
                }
                _ => bail!("expected ',' or '{}' at column {}", close as char, self.i + 1),
            }
        }
    }

    fn raw_string(&mut self) -> Result<String> {
        let q = self.s[self.i];
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() {
            if self.s[self.i] == b'\\' {
                self.i += 2;
                continue;
            }
            if self.s[self.i] == q {
                let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                return Ok(out);
            }
            self.i += 1;
        }
        bail!("unterminated string starting at column {}", start)
    }

    /// A quoted string; `unicode` makes `\xNN` a code point instead of a byte.
    fn string(&mut self, unicode: bool) -> Result<String> {
        let q = self.s[self.i];
        let start = self.i + 1;
        self.i += 1;
        let mut out: Vec<u8> = Vec::new();
        let mut any_byte_escape = false;
        let push_char = |out: &mut Vec<u8>, c: char| {
            let mut b = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
        };
        loop {
            let c = *self.s.get(self.i).ok_or_else(|| anyhow!("unterminated string starting at column {start}"))?;
            self.i += 1;
            if c == q {
                break;
            }
            if c != b'\\' {
                out.push(c);
                continue;
            }
            let e = *self.s.get(self.i).ok_or_else(|| anyhow!("unterminated escape at column {}", self.i))?;
            self.i += 1;
            match e {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'0' => out.push(0),
                b'a' => out.push(7),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'v' => out.push(11),
                b'\\' | b'\'' | b'"' => out.push(e),
                b'\n' => {}
                b'x' => {
                    let v = self.hex(2)?;
                    if unicode {
                        push_char(&mut out, char::from_u32(v).unwrap_or('\u{fffd}'));
                    } else {
                        out.push(v as u8);
                        any_byte_escape = true;
                    }
                }
                b'u' => {
                    let mut v = self.hex(4)?;
                    // UTF-16 surrogate pair written as two \u escapes.
                    if (0xD800..0xDC00).contains(&v)
                        && self.s.get(self.i) == Some(&b'\\')
                        && self.s.get(self.i + 1) == Some(&b'u')
                    {
                        self.i += 2;
                        let lo = self.hex(4)?;
                        v = 0x10000 + ((v - 0xD800) << 10) + (lo.wrapping_sub(0xDC00) & 0x3FF);
                    }
                    push_char(&mut out, char::from_u32(v).unwrap_or('\u{fffd}'));
                }
                b'U' => {
                    let v = self.hex(8)?;
                    push_char(&mut out, char::from_u32(v).unwrap_or('\u{fffd}'));
                }
                other => {
                    out.push(b'\\');
                    out.push(other);
                }
            }
        }
        match String::from_utf8(out) {
            Ok(s) => Ok(s),
            Err(e) if any_byte_escape => Ok(e.into_bytes().iter().map(|&b| b as char).collect()),
            Err(e) => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        }
    }

    fn hex(&mut self, n: usize) -> Result<u32> {
        let end = self.i + n;
        let h = self.s.get(self.i..end).ok_or_else(|| anyhow!("short escape at column {}", self.i))?;
        let h = std::str::from_utf8(h).map_err(|_| anyhow!("bad escape at column {}", self.i))?;
        let v = u32::from_str_radix(h, 16).map_err(|_| anyhow!("bad hex escape '{h}' at column {}", self.i))?;
        self.i = end;
        Ok(v)
    }

    fn atom(&mut self) -> Result<Value> {
        let start = self.i;
        while self.i < self.s.len() && !matches!(self.s[self.i], b',' | b':' | b'}' | b']' | b')') {
            self.i += 1;
        }
        let tok = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("").trim();
        Ok(match tok {
            "None" => Value::Null,
            "True" => Value::Bool(true),
            "False" => Value::Bool(false),
            _ => {
                let t = tok.trim_end_matches(['L', 'l']);
                if let Ok(i) = t.parse::<i64>() {
                    Value::Number(i.into())
                } else if let Some(n) = t.parse::<f64>().ok().and_then(Number::from_f64) {
                    Value::Number(n)
                } else {
                    bail!("unexpected token '{tok}' at column {}", start + 1)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literal_dicts() {
        let v = parse_json_or_python(
            r#"{'asin': '0000031852', 'title': "Girls' Tutu", 'price': 3.17, 'x': None, 'ok': True, 'related': {'also_bought': ['B1', 'B2']}, 'salesRank': {'Toys & Games': 211836}, 'categories': [['Sports & Outdoors', 'Dance']], 'description': 'Caf\xc3\xa9 \'q\' \n'}"#,
        )
        .unwrap();
        assert_eq!(v["asin"], "0000031852");
        assert_eq!(v["title"], "Girls' Tutu");
        assert_eq!(v["price"], 3.17);
        assert!(v["x"].is_null());
        assert_eq!(v["ok"], true);
        assert_eq!(v["related"]["also_bought"][1], "B2");
        assert_eq!(v["categories"][0][1], "Dance");
        assert_eq!(v["description"], "Café 'q' \n");
        let v = parse_json_or_python(r#"{u'a': u'\xe9\u00e9', 't': (1, 2,), 'e': {}, 'l': []}"#).unwrap();
        assert_eq!(v["a"], "éé");
        assert_eq!(v["t"][1], 2);
        // Strict JSON goes through serde_json.
        let v = parse_json_or_python(r#"{"asin": "B", "category": ["a", "b"]}"#).unwrap();
        assert_eq!(v["category"][1], "b");
    }

    #[test]
    fn python_literal_errors() {
        for bad in ["{'a': 'unterminated}", "{'a' 1}", "{'a': foo}", "{'a': 1} extra", "", "{'a': '\\x4'}"] {
            assert!(parse_json_or_python(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("881250949"), Some(881250949));
        assert_eq!(parse_timestamp(" 881250949.0 "), Some(881250949));
        assert_eq!(parse_timestamp("1.5e3"), Some(1500));
        assert_eq!(parse_timestamp("nan"), None);
        assert_eq!(parse_timestamp("x"), None);
    }
}
