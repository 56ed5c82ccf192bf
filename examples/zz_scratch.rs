use std::time::Instant;
use genrec::gpu::{DType, Gpu, Kernel, Params, Tensor};
fn main() -> anyhow::Result<()> {
    let gpu = Gpu::shared()?;
    let (rows, cols) = (4096, 4096);
    let n = rows * cols;
    let x = Tensor::from_f32(&gpu, &vec![1.0; n], &[n])?;
    let y = Tensor::empty(&gpu, &[n], DType::F32)?;
    let time = |k: &Kernel, p: &Params, g: [u32; 3]| -> anyhow::Result<f64> {
        gpu.dispatch(k, p.bytes(), &[x.buffer(), y.buffer()], g)?;
        gpu.sync()?;
        let t0 = Instant::now();
        for _ in 0..4 { gpu.dispatch(k, p.bytes(), &[x.buffer(), y.buffer()], g)?; }
        gpu.sync()?;
        Ok(t0.elapsed().as_secs_f64() / 4.0)
    };
    let gb = |t: f64| 2.0 * (n * 4) as f64 / t / 1e9;
    let k = Kernel::new("copy", "elementwise", "copy");
    let t = time(&k, &Params::new().u(n / 4).f(1.0).f(0.0), [16384, 1, 1])?;
    println!("shader copy {:.1} ms {:.3} GB/s", t * 1e3, gb(t));
    let p = Params::new().u(rows).u(cols).u(0).f(f32::NEG_INFINITY);
    for (entry, wg, per, diag) in [("forward_cached", 128, 8, 0), ("forward_cached", 128, 8, 3), ("forward_cached", 256, 4, 3), ("forward_cached", 64, 16, 3), ("forward_cached", 128, 8, 2)] {
        let k = Kernel::new("softmax", "zz_scratch", entry).define("WG", format!("{wg}u")).define("ALIGNED", true).define("PER", format!("{per}u")).define("DIAG", format!("{diag}u"));
        println!("diag {diag}");
        let t = time(&k, &p, [rows as u32, 1, 1])?;
        println!("{entry} wg={wg} per={per}: {:.1} ms {:.3} GB/s", t * 1e3, gb(t));
    }
    let k = Kernel::new("copy", "elementwise", "copy");
    let t = time(&k, &Params::new().u(n / 4).f(1.0).f(0.0), [16384, 1, 1])?;
    println!("shader copy {:.1} ms {:.3} GB/s", t * 1e3, gb(t));
    Ok(())
}
