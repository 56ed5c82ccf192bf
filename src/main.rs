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
    /// List GPU adapters with their features and limits (best first).
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    }
    Ok(())
}
