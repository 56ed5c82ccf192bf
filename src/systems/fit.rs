//! What the generative systems' training loops share: the progress recorded in a run's
//! checkpoints (epochs done, best validation NDCG@10, per-epoch losses), so that an interrupted
//! `fit` resumes where it stopped, and the atomic checkpoint write itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

    /// Record validation NDCG@10 `v` taken after `epochs_done` epochs. A new best snapshots the
    /// trainable `params` (restored at the end of `fit`) and writes the run's `-best`
    /// checkpoint. Returns whether `v` improved on the best so far.
    pub fn record_validation(
        &mut self,
        v: f64,
        epochs_done: usize,
        params: &[Rc<Param>],
        step: u64,
        files: Option<&RunFiles>,
    ) -> Result<bool> {
        if v <= self.best.0 {
            return Ok(false);
        }
        self.best = (v, epochs_done);
        let snap = state::snapshot(params, None)?;
        if let Some(f) = files {
            self.save(f, &f.best, &snap, step, epochs_done)?;
        }
        self.best_state = Some(snap);
        Ok(true)
    }

    /// Write the run's `-last` checkpoint (trainable tensors, optimizer state, this progress)
    /// after `epochs_done` epochs.
    pub fn save_last(
        &self,
        epochs_done: usize,
        params: &[Rc<Param>],
        opt: &AdamW,
        files: Option<&RunFiles>,
    ) -> Result<()> {
        let Some(f) = files else { return Ok(()) };
        let snap = state::snapshot(params, Some(opt))?;
        self.save(f, &f.last, &snap, opt.t as u64, epochs_done)
    }

    fn save(
        &self,
        f: &RunFiles,
        path: &Path,
        tensors: &BTreeMap<String, HostTensor>,
        step: u64,
        epochs_done: usize,
    ) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let meta = CheckpointMeta {
            step,
            config: f.config.clone(),
            dataset_fingerprint: f.dataset_fp.to_string(),
            tokenizer_fingerprint: f.tokenizer_fp.to_string(),
            extra: serde_json::json!({
                "system": f.name, "epoch": epochs_done, "best_ndcg10": self.best.0, "best_epoch": self.best.1,
                "losses": self.losses,
            }),
        };
        checkpoint::save(path, tensors, &meta)
    }
}

/// A run's checkpoint files and what identifies the run inside them.
pub struct RunFiles<'a> {
    pub name: &'a str,
    /// Written after every epoch (with the optimizer state): what a resumed run starts from.
    pub last: PathBuf,
    /// Written at each new best validation score (trainable tensors only).
    pub best: PathBuf,
    pub config: &'a serde_json::Value,
    pub dataset_fp: &'a str,
    pub tokenizer_fp: &'a str,
}
