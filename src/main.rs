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
    }
    Ok(())
}
