//! Scratch micro-benchmarks for lavapipe kernel experiments (WGSL read at run time,
//! so a shader tweak needs no rebuild). Not part of the library.
//!
//! `cargo run --release --example mm_lab -- <experiment> <wgsl file> [args]`; experiments and
//! their shaders: tools/mm_lab/README.md.

use std::time::Instant;

use anyhow::{bail, Result};
use genrec::gpu::Gpu;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

enum B<'a> {
    Uniform(&'a wgpu::Buffer),
    Ro(&'a wgpu::Buffer),
    Rw(&'a wgpu::Buffer),
    Tex(&'a wgpu::TextureView),
    STex(&'a wgpu::TextureView),
}

struct Lab {
    gpu: Gpu,
}

impl Lab {
    fn buf(&self, data: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let b = self.gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: data.len() as u64,
            usage: usage | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.gpu.queue().write_buffer(&b, 0, data);
        b
    }
    fn read(&self, b: &wgpu::Buffer) -> Vec<f32> {
        let st = self.gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: b.size(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut e = self.gpu.device().create_command_encoder(&Default::default());
        e.copy_buffer_to_buffer(b, 0, &st, 0, b.size());
        self.gpu.queue().submit(Some(e.finish()));
        st.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        self.gpu.device().poll(wgpu::PollType::wait_indefinitely()).unwrap();
        let v = bytemuck::cast_slice(&st.slice(..).get_mapped_range().unwrap()).to_vec();
        v
    }
    fn tex(&self, w: u32, h: u32, format: wgpu::TextureFormat, data: &[u8]) -> wgpu::Texture {
        let t = self.gpu.device().create_texture(&wgpu::TextureDescriptor {
            label: None,
            size: wgpu::Extent3d { width: w, height: h, depth_or_array_layers: 1 },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING
                | wgpu::TextureUsages::COPY_DST
                | wgpu::TextureUsages::STORAGE_BINDING,
            view_formats: &[],
        });
        let bpp = format.block_copy_size(None).unwrap();
        self.gpu.queue().write_texture(
            t.as_image_copy(),
            data,
            wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some(w * bpp), rows_per_image: Some(h) },
            wgpu::Extent3d { width: w, height: h, depth_or_array_layers: 1 },
        );
        t
    }
    /// Time `iters` dispatches; returns (wall ms, cpu ms) per dispatch.
    fn time(&self, src: &str, entry: &str, binds: &[B], grid: [u32; 3], iters: usize) -> Result<(f64, f64)> {
        let dev = self.gpu.device();
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = unsafe {
            dev.create_shader_module_trusted(
                wgpu::ShaderModuleDescriptor { label: None, source: wgpu::ShaderSource::Wgsl(src.into()) },
                wgpu::ShaderRuntimeChecks::unchecked(),
            )
        };
        let entries: Vec<wgpu::BindGroupLayoutEntry> = binds
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match b {
                    B::Uniform(_) => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    B::Ro(_) => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: true },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    B::Rw(_) => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: false },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    B::STex(_) => wgpu::BindingType::StorageTexture {
                        access: wgpu::StorageTextureAccess::ReadOnly,
                        format: wgpu::TextureFormat::Rgba32Float,
                        view_dimension: wgpu::TextureViewDimension::D2,
                    },
                    B::Tex(_) => wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Float { filterable: false },
                        view_dimension: wgpu::TextureViewDimension::D2,
                        multisampled: false,
                    },
                },
                count: None,
            })
            .collect();
        let bgl = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: None, entries: &entries });
        let pl = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&bgl)],
            immediate_size: 0,
        });
        let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: Some(&pl),
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let bge: Vec<wgpu::BindGroupEntry> = binds
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: match b {
                    B::Uniform(b) | B::Ro(b) | B::Rw(b) => b.as_entire_binding(),
                    B::Tex(v) | B::STex(v) => wgpu::BindingResource::TextureView(v),
                },
            })
            .collect();
        let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &bgl, entries: &bge });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!("{e}");
        }
        let run = |n: usize| {
            let mut e = dev.create_command_encoder(&Default::default());
            for _ in 0..n {
                let mut p = e.begin_compute_pass(&Default::default());
                p.set_pipeline(&pipe);
                p.set_bind_group(0, &bg, &[]);
                p.dispatch_workgroups(grid[0], grid[1], grid[2]);
            }
            self.gpu.queue().submit(Some(e.finish()));
            dev.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        };
        run(1);
        let (t0, c0) = (Instant::now(), cpu_seconds());
        run(iters);
        Ok((t0.elapsed().as_secs_f64() * 1e3 / iters as f64, (cpu_seconds() - c0) * 1e3 / iters as f64))
    }
}

fn u32s(v: &[u32]) -> Vec<u8> {
    let mut x: Vec<u32> = v.to_vec();
    while x.len() < 4 || !x.len().is_multiple_of(4) {
        x.push(0);
    }
    bytemuck::cast_slice(&x).to_vec()
}

fn arg(args: &[String], i: usize, d: usize) -> usize {
    args.get(i).map(|s| s.parse().unwrap()).unwrap_or(d)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let lab = Lab { gpu: Gpu::shared()? };
    let exp = args[1].as_str();
    if exp == "api" {
        // api M K N iters: the library matmul on the texture and subgroup plans.
        use genrec::gpu::Tensor;
        use genrec::ops::matmul::{matmul_with_plan, MatmulOpts, Path, Plan};
        let (m, k, n, iters) = (arg(&args, 2, 1024), arg(&args, 3, 1024), arg(&args, 4, 1024), arg(&args, 5, 5));
        let gpu = &lab.gpu;
        let a = Tensor::from_f32(gpu, &vec![0.5; m * k], &[m, k])?;
        let b = Tensor::from_f32(gpu, &vec![0.25; k * n], &[k, n])?;
        let reg = Plan::with_path(Path::Register);
        for (name, plan) in
            [("texture", Plan { subgroup: true, texture: true, ..reg }), ("subgroup", Plan { subgroup: true, ..reg })]
        {
            let _ = matmul_with_plan(&a, &b, &MatmulOpts::default(), &plan)?.to_vec_f32()?;
            let (t0, c0) = (Instant::now(), cpu_seconds());
            for _ in 0..iters {
                let _ = matmul_with_plan(&a, &b, &MatmulOpts::default(), &plan)?;
            }
            gpu.sync()?;
            let (w, c) = (t0.elapsed().as_secs_f64() * 1e3 / iters as f64, (cpu_seconds() - c0) * 1e3 / iters as f64);
            let fl = 2.0 * (m * n * k) as f64;
            println!(
                "api {name} {m}x{k}x{n}: wall {w:.1} ms {:.2} GFLOP/s | cpu {c:.1} ms {:.2} GFLOP/cpu-s",
                fl / w / 1e6,
                fl / c / 1e6
            );
        }
        return Ok(());
    }
    let src = std::fs::read_to_string(&args[2])?; // see tools/mm_lab/README.md
    let entry = args[3].as_str();
    use wgpu::BufferUsages as U;
    match exp {
        // peak <file> <entry> iters invocations wg
        "peak" => {
            let (iters, inv, wg) = (arg(&args, 4, 512), arg(&args, 5, 65536), arg(&args, 6, 64));
            let groups = (inv / wg) as u32;
            let p = lab.buf(&u32s(&[iters as u32, inv as u32, groups]), U::UNIFORM);
            let out = lab.buf(&vec![0u8; inv * 4], U::STORAGE);
            let flops_per_step = arg(&args, 7, 24) as f64;
            let (w, c) = lab.time(&src, entry, &[B::Uniform(&p), B::Rw(&out)], [groups, 1, 1], 5)?;
            let fl = inv as f64 * iters as f64 * flops_per_step;
            println!(
                "peak {entry}: wall {w:.2} ms {:.1} GFLOP/s | cpu {c:.2} ms {:.1} GFLOP/cpu-s",
                fl / w / 1e6,
                fl / c / 1e6
            );
        }
        // reduce: 16M floats (4M vec4) via buffer (binding 1) and texture (binding 2, 2048x2048 rgba32f);
        // out: one f32 per invocation. Params {n4, cols(=2048), rows_per_inv, grid_x}
        "reduce" => {
            let n4 = 1usize << 22;
            let data: Vec<f32> = (0..n4 * 4).map(|i| (i % 7) as f32).collect();
            let bytes: &[u8] = bytemuck::cast_slice(&data);
            let src_b = lab.buf(bytes, U::STORAGE);
            let tex = lab.tex(2048, 2048, wgpu::TextureFormat::Rgba32Float, bytes);
            let view = tex.create_view(&Default::default());
            let wg = arg(&args, 4, 64);
            let inv = 2048usize; // one invocation per column
            let groups = (inv / wg) as u32;
            let p = lab.buf(&u32s(&[n4 as u32, 2048, 2048, groups]), U::UNIFORM);
            let out = lab.buf(&vec![0u8; inv * 4], U::STORAGE);
            let st = entry.contains("stex");
            let tb = if st { B::STex(&view) } else { B::Tex(&view) };
            let (w, c) = lab.time(&src, entry, &[B::Uniform(&p), B::Ro(&src_b), tb, B::Rw(&out)], [groups, 1, 1], 5)?;
            let s: f64 = lab.read(&out).iter().map(|&x| x as f64).sum();
            let want: f64 = data.iter().map(|&x| x as f64).sum();
            let gb = (n4 * 16) as f64;
            println!(
                "reduce {entry}: wall {w:.2} ms {:.2} GB/s | cpu {c:.2} ms {:.2} GB/cpu-s | sum {s} want {want}",
                gb / w / 1e6,
                gb / c / 1e6
            );
        }
        // mm: C[M,N] = A[M,K] @ B[K,N]; A, B as buffers (bindings 1, 2) and as rgba32f textures
        // (bindings 3, 4: A as [M, K/4] texels, B as [K, N/4] texels); C at binding 5.
        // Params {m, n, k, grid_x}. args: M K N tile_m tile_n wg
        "mm" => {
            let (m, k, n) = (arg(&args, 4, 1024), arg(&args, 5, 1024), arg(&args, 6, 1024));
            let (tm, tn, wg) = (arg(&args, 7, 32), arg(&args, 8, 32), arg(&args, 9, 8));
            let iters = arg(&args, 10, 3);
            let av: Vec<f32> = (0..m * k).map(|i| ((i * 7 + 3) % 13) as f32 * 0.1 - 0.6).collect();
            let bv: Vec<f32> = (0..k * n).map(|i| ((i * 5 + 1) % 11) as f32 * 0.1 - 0.5).collect();
            let a = lab.buf(bytemuck::cast_slice(&av), U::STORAGE);
            let b = lab.buf(bytemuck::cast_slice(&bv), U::STORAGE);
            let panel = arg(&args, 12, 0); // >0: B panel-packed with this many texels per strip, both linear W=1024
            let (at, bt) = if panel > 0 {
                let n4 = n / 4;
                let mut bp = vec![0f32; k * n];
                for s in 0..n4 / panel {
                    for kk in 0..k {
                        for t in 0..panel {
                            for c in 0..4 {
                                bp[((s * k + kk) * panel + t) * 4 + c] = bv[kk * n + (s * panel + t) * 4 + c];
                            }
                        }
                    }
                }
                let w = 1024usize;
                (
                    lab.tex(
                        w as u32,
                        (m * k / 4 / w) as u32,
                        wgpu::TextureFormat::Rgba32Float,
                        bytemuck::cast_slice(&av),
                    ),
                    lab.tex(
                        w as u32,
                        (k * n / 4 / w) as u32,
                        wgpu::TextureFormat::Rgba32Float,
                        bytemuck::cast_slice(&bp),
                    ),
                )
            } else {
                (
                    lab.tex((k / 4) as u32, m as u32, wgpu::TextureFormat::Rgba32Float, bytemuck::cast_slice(&av)),
                    lab.tex((n / 4) as u32, k as u32, wgpu::TextureFormat::Rgba32Float, bytemuck::cast_slice(&bv)),
                )
            };
            let (atv, btv) = (at.create_view(&Default::default()), bt.create_view(&Default::default()));
            let c = lab.buf(&vec![0u8; m * n * 4], U::STORAGE);
            let gx = n.div_ceil(tn) as u32;
            let gy = m.div_ceil(tm) as u32;
            let p = lab.buf(&u32s(&[m as u32, n as u32, k as u32, gx]), U::UNIFORM);
            let _ = wg;
            let swap = arg(&args, 11, 0) == 1;
            let grid = if swap { [gy, gx, 1] } else { [gx, gy, 1] };
            let (w, cp) = lab.time(
                &src,
                entry,
                &if std::env::var_os("LAB_STEX").is_some() {
                    [B::Uniform(&p), B::Ro(&a), B::Ro(&b), B::STex(&atv), B::STex(&btv), B::Rw(&c)]
                } else {
                    [B::Uniform(&p), B::Ro(&a), B::Ro(&b), B::Tex(&atv), B::Tex(&btv), B::Rw(&c)]
                },
                grid,
                iters,
            )?;
            let cv = lab.read(&c);
            // Spot-check some entries against f64.
            let mut maxerr = 0f64;
            for t in 0..64 {
                let (i, j) = ((t * 131 + 7) % m, (t * 257 + 3) % n);
                let r: f64 = (0..k).map(|q| av[i * k + q] as f64 * bv[q * n + j] as f64).sum();
                maxerr = maxerr.max((r - cv[i * n + j] as f64).abs());
            }
            let fl = 2.0 * (m * n * k) as f64;
            println!(
                "mm {entry} {m}x{k}x{n}: wall {w:.1} ms {:.2} GFLOP/s | cpu {cp:.1} ms {:.2} GFLOP/cpu-s | maxerr {maxerr:.2e}",
                fl / w / 1e6,
                fl / cp / 1e6
            );
        }
        // rows: x [rows, cols] -> y; entry "copy" (grid rows/16 x 1: 16 rows per workgroup of 64,
        // one vec4 per thread per row... shader decides) or row kernels (one workgroup per row).
        // Params {rows, cols, grid_x}; bindings x (1), w (2), y (3). args: rows cols groups_x groups_y
        "rows" => {
            let (rows, cols) = (arg(&args, 4, 4096), arg(&args, 5, 4096));
            let (gx, gy) = (arg(&args, 6, 4096) as u32, arg(&args, 7, 1) as u32);
            let xv: Vec<f32> = (0..rows * cols).map(|i| ((i * 7 + 3) % 13) as f32 * 0.1 - 0.6).collect();
            let wv: Vec<f32> = (0..cols).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
            let x = lab.buf(bytemuck::cast_slice(&xv), U::STORAGE);
            let wb = lab.buf(bytemuck::cast_slice(&wv), U::STORAGE);
            let y = lab.buf(&vec![0u8; rows * cols * 4], U::STORAGE);
            let p = lab.buf(&u32s(&[rows as u32, cols as u32, gx]), U::UNIFORM);
            let (w, c) = lab.time(&src, entry, &[B::Uniform(&p), B::Ro(&x), B::Ro(&wb), B::Rw(&y)], [gx, gy, 1], 5)?;
            let yv = lab.read(&y);
            // Check row 3 against RMSNorm (or copy).
            let r = 3;
            let xs = &xv[r * cols..(r + 1) * cols];
            let ms: f64 = xs.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / cols as f64;
            let rstd = 1.0 / (ms + 1e-6).sqrt();
            let mut err = 0f64;
            for j in 0..cols {
                let want = if entry.starts_with("copy") { xs[j] as f64 } else { xs[j] as f64 * rstd * wv[j] as f64 };
                err = err.max((want - yv[r * cols + j] as f64).abs());
            }
            let gb = (rows * cols * 8) as f64;
            println!(
                "rows {entry}: wall {w:.2} ms {:.2} GB/s | cpu {c:.2} ms {:.2} GB/cpu-s | err {err:.1e}",
                gb / w / 1e6,
                gb / c / 1e6
            );
        }
        _ => bail!("unknown experiment {exp}"),
    }
    Ok(())
}
