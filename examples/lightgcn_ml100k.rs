//! Train LightGCN on ml-100k (fetched if missing) and evaluate by full ranking
//! with training items masked. `cargo run --release --example lightgcn_ml100k -- [epochs] [seed]`

use genrec::cf::lightgcn::{LightGcn, LightGcnConfig};
use genrec::data::Split;
use genrec::eval::Protocol;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let epochs = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let seed = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(42);
    let gpu = genrec::gpu::Gpu::shared()?;
    let data = genrec::pipeline::prepared_ml100k()?;
    let model = LightGcn::new(&gpu, &data, LightGcnConfig { epochs, seed, ..Default::default() })?;
    let t = std::time::Instant::now();
    model.fit(|_, _| Ok(true))?;
    let secs = t.elapsed().as_secs_f64();
    let protocol = Protocol { exclude_history: true, ..Default::default() };
    let report = model.evaluate(&data.eval_cases(Split::Test), &protocol)?;
    println!("LightGCN ml-100k, {epochs} epochs, seed {seed}, {:.1} s/epoch", secs / epochs as f64);
    println!("{report}");
    Ok(())
}
