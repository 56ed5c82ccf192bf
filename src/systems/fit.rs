//! What the generative systems' training loops share: the progress recorded in a run's
//! checkpoints (epochs done, best validation NDCG@10, per-epoch losses), so that an interrupted
//! `fit` resumes where it stopped, and the atomic checkpoint write itself.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result};

use crate::autograd::Param;
use crate::io::checkpoint::{self, CheckpointMeta, Expect};
use crate::io::HostTensor;
use crate::nn::optim::AdamW;
use crate::nn::state;

/// Where a `fit` stands.
pub struct Progress {
    /// Epochs completed.
    pub epoch: usize,
    /// Best validation NDCG@10 so far and the epoch (1-based) it was reached after.
    pub best: (f64, usize),
    /// Mean training loss of each completed epoch.
    pub losses: Vec<f32>,
    /// The trainable tensors of the best epoch (from the `-best` checkpoint on resume).
    pub best_state: Option<BTreeMap<String, HostTensor>>,
}

impl Progress {
    /// Nothing trained yet.
    pub fn fresh() -> Progress {
        Progress { epoch: 0, best: (f64::MIN, 0), losses: Vec::new(), best_state: None }
    }

    /// Restore `params` and `opt` from the `last` checkpoint when it belongs to this run
    /// (`expect`: same data, identifiers and configuration); a checkpoint of another run is
    /// not resumed: say why and start over. `best_path` is the run's `-best` checkpoint.
    pub fn resume(
        name: &str,
        last: &Path,
        best_path: &Path,
        expect: &Expect,
        params: &[Rc<Param>],
        opt: &mut AdamW,
    ) -> Result<Progress> {
        let ck = match checkpoint::load(last, expect) {
            Err(e) => {
                eprintln!("{name}: not resuming from {}: {e:#}; training from scratch", last.display());
                return Ok(Progress::fresh());
            }
            Ok(ck) => ck,
        };
        state::restore(&last.display().to_string(), params, Some(opt), &ck.tensors, ck.meta.step as u32)?;
        let x = &ck.meta.extra;
        let mut p = Progress {
            epoch: x["epoch"].as_u64().unwrap_or(0) as usize,
            best: (x["best_ndcg10"].as_f64().unwrap_or(f64::MIN), x["best_epoch"].as_u64().unwrap_or(0) as usize),
            losses: serde_json::from_value(x["losses"].clone()).unwrap_or_default(),
            best_state: None,
        };
        if best_path.exists() {
            p.best_state = Some(checkpoint::load(best_path, &Expect::default())?.tensors);
        }
        eprintln!("{name}: resumed from {} after epoch {}", last.display(), p.epoch);
        Ok(p)
    }

    /// Write `tensors` (trainable tensors + optimizer state) and this progress, as of `epoch`
    /// completed epochs, to `path` atomically.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &self,
        name: &str,
        path: &Path,
        tensors: &BTreeMap<String, HostTensor>,
        step: u64,
        epoch: usize,
        config: &serde_json::Value,
        dataset_fp: &str,
        tokenizer_fp: &str,
    ) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let meta = CheckpointMeta {
            step,
            config: config.clone(),
            dataset_fingerprint: dataset_fp.to_string(),
            tokenizer_fingerprint: tokenizer_fp.to_string(),
            extra: serde_json::json!({
                "system": name, "epoch": epoch, "best_ndcg10": self.best.0, "best_epoch": self.best.1,
                "losses": self.losses,
            }),
        };
        checkpoint::save(path, tensors, &meta)
    }
}
