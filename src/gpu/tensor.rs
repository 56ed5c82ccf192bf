//! Tensor: a pooled GPU buffer + shape + dtype. Always contiguous row-major;
//! `reshape` is a zero-copy view (shares the buffer). Transposition is not a
//! view: ops that want a transposed operand take a flag (see `ops::matmul`).

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use bytemuck::Pod;

use super::device::Gpu;
use super::pool::size_class;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// Half precision storage (needs SHADER_F16 to be read in kernels).
    F16,
    U32,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            _ => 4,
        }
    }
}

/// A buffer borrowed from the device's pool; returned on drop.
pub struct PooledBuffer {
    pub buffer: wgpu::Buffer,
    class: u64,
    gpu: Gpu,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let buf = self.buffer.clone();
        self.gpu.inner.pool.lock().unwrap().give(self.class, buf);
    }
}

#[derive(Clone)]
pub struct Tensor {
    buf: Arc<PooledBuffer>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.shape, self.dtype)
    }
}

/// `[2, 3, 4]` for error messages.
pub fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Tensor {
    /// Uninitialized tensor (contents are whatever the pooled buffer held).
    pub fn empty(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let bytes = ((numel * dtype.size()) as u64).div_ceil(4) * 4;
        if bytes > gpu.max_binding_bytes() {
            bail!(
                "tensor {} of {dtype:?} needs {bytes} bytes, over the adapter's storage binding limit of {} bytes; shard it",
                shape_str(shape),
                gpu.max_binding_bytes()
            );
        }
        gpu.check_alive("allocate")?;
        let class = size_class(bytes).min(gpu.max_binding_bytes().max(bytes));
        let pooled = gpu.inner.pool.lock().unwrap().take(class);
        let buffer = match pooled {
            Some(b) => b,
            None => gpu.device().create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: class,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        };
        Ok(Tensor { buf: Arc::new(PooledBuffer { buffer, class, gpu: gpu.clone() }), shape: shape.to_vec(), dtype })
    }

    /// Tensor filled with zeros (a GPU clear, ordered with pending work).
    pub fn zeros(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = Tensor::empty(gpu, shape, dtype)?;
        gpu.with_encoder(|e| e.clear_buffer(&t.buf.buffer, 0, None));
        Ok(t)
    }

    fn upload_bytes(gpu: &Gpu, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = Tensor::empty(gpu, shape, dtype)?;
        if !bytes.is_empty() {
            // Pad to a multiple of 4 bytes (copy alignment).
            let mut padded;
            let data = if !bytes.len().is_multiple_of(4) {
                padded = bytes.to_vec();
                padded.resize(bytes.len().div_ceil(4) * 4, 0);
                &padded[..]
            } else {
                bytes
            };
            // Staging copy recorded into the pending encoder, so it is ordered
            // after earlier reads of this (possibly recycled) buffer.
            let staging = gpu.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("upload"),
                size: data.len() as u64,
                usage: wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            });
            staging
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| anyhow!("mapping upload buffer: {e}"))?
                .copy_from_slice(data);
            staging.unmap();
            gpu.with_encoder(|e| e.copy_buffer_to_buffer(&staging, 0, &t.buf.buffer, 0, data.len() as u64));
        }
        Ok(t)
    }

    fn check_len(op: &str, len: usize, shape: &[usize]) -> Result<()> {
        let numel: usize = shape.iter().product();
        if len != numel {
            bail!("{op}: {len} values do not fill shape {} ({numel} elements)", shape_str(shape));
        }
        Ok(())
    }

    pub fn from_f32(gpu: &Gpu, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        Self::check_len("Tensor::from_f32", data.len(), shape)?;
        Self::upload_bytes(gpu, bytemuck::cast_slice(data), shape, DType::F32)
    }
    pub fn from_u32(gpu: &Gpu, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        Self::check_len("Tensor::from_u32", data.len(), shape)?;
        Self::upload_bytes(gpu, bytemuck::cast_slice(data), shape, DType::U32)
    }
    pub fn from_i32(gpu: &Gpu, data: &[i32], shape: &[usize]) -> Result<Tensor> {
        Self::check_len("Tensor::from_i32", data.len(), shape)?;
        Self::upload_bytes(gpu, bytemuck::cast_slice(data), shape, DType::I32)
    }
    /// Store f32 values as f16.
    pub fn from_f32_as_f16(gpu: &Gpu, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        Self::check_len("Tensor::from_f32_as_f16", data.len(), shape)?;
        let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        Self::upload_bytes(gpu, bytemuck::cast_slice(&h), shape, DType::F16)
    }
    /// A one-element f32 tensor.
    pub fn scalar(gpu: &Gpu, v: f32) -> Result<Tensor> {
        Self::from_f32(gpu, &[v], &[1])
    }

    pub fn gpu(&self) -> &Gpu {
        &self.buf.gpu
    }
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buf.buffer
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Size of the last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Product of all but the last dimension.
    pub fn rows(&self) -> usize {
        self.numel() / self.last_dim().max(1)
    }
    /// Whether two tensors share the same buffer.
    pub fn same_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
    }

    /// Zero-copy view with a new shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            bail!(
                "reshape: cannot view {} ({} elements) as {} ({n})",
                shape_str(&self.shape),
                self.numel(),
                shape_str(shape)
            );
        }
        Ok(Tensor { buf: self.buf.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }

    /// A new tensor with a copy of this one's contents.
    pub fn duplicate(&self) -> Result<Tensor> {
        let t = Tensor::empty(self.gpu(), &self.shape, self.dtype)?;
        t.copy_from(self)?;
        Ok(t)
    }

    /// Copy `src` into this tensor (same dtype and element count).
    pub fn copy_from(&self, src: &Tensor) -> Result<()> {
        if src.numel() != self.numel() || src.dtype != self.dtype {
            bail!(
                "copy_from: source {} {:?} does not match destination {} {:?}",
                shape_str(&src.shape),
                src.dtype,
                shape_str(&self.shape),
                self.dtype
            );
        }
        let bytes = ((self.numel() * self.dtype.size()) as u64).div_ceil(4) * 4;
        if bytes > 0 {
            self.gpu().with_encoder(|e| e.copy_buffer_to_buffer(src.buffer(), 0, self.buffer(), 0, bytes));
        }
        Ok(())
    }

    /// Overwrite contents from host data (ordered with pending GPU work).
    pub fn write_f32(&self, data: &[f32]) -> Result<()> {
        Self::check_len("Tensor::write_f32", data.len(), &self.shape)?;
        if self.dtype != DType::F32 {
            bail!("Tensor::write_f32 into a {:?} tensor", self.dtype);
        }
        let tmp = Tensor::from_f32(self.gpu(), data, &self.shape)?;
        self.copy_from(&tmp)
    }

    /// Read the raw bytes back (submits pending work and waits).
    pub fn read_bytes(&self) -> Result<Vec<u8>> {
        let gpu = self.gpu();
        gpu.check_alive("readback")?;
        let bytes = ((self.numel() * self.dtype.size()) as u64).div_ceil(4) * 4;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        gpu.with_encoder(|e| e.copy_buffer_to_buffer(self.buffer(), 0, &staging, 0, bytes));
        gpu.flush();
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.device().poll(wgpu::PollType::wait_indefinitely()).map_err(|e| anyhow!("waiting for readback: {e}"))?;
        gpu.check_alive("readback")?;
        rx.recv()
            .map_err(|_| anyhow!("readback: map callback never ran"))?
            .map_err(|e| anyhow!("readback: mapping failed: {e}"))?;
        let view = staging.slice(..).get_mapped_range().map_err(|e| anyhow!("readback: {e}"))?;
        let mut out = view.to_vec();
        drop(view);
        staging.unmap();
        out.truncate(self.numel() * self.dtype.size());
        Ok(out)
    }

    fn read_as<T: Pod>(&self, want: DType) -> Result<Vec<T>> {
        if self.dtype != want {
            bail!("reading a {:?} tensor {} as {want:?}", self.dtype, shape_str(&self.shape));
        }
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes()?))
    }

    /// Read back as f32 (f16 tensors are widened).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        if self.dtype == DType::F16 {
            let h: Vec<half::f16> = bytemuck::pod_collect_to_vec(&self.read_bytes()?);
            return Ok(h.into_iter().map(|x| x.to_f32()).collect());
        }
        self.read_as(DType::F32)
    }
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        self.read_as(DType::U32)
    }
    pub fn to_vec_i32(&self) -> Result<Vec<i32>> {
        self.read_as(DType::I32)
    }
    /// The single value of a one-element f32 tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            bail!("to_scalar on a tensor of shape {}", shape_str(&self.shape));
        }
        Ok(self.to_vec_f32()?[0])
    }
}

/// Shared argument checks for op launchers.
pub mod check {
    use super::*;

    /// Err unless every tensor is non-empty.
    pub fn nonempty(op: &str, ts: &[(&str, &Tensor)]) -> Result<()> {
        for (name, t) in ts {
            if t.numel() == 0 {
                bail!("{op}: {name} is empty (shape {})", shape_str(t.shape()));
            }
        }
        Ok(())
    }
    /// Err unless the tensor has the given dtype.
    pub fn dtype(op: &str, name: &str, t: &Tensor, want: DType) -> Result<()> {
        if t.dtype() != want {
            bail!("{op}: {name} has dtype {:?}, expected {want:?} (shape {})", t.dtype(), shape_str(t.shape()));
        }
        Ok(())
    }
    /// Err unless two tensors have identical shapes.
    pub fn same_shape(op: &str, a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<()> {
        if a.1.shape() != b.1.shape() {
            bail!(
                "{op}: {} has shape {} but {} has shape {}",
                a.0,
                shape_str(a.1.shape()),
                b.0,
                shape_str(b.1.shape())
            );
        }
        Ok(())
    }
    /// Err unless all tensors live on the same device.
    pub fn same_device(op: &str, ts: &[&Tensor]) -> Result<()> {
        if let Some(first) = ts.first() {
            for t in ts {
                if !Arc::ptr_eq(&t.gpu().inner, &first.gpu().inner) {
                    bail!("{op}: operands live on different devices");
                }
            }
        }
        Ok(())
    }
}
