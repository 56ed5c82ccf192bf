//! AdamW over a set of `Param`s, with optional global grad-norm clipping. The
//! whole update (norm, clip, per-tensor steps) is recorded without readback.

use std::rc::Rc;

use anyhow::Result;

use crate::autograd::Param;
use crate::gpu::{DType, Tensor};
use crate::ops::adamw::{grad_norm_sq, AdamW as AdamWKernel, Clip};

pub struct AdamW {
    pub hp: AdamWKernel,
    /// Clip the global gradient norm to this value (None: no clipping).
    pub max_grad_norm: Option<f32>,
    params: Vec<Rc<Param>>,
    /// First and second moments, one pair per parameter.
    state: Vec<(Tensor, Tensor)>,
    /// Steps taken (the next step is `t + 1`).
    pub t: u32,
}

impl AdamW {
    pub fn new(params: Vec<Rc<Param>>, hp: AdamWKernel, max_grad_norm: Option<f32>) -> Result<AdamW> {
        let state = params
            .iter()
            .map(|p| {
                let g = p.value.gpu();
                Ok((Tensor::zeros(g, p.value.shape(), DType::F32)?, Tensor::zeros(g, p.value.shape(), DType::F32)?))
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { hp, max_grad_norm, params, state, t: 0 })
    }

    pub fn params(&self) -> &[Rc<Param>] {
        &self.params
    }

    /// Set the learning rate for the next steps (schedules).
    pub fn set_lr(&mut self, lr: f32) {
        self.hp.lr = lr;
    }

    /// Apply one update from the accumulated gradients, then clear them.
    /// Parameters without a gradient (unused this step, or frozen) are skipped.
    /// Returns the [1] tensor of the squared global gradient norm when clipping
    /// (so callers can log it without forcing a readback now).
    pub fn step(&mut self) -> Result<Option<Tensor>> {
        self.t += 1;
        let grads: Vec<Option<Tensor>> = self.params.iter().map(|p| p.grad()).collect();
        let present: Vec<&Tensor> = grads.iter().flatten().collect();
        let norm_sq = match (self.max_grad_norm, present.is_empty()) {
            (Some(_), false) => Some(grad_norm_sq(&present)?),
            _ => None,
        };
        for ((p, g), (m, v)) in self.params.iter().zip(&grads).zip(&self.state) {
            let Some(g) = g else { continue };
            let clip = norm_sq.as_ref().map(|n| Clip { norm_sq: n, max_norm: self.max_grad_norm.unwrap() });
            self.hp.step(&p.value, g, m, v, self.t, clip)?;
            p.zero_grad();
        }
        Ok(norm_sq)
    }

    /// Moments, for checkpoints: (name, m, v) per parameter.
    pub fn state(&self) -> impl Iterator<Item = (&str, &Tensor, &Tensor)> {
        self.params.iter().zip(&self.state).map(|(p, (m, v))| (p.name.as_str(), m, v))
    }
}
