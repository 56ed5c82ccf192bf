//! Training state as named host tensors, for checkpoints: every parameter
//! under its own name, and AdamW's moments as `adamw.m.<name>` /
//! `adamw.v.<name>`. `restore` checks names and shapes and names the
//! offending tensor in every error.

use std::collections::BTreeMap;
use std::rc::Rc;

use anyhow::{bail, Result};

use super::optim::AdamW;
use crate::autograd::Param;
use crate::io::HostTensor;

fn host(t: &crate::gpu::Tensor) -> Result<HostTensor> {
    HostTensor::new(t.shape(), t.to_vec_f32()?)
}

/// Parameters (and, when given, the optimizer's moments) read back to the host.
pub fn snapshot(params: &[Rc<Param>], opt: Option<&AdamW>) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    for p in params {
        if out.insert(p.name.clone(), host(&p.value)?).is_some() {
            bail!("snapshot: two parameters are named {:?}", p.name);
        }
    }
    if let Some(opt) = opt {
        for (name, m, v) in opt.state() {
            out.insert(format!("adamw.m.{name}"), host(m)?);
            out.insert(format!("adamw.v.{name}"), host(v)?);
        }
    }
    Ok(out)
}

fn write(what: &str, name: &str, dst: &crate::gpu::Tensor, src: Option<&HostTensor>) -> Result<()> {
    match src {
        None => bail!("{what}: tensor {name:?} is missing"),
        Some(h) if h.shape != dst.shape() => {
            bail!("{what}: tensor {name:?} has shape {:?}, the model expects {:?}", h.shape, dst.shape())
        }
        Some(h) => dst.write_f32(&h.data),
    }
}

/// Writes a snapshot back into `params` (and `opt`'s moments, with its step
/// counter set to `step`). Extra tensors in `state` are an error too, so a
/// checkpoint of a different model is never half-loaded silently; without
/// `opt`, the optimizer's `adamw.*` tensors are ignored (weights only).
pub fn restore(
    what: &str,
    params: &[Rc<Param>],
    opt: Option<&mut AdamW>,
    state: &BTreeMap<String, HostTensor>,
    step: u32,
) -> Result<()> {
    let mut expected: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
    if let Some(o) = &opt {
        for (name, _, _) in o.state() {
            expected.push(format!("adamw.m.{name}"));
            expected.push(format!("adamw.v.{name}"));
        }
    }
    let weights_only = opt.is_none();
    let extra: Vec<&String> =
        state.keys().filter(|k| !expected.contains(k) && !(weights_only && k.starts_with("adamw."))).collect();
    if !extra.is_empty() {
        bail!("{what}: unexpected tensors {extra:?} (not part of this model)");
    }
    for p in params {
        write(what, &p.name, &p.value, state.get(&p.name))?;
    }
    if let Some(o) = opt {
        for (name, m, v) in o.state() {
            write(what, &format!("adamw.m.{name}"), m, state.get(&format!("adamw.m.{name}")))?;
            write(what, &format!("adamw.v.{name}"), v, state.get(&format!("adamw.v.{name}")))?;
        }
        o.t = step;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{Gpu, Tensor};
    use crate::ops::adamw::AdamW as Hp;

    #[test]
    fn snapshot_restore_round_trip_and_errors() {
        let gpu = Gpu::shared().unwrap();
        let a = Param::new("a", Tensor::from_f32(&gpu, &[1.0, 2.0, 3.0], &[3]).unwrap());
        let b = Param::new("b", Tensor::from_f32(&gpu, &[4.0, 5.0], &[1, 2]).unwrap());
        let params = vec![a.clone(), b.clone()];
        let mut opt = AdamW::new(params.clone(), Hp::default(), None).unwrap();
        *a.grad.borrow_mut() = Some(Tensor::from_f32(&gpu, &[1.0, -1.0, 0.5], &[3]).unwrap());
        opt.step().unwrap();
        let snap = snapshot(&params, Some(&opt)).unwrap();
        assert_eq!(snap.len(), 6);
        let a_after = a.value.to_vec_f32().unwrap();
        let m_after = snap["adamw.m.a"].data.clone();
        assert!(m_after.iter().any(|&x| x != 0.0));

        // Clobber, then restore.
        a.value.write_f32(&[0.0; 3]).unwrap();
        let mut opt2 = AdamW::new(params.clone(), Hp::default(), None).unwrap();
        restore("test", &params, Some(&mut opt2), &snap, opt.t).unwrap();
        assert_eq!(a.value.to_vec_f32().unwrap(), a_after);
        assert_eq!(opt2.t, 1);
        assert_eq!(opt2.state().next().unwrap().1.to_vec_f32().unwrap(), m_after);

        let mut bad = snap.clone();
        bad.insert("b".into(), HostTensor::new(&[2], vec![0.0, 0.0]).unwrap());
        let e = restore("ckpt.safetensors", &params, None, &bad, 0).unwrap_err().to_string();
        assert!(e.contains("\"b\"") && e.contains("[1, 2]"), "{e}");
        let mut missing = snap.clone();
        missing.remove("a");
        assert!(restore("x", &params, Some(&mut opt2), &missing, 0).unwrap_err().to_string().contains("missing"));
        let e = restore("x", &params[..1], None, &snap, 0).unwrap_err().to_string();
        assert!(e.contains("unexpected"), "{e}");
    }
}
