//! The GPU core: device choice, tensors, buffer pool, pipeline cache and
//! step recording. Knows nothing about models.
//!
//! Ops record dispatches into one pending command encoder (`Gpu::dispatch`);
//! nothing is submitted until a readback, `Gpu::flush` or `Gpu::sync`, so a
//! whole training step becomes one submission.

pub mod device;
pub mod kernel;
pub mod pool;
mod profile;
pub mod tensor;

pub use device::{list_adapters, AdapterSummary, Binding, Gpu};
pub use kernel::{div_ceil, Kernel};
pub use tensor::{check, shape_str, DType, Tensor};

/// Pack a kernel parameter block: a sequence of u32/i32/f32 words.
#[derive(Default, Clone)]
pub struct Params(Vec<u32>);

impl Params {
    pub fn new() -> Params {
        Params(Vec::new())
    }
    pub fn u(mut self, v: usize) -> Params {
        self.0.push(u32::try_from(v).expect("kernel parameter exceeds u32"));
        self
    }
    pub fn i(mut self, v: i32) -> Params {
        self.0.push(v as u32);
        self
    }
    pub fn f(mut self, v: f32) -> Params {
        self.0.push(v.to_bits());
        self
    }
    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_readback_roundtrip_and_reshape() {
        let gpu = Gpu::shared().unwrap();
        let data: Vec<f32> = (0..257).map(|i| i as f32 * 0.5 - 3.0).collect();
        let t = Tensor::from_f32(&gpu, &data, &[257]).unwrap();
        assert_eq!(t.to_vec_f32().unwrap(), data);
        let v = t.reshape(&[1, 257]).unwrap();
        assert!(v.same_buffer(&t));
        assert!(t.reshape(&[2, 128]).is_err());
        let h = Tensor::from_f32_as_f16(&gpu, &[1.0, -2.5, 0.125], &[3]).unwrap();
        assert_eq!(h.to_vec_f32().unwrap(), vec![1.0, -2.5, 0.125]);
        let z = Tensor::zeros(&gpu, &[7, 3], DType::F32).unwrap();
        assert_eq!(z.to_vec_f32().unwrap(), vec![0.0; 21]);
        assert!(Tensor::from_f32(&gpu, &[1.0, 2.0], &[3]).is_err());
    }

    #[test]
    fn recycled_buffer_upload_is_ordered_after_earlier_reads() {
        // A copy reads buffer A, A is freed and recycled for an upload, all in one
        // pending encoder: the copy must still see A's old contents.
        let gpu = Gpu::shared().unwrap();
        let a = Tensor::from_f32(&gpu, &[1.0; 64], &[64]).unwrap();
        let b = Tensor::empty(&gpu, &[64], DType::F32).unwrap();
        b.copy_from(&a).unwrap();
        drop(a);
        let c = Tensor::from_f32(&gpu, &[2.0; 64], &[64]).unwrap();
        assert_eq!(b.to_vec_f32().unwrap(), vec![1.0; 64]);
        assert_eq!(c.to_vec_f32().unwrap(), vec![2.0; 64]);
    }

    #[test]
    fn lost_device_gives_errors_not_panics() {
        // A private device (not the shared one), destroyed to simulate a loss.
        let gpu = Gpu::new().unwrap();
        let t = Tensor::from_f32(&gpu, &[1.0; 8], &[8]).unwrap();
        gpu.device().destroy();
        let _ = gpu.device().poll(wgpu::PollType::wait_indefinitely());
        let e = Tensor::zeros(&gpu, &[4], DType::F32).unwrap_err().to_string();
        assert!(e.contains("lost"), "{e}");
        let e = t.to_vec_f32().unwrap_err().to_string();
        assert!(e.contains("lost"), "{e}");
    }

    #[test]
    fn oversized_tensor_is_an_error_not_a_panic() {
        let gpu = Gpu::shared().unwrap();
        let n = gpu.max_binding_bytes() as usize / 4 + 1;
        let e = Tensor::empty(&gpu, &[n], DType::F32).unwrap_err().to_string();
        assert!(e.contains("binding limit"), "{e}");
    }
}
