//! A tape over GPU tensors.
//!
//! A `Tape` lives for one forward/backward pass. Ops on `Var`s compute their
//! forward result immediately (recording GPU work, not waiting for it) and,
//! when gradients are wanted, push a backward closure. `Tape::backward` walks
//! the closures in reverse and accumulates gradients into the `Param`s that
//! were used. Nothing is read back: the whole step stays one submission.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{bail, Result};

use crate::gpu::{shape_str, Tensor};
use crate::ops;

/// Given the gradient of a node's output, the gradients of its inputs
/// (by node id; `None` where an input needs none).
pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    /// Ids of the inputs, in the order the backward closure returns their grads.
    inputs: Vec<usize>,
    backward: Option<BackwardFn>,
    /// Set for leaves that are trainable parameters.
    param: Option<Rc<Param>>,
}

struct TapeInner {
    nodes: Vec<Node>,
}

/// One forward/backward pass. Cheap to clone (shared).
#[derive(Clone)]
pub struct Tape {
    inner: Rc<RefCell<TapeInner>>,
    grad_enabled: Rc<Cell<bool>>,
}

/// A value on a tape. `id` is `None` for values no gradient flows to.
#[derive(Clone)]
pub struct Var {
    pub value: Tensor,
    pub(crate) id: Option<usize>,
    pub(crate) tape: Tape,
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var({:?}, grad: {})", self.value, self.id.is_some())
    }
}

/// A trainable tensor with a persistent gradient slot.
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub grad: RefCell<Option<Tensor>>,
    /// Frozen parameters take part in the forward pass but get no gradient.
    pub frozen: Cell<bool>,
}

impl Param {
    pub fn new(name: impl Into<String>, value: Tensor) -> Rc<Param> {
        Rc::new(Param { name: name.into(), value, grad: RefCell::new(None), frozen: Cell::new(false) })
    }
    /// Drop the accumulated gradient.
    pub fn zero_grad(&self) {
        *self.grad.borrow_mut() = None;
    }
    /// The accumulated gradient, if any.
    pub fn grad(&self) -> Option<Tensor> {
        self.grad.borrow().clone()
    }
}

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}

impl Tape {
    pub fn new() -> Tape {
        Tape { inner: Rc::new(RefCell::new(TapeInner { nodes: Vec::new() })), grad_enabled: Rc::new(Cell::new(true)) }
    }

    /// A tape that records nothing (inference): every op skips its backward.
    pub fn no_grad() -> Tape {
        let t = Tape::new();
        t.grad_enabled.set(false);
        t
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled.get()
    }

    /// A constant input (no gradient).
    pub fn constant(&self, value: Tensor) -> Var {
        Var { value, id: None, tape: self.clone() }
    }

    /// An input whose gradient is wanted (returned by `backward`), not a parameter.
    pub fn input(&self, value: Tensor) -> Var {
        if !self.grad_enabled() {
            return self.constant(value);
        }
        let id = self.push(Node { inputs: vec![], backward: None, param: None });
        Var { value, id: Some(id), tape: self.clone() }
    }

    /// Use a parameter on this tape; its gradient accumulates into `p.grad`.
    pub fn param(&self, p: &Rc<Param>) -> Var {
        if !self.grad_enabled() || p.frozen.get() {
            return self.constant(p.value.clone());
        }
        let id = self.push(Node { inputs: vec![], backward: None, param: Some(p.clone()) });
        Var { value: p.value.clone(), id: Some(id), tape: self.clone() }
    }

    fn push(&self, node: Node) -> usize {
        let mut inner = self.inner.borrow_mut();
        inner.nodes.push(node);
        inner.nodes.len() - 1
    }

    /// Record an op result. `inputs` are the op's inputs; `backward` maps the
    /// output gradient to one gradient per input (same order). The closure is
    /// only kept when some input needs a gradient.
    pub fn record(
        &self,
        value: Tensor,
        inputs: &[&Var],
        backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    ) -> Var {
        let needs = self.grad_enabled() && inputs.iter().any(|v| v.id.is_some());
        if !needs {
            return self.constant(value);
        }
        let ids: Vec<usize> = inputs.iter().map(|v| v.id.unwrap_or(usize::MAX)).collect();
        let id = self.push(Node { inputs: ids, backward: Some(Box::new(backward)), param: None });
        Var { value, id: Some(id), tape: self.clone() }
    }

    /// Back-propagate from a scalar `loss` (d loss / d loss = 1). Gradients of
    /// parameters are accumulated into their `grad` slots; gradients of
    /// `Tape::input` values are returned by node id (see `Var::grad_in`).
    pub fn backward(&self, loss: &Var) -> Result<Gradients> {
        if loss.value.numel() != 1 {
            bail!("backward: loss must be a single value, got shape {}", shape_str(loss.value.shape()));
        }
        let seed = Tensor::from_f32(loss.value.gpu(), &[1.0], loss.value.shape())?;
        self.backward_with(loss, seed)
    }

    /// Back-propagate from any `out` with a given output gradient.
    pub fn backward_with(&self, out: &Var, grad_out: Tensor) -> Result<Gradients> {
        let Some(out_id) = out.id else {
            bail!("backward: the output does not depend on any parameter or input with a gradient");
        };
        let mut grads: HashMap<usize, Tensor> = HashMap::new();
        grads.insert(out_id, grad_out);
        let mut inner = self.inner.borrow_mut();
        for id in (0..=out_id).rev() {
            let Some(g) = grads.remove(&id) else { continue };
            let node = &mut inner.nodes[id];
            if let Some(p) = &node.param {
                // Out of place: gradient tensors may be shared between nodes
                // (an add passes the same gradient to both operands).
                let mut slot = p.grad.borrow_mut();
                let sum = match slot.as_ref() {
                    None => g,
                    Some(acc) => ops::elementwise::add(acc, &g)?,
                };
                *slot = Some(sum);
                continue;
            }
            let Some(bw) = node.backward.take() else {
                // A Tape::input leaf: keep its gradient for the caller.
                grads.insert(id, g);
                if node.inputs.is_empty() {
                    continue;
                }
                bail!("backward: node {id} was already back-propagated (call backward once per tape)");
            };
            let inputs = node.inputs.clone();
            let in_grads = bw(&g)?;
            if in_grads.len() != inputs.len() {
                bail!("backward: op returned {} gradients for {} inputs", in_grads.len(), inputs.len());
            }
            for (input, ig) in inputs.into_iter().zip(in_grads) {
                let (Some(ig), true) = (ig, input != usize::MAX) else {
                    continue;
                };
                match grads.get(&input) {
                    None => {
                        grads.insert(input, ig);
                    }
                    Some(acc) => {
                        // Gradients may be views of op outputs that are still used:
                        // accumulate into a fresh tensor, never in place.
                        let sum = ops::elementwise::add(acc, &ig)?;
                        grads.insert(input, sum);
                    }
                }
            }
        }
        Ok(Gradients { grads })
    }
}

/// Gradients of `Tape::input` leaves after a backward pass.
pub struct Gradients {
    grads: HashMap<usize, Tensor>,
}

impl Gradients {
    /// The gradient of an input created by `Tape::input` (None if it got none).
    pub fn of(&self, v: &Var) -> Option<&Tensor> {
        v.id.and_then(|id| self.grads.get(&id))
    }
}

impl Var {
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    pub fn tape(&self) -> &Tape {
        &self.tape
    }
    pub fn requires_grad(&self) -> bool {
        self.id.is_some()
    }
}
