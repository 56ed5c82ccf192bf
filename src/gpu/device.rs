//! Adapter choice, device creation, and the per-device state every op shares:
//! the pending command encoder (one step = one submit), the uniform arena for
//! kernel parameters, the buffer pool and the pipeline cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};

use super::kernel::{Kernel, PipelineKey};
use super::pool::BufferPool;

/// A shareable handle to one GPU device. Cloning is cheap (an `Arc`).
#[derive(Clone)]
pub struct Gpu {
    pub(crate) inner: Arc<GpuInner>,
}

pub struct GpuInner {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    pub(crate) pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    pub(crate) pool: Mutex<BufferPool>,
    /// Idle rgba32float storage textures by (width, height) (see `Gpu::take_texture`).
    textures: Mutex<HashMap<(u32, u32), Vec<wgpu::Texture>>>,
    pub(crate) pending: Mutex<Pending>,
    /// Per-kernel timing (`GENREC_PROFILE`).
    pub(crate) profile: super::profile::Profile,
    lost: Arc<AtomicBool>,
    lost_reason: Arc<Mutex<String>>,
}

/// Work recorded but not yet submitted. Everything an op records goes here;
/// `Gpu::flush` submits it as one command buffer.
pub(crate) struct Pending {
    pub encoder: Option<wgpu::CommandEncoder>,
    /// Uniform arena: kernel parameter blocks, one aligned slot per dispatch.
    pub uniforms: wgpu::Buffer,
    pub uniform_offset: u64,
    /// Number of dispatches recorded since the last submit.
    pub dispatches: usize,
}

/// Size of the uniform arena. Each dispatch takes one slot of
/// `min_uniform_buffer_offset_alignment` (usually 256 bytes); when the arena is
/// full the pending work is submitted and the arena reused.
const UNIFORM_ARENA_BYTES: u64 = 1 << 20;
/// Largest parameter block a kernel may take.
pub const MAX_PARAM_BYTES: u64 = 256;

/// One resource bound to a kernel by [`Gpu::dispatch_with`].
#[derive(Clone, Copy)]
pub enum Binding<'a> {
    /// A storage (or uniform) buffer, bound whole.
    Buffer(&'a wgpu::Buffer),
    /// A texture view (sampled or storage texture, as the shader declares it).
    Texture(&'a wgpu::TextureView),
}

/// What `genrec devices` prints for each adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub features: Vec<String>,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_storage_buffers_per_shader_stage: u32,
}

/// Features genrec uses when the adapter offers them.
fn wanted_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
}

fn backends_from_env() -> Result<wgpu::Backends> {
    match std::env::var("GENREC_BACKEND") {
        Err(_) => Ok(wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12),
        Ok(s) => match s.to_ascii_lowercase().as_str() {
            "vulkan" => Ok(wgpu::Backends::VULKAN),
            "metal" => Ok(wgpu::Backends::METAL),
            "dx12" => Ok(wgpu::Backends::DX12),
            "gl" | "gles" => Ok(wgpu::Backends::GL),
            other => bail!("GENREC_BACKEND={other:?} is not one of vulkan, metal, dx12, gl"),
        },
    }
}

fn instance() -> Result<wgpu::Instance> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends_from_env()?;
    Ok(wgpu::Instance::new(desc))
}

/// Lower is better: discrete > integrated > virtual > other > CPU.
fn adapter_rank(info: &wgpu::AdapterInfo) -> u32 {
    match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

const NO_ADAPTER_HELP: &str = "no GPU adapter found (Vulkan/Metal/DX12). On a machine without a GPU, \
install Mesa's CPU Vulkan driver lavapipe: `apt-get install mesa-vulkan-drivers` (Debian/Ubuntu) \
or `dnf install mesa-vulkan-drivers` (Fedora). GENREC_BACKEND picks a backend, GENREC_ADAPTER a name.";

fn summarize(a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let limits = a.limits();
    let features = a.features();
    let names = [
        (wgpu::Features::SHADER_F16, "SHADER_F16"),
        (wgpu::Features::SUBGROUP, "SUBGROUP"),
        (wgpu::Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
        (wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES, "TIMESTAMP_QUERY_INSIDE_PASSES"),
        (wgpu::Features::SHADER_FLOAT32_ATOMIC, "SHADER_FLOAT32_ATOMIC"),
    ];
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info),
        features: names.iter().filter(|(f, _)| features.contains(*f)).map(|(_, n)| n.to_string()).collect(),
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
    }
}

/// All adapters the chosen backends offer, best first.
pub fn list_adapters() -> Result<Vec<AdapterSummary>> {
    let inst = instance()?;
    let mut adapters = pollster::block_on(inst.enumerate_adapters(backends_from_env()?));
    adapters.sort_by_key(|a| adapter_rank(&a.get_info()));
    Ok(adapters.iter().map(summarize).collect())
}

impl Gpu {
    /// Open the best adapter (see module docs for the ranking and overrides).
    pub fn new() -> Result<Gpu> {
        let inst = instance()?;
        let mut adapters = pollster::block_on(inst.enumerate_adapters(backends_from_env()?));
        if adapters.is_empty() {
            bail!(NO_ADAPTER_HELP);
        }
        adapters.sort_by_key(|a| adapter_rank(&a.get_info()));
        let adapter = match std::env::var("GENREC_ADAPTER") {
            Ok(want) => {
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                let want_l = want.to_lowercase();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&want_l))
                    .ok_or_else(|| anyhow!("GENREC_ADAPTER={want:?} matches none of the adapters {names:?}"))?
            }
            Err(_) => adapters.remove(0),
        };
        Self::from_adapter(adapter)
    }

    /// A process-wide device, opened on first use (tests and the CLI share it).
    pub fn shared() -> Result<Gpu> {
        static SHARED: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();
        SHARED.get_or_init(|| Gpu::new().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
    }

    fn from_adapter(adapter: wgpu::Adapter) -> Result<Gpu> {
        let info = adapter.get_info();
        let features = adapter.features() & wanted_features();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("genrec"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .with_context(|| format!("requesting a device from adapter {:?}", info.name))?;

        let lost = Arc::new(AtomicBool::new(false));
        let lost_reason = Arc::new(Mutex::new(String::new()));
        {
            let lost = lost.clone();
            let lost_reason = lost_reason.clone();
            device.set_device_lost_callback(move |reason, msg| {
                lost.store(true, Ordering::SeqCst);
                *lost_reason.lock().unwrap() = format!("{reason:?}: {msg}");
            });
        }
        // wgpu's default handler panics on an uncaptured error (e.g. work on a
        // destroyed device); record it instead and report it from the next op.
        {
            let lost = lost.clone();
            let lost_reason = lost_reason.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let msg = e.to_string();
                if msg.to_lowercase().contains("lost") || msg.to_lowercase().contains("destroyed") {
                    lost.store(true, Ordering::SeqCst);
                }
                let mut r = lost_reason.lock().unwrap();
                if r.is_empty() {
                    *r = format!("uncaptured GPU error: {msg}");
                }
            }));
        }
        let uniforms = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("uniform arena"),
            size: UNIFORM_ARENA_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Gpu {
            inner: Arc::new(GpuInner {
                device,
                queue,
                info,
                features,
                limits,
                pipelines: Mutex::new(HashMap::new()),
                pool: Mutex::new(BufferPool::default()),
                textures: Mutex::new(HashMap::new()),
                pending: Mutex::new(Pending { encoder: None, uniforms, uniform_offset: 0, dispatches: 0 }),
                profile: super::profile::Profile::from_env(),
                lost,
                lost_reason,
            }),
        })
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.inner.info
    }
    pub fn limits(&self) -> &wgpu::Limits {
        &self.inner.limits
    }
    pub fn has(&self, f: wgpu::Features) -> bool {
        self.inner.features.contains(f)
    }
    pub fn is_cpu(&self) -> bool {
        self.inner.info.device_type == wgpu::DeviceType::Cpu
    }
    /// One line naming the adapter, for benchmark tables.
    pub fn describe(&self) -> String {
        let i = &self.inner.info;
        format!("{} ({:?}, {:?}, {})", i.name, i.backend, i.device_type, i.driver_info)
    }

    /// Err if the device has been lost (driver reset, removal, out of memory).
    pub fn check_alive(&self, op: &str) -> Result<()> {
        if self.inner.lost.load(Ordering::SeqCst) {
            bail!("{op}: the GPU device was lost ({}); reopen it to continue", self.inner.lost_reason.lock().unwrap());
        }
        Ok(())
    }

    /// An rgba32float texture of `width` x `height` usable as a read and write storage
    /// texture, from the idle pool when one of that size is there. Its contents are
    /// unspecified (a kernel must write every texel it later reads). Give it back with
    /// [`Gpu::give_back_texture`] once its uses are recorded: later recorded work is
    /// ordered after them, as for recycled buffers. Pooling also spares wgpu's zero
    /// initialization of every fresh texture (a slow per-texel clear on lavapipe).
    pub fn take_texture(&self, width: u32, height: u32) -> wgpu::Texture {
        if let Some(t) = self.inner.textures.lock().unwrap().get_mut(&(width, height)).and_then(|v| v.pop()) {
            return t;
        }
        self.inner.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("storage texture"),
            size: wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Float,
            usage: wgpu::TextureUsages::STORAGE_BINDING,
            view_formats: &[],
        })
    }

    /// Return a texture from [`Gpu::take_texture`] to the idle pool.
    pub fn give_back_texture(&self, t: wgpu::Texture) {
        let key = (t.width(), t.height());
        self.inner.textures.lock().unwrap().entry(key).or_default().push(t);
    }

    /// Largest single storage binding, in bytes.
    pub fn max_binding_bytes(&self) -> u64 {
        self.inner.limits.max_storage_buffer_binding_size.min(self.inner.limits.max_buffer_size)
    }

    /// Run `f` with the pending encoder (created on demand).
    pub fn with_encoder<R>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> R) -> R {
        let mut p = self.inner.pending.lock().unwrap();
        let enc = p.encoder.get_or_insert_with(|| {
            self.inner.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") })
        });
        f(enc)
    }

    /// Submit all recorded work as one command buffer. Cheap when nothing is pending.
    pub fn flush(&self) {
        let mut p = self.inner.pending.lock().unwrap();
        Self::flush_locked(&self.inner, &mut p);
    }

    fn flush_locked(inner: &GpuInner, p: &mut Pending) {
        if let Some(enc) = p.encoder.take() {
            inner.queue.submit(Some(enc.finish()));
        }
        p.uniform_offset = 0;
        p.dispatches = 0;
    }

    /// Submit pending work and wait until the device is idle.
    pub fn sync(&self) -> Result<()> {
        self.flush();
        self.inner.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        self.check_alive("sync")
    }

    /// Record one compute dispatch of `kernel` into the pending encoder.
    ///
    /// `params` is the kernel's uniform block (binding 0, at most 256 bytes);
    /// `buffers` are bound in order at bindings 1, 2, ...; `workgroups` is the grid.
    pub fn dispatch(
        &self,
        kernel: &Kernel,
        params: &[u8],
        buffers: &[&wgpu::Buffer],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let bindings: Vec<Binding> = buffers.iter().map(|b| Binding::Buffer(b)).collect();
        self.dispatch_with(kernel, params, &bindings, workgroups)
    }

    /// [`Gpu::dispatch`] with texture bindings too: `bindings` are bound in order at
    /// bindings 1, 2, ... (the pipeline layout is derived from the shader).
    pub fn dispatch_with(
        &self,
        kernel: &Kernel,
        params: &[u8],
        bindings: &[Binding],
        workgroups: [u32; 3],
    ) -> Result<()> {
        self.check_alive(kernel.name)?;
        let max_wg = self.inner.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max_wg) {
            bail!(
                "{}: dispatch grid {:?} exceeds the adapter's {} workgroups per dimension",
                kernel.name,
                workgroups,
                max_wg
            );
        }
        if workgroups.contains(&0) {
            return Ok(()); // nothing to do (an empty tensor)
        }
        if params.len() as u64 > MAX_PARAM_BYTES {
            bail!("{}: parameter block of {} bytes > {MAX_PARAM_BYTES}", kernel.name, params.len());
        }
        let pipeline = self.pipeline(kernel)?;
        let align = self.inner.limits.min_uniform_buffer_offset_alignment as u64;
        let slot = MAX_PARAM_BYTES.max(align);
        let mut p = self.inner.pending.lock().unwrap();
        if p.uniform_offset + slot > UNIFORM_ARENA_BYTES {
            Self::flush_locked(&self.inner, &mut p);
        }
        let offset = p.uniform_offset;
        p.uniform_offset += slot;
        p.dispatches += 1;
        // Params must be at least 16 bytes for a uniform binding; pad with zeros.
        let mut block = [0u8; MAX_PARAM_BYTES as usize];
        block[..params.len()].copy_from_slice(params);
        let bound = (params.len().max(16) as u64).div_ceil(16) * 16;
        self.inner.queue.write_buffer(&p.uniforms, offset, &block[..bound as usize]);

        let mut entries = Vec::with_capacity(bindings.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &p.uniforms,
                offset,
                size: std::num::NonZeroU64::new(bound),
            }),
        });
        for (i, b) in bindings.iter().enumerate() {
            let resource = match b {
                Binding::Buffer(b) => b.as_entire_binding(),
                Binding::Texture(v) => wgpu::BindingResource::TextureView(v),
            };
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource });
        }
        let bind_group = self.inner.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.name),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let enc = p.encoder.get_or_insert_with(|| {
            self.inner.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") })
        });
        {
            let mut pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(kernel.name), timestamp_writes: None });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        if self.inner.profile.enabled {
            drop(p);
            let t = std::time::Instant::now();
            self.sync()?;
            self.inner.profile.add(format!("{}:{}", kernel.name, kernel.entry), t.elapsed());
        }
        Ok(())
    }

    /// The per-kernel timing table when `GENREC_PROFILE` is set (see `gpu::profile`).
    pub fn profile_report(&self) -> Option<String> {
        self.inner.profile.report()
    }

    /// Compile (once) and return the pipeline for `kernel`.
    pub fn pipeline(&self, kernel: &Kernel) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = kernel.key();
        if let Some(p) = self.inner.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let source = kernel.source()?;
        let scope = self.inner.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc =
            wgpu::ShaderModuleDescriptor { label: Some(kernel.name), source: wgpu::ShaderSource::Wgsl(source.into()) };
        let module = if kernel.trusted {
            // SAFETY: only kernels whose indexing is proven in-bounds by their tests
            // (Kernel::trusted) skip the runtime bounds checks.
            unsafe { self.inner.device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
        } else {
            self.inner.device.create_shader_module(desc)
        };
        let pipeline = self.inner.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.name),
            layout: None,
            module: &module,
            entry_point: Some(kernel.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            bail!("compiling kernel {} ({}): {err}", kernel.name, kernel.entry);
        }
        let pipeline = Arc::new(pipeline);
        self.inner.pipelines.lock().unwrap().insert(key, pipeline.clone());
        Ok(pipeline)
    }
}
