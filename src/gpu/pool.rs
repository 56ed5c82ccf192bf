//! Size-class buffer pool. Freed tensors return their buffer here; the next
//! allocation of the same class reuses it. Reuse is safe while work is still
//! pending: every write to a buffer (dispatch, upload copy, clear) is recorded
//! into the same ordered command stream, after the reads of its previous owner.

use std::collections::HashMap;

#[derive(Default)]
pub struct BufferPool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    pub cached_bytes: u64,
}

/// Round a request up to its size class: powers of two up to 1 MiB, then steps
/// of 1/8 of the enclosing power of two (at most 12.5% waste).
pub fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(256);
    let p = b.next_power_of_two();
    if p <= 1 << 20 {
        return p;
    }
    let step = p / 16;
    b.div_ceil(step) * step
}

impl BufferPool {
    pub fn take(&mut self, class: u64) -> Option<wgpu::Buffer> {
        let b = self.free.get_mut(&class)?.pop()?;
        self.cached_bytes -= class;
        Some(b)
    }
    pub fn give(&mut self, class: u64, buf: wgpu::Buffer) {
        self.cached_bytes += class;
        self.free.entry(class).or_default().push(buf);
    }
    /// Drop every cached buffer.
    pub fn clear(&mut self) {
        self.free.clear();
        self.cached_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn size_classes_cover_request() {
        for b in [1u64, 255, 256, 257, 4096, 1 << 20, (1 << 20) + 1, 3 << 21, 100_000_007] {
            let c = size_class(b);
            assert!(c >= b, "{b} -> {c}");
            assert!(c <= (b.max(256) as f64 * 2.0) as u64);
            assert_eq!(c % 4, 0);
        }
        assert!(size_class(9 << 20) <= (9u64 << 20) * 9 / 8);
    }
}
