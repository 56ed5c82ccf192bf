//! A tiny MLP trained end to end with genrec's kernels, tape and AdamW on a
//! synthetic task must reach a loss threshold within a fixed number of steps.

use genrec::autograd::{cross_entropy, Tape};
use genrec::gpu::{Gpu, Tensor};
use genrec::nn::{optim::AdamW, Linear};
use genrec::ops::{adamw::AdamW as Hp, Act};
use rand::{Rng, SeedableRng};

/// Three interleaved spirals in 2-D: a classic task a linear model cannot solve.
fn spirals(n_per_class: usize, seed: u64) -> (Vec<f32>, Vec<i32>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for c in 0..3 {
        for i in 0..n_per_class {
            let r = i as f32 / n_per_class as f32;
            let t = c as f32 * 4.0 + r * 4.0 + rng.gen_range(-0.2..0.2);
            x.push(r * t.sin());
            x.push(r * t.cos());
            y.push(c);
        }
    }
    (x, y)
}

#[test]
fn mlp_learns_spirals() {
    let gpu = Gpu::shared().expect("a GPU adapter (lavapipe on CPU machines)");
    let (x, y) = spirals(100, 1);
    let n = y.len();
    let xs = Tensor::from_f32(&gpu, &x, &[n, 2]).unwrap();
    let ys = Tensor::from_i32(&gpu, &y, &[n]).unwrap();

    let l1 = Linear::new(&gpu, "l1", 2, 64, true, Act::Relu, 1).unwrap();
    let l2 = Linear::new(&gpu, "l2", 64, 64, true, Act::Relu, 2).unwrap();
    let l3 = Linear::new(&gpu, "l3", 64, 3, true, Act::None, 3).unwrap();
    let params = [l1.params(), l2.params(), l3.params()].concat();
    let mut opt =
        AdamW::new(params.clone(), Hp { lr: 1e-2, weight_decay: 0.0, ..Default::default() }, Some(5.0)).unwrap();

    let mut first = None;
    let mut last = f32::NAN;
    for step in 0..300 {
        let tape = Tape::new();
        let h = l1.forward(&tape, &tape.constant(xs.clone())).unwrap();
        let h = l2.forward(&tape, &h).unwrap();
        let logits = l3.forward(&tape, &h).unwrap();
        let loss = cross_entropy(&logits, &ys, &Default::default()).unwrap();
        tape.backward(&loss).unwrap();
        opt.step().unwrap();
        if step == 0 || step % 50 == 49 {
            last = loss.value.to_scalar().unwrap();
            first.get_or_insert(last);
        }
    }
    let first = first.unwrap();
    // Chance level is ln 3 = 1.10; a fitted MLP gets well under 0.3.
    assert!((first - 3f32.ln()).abs() < 0.3, "initial loss {first} should be near ln 3");
    assert!(last < 0.3, "loss after 300 steps {last} (started at {first})");

    // Accuracy on the training set, read back once.
    let tape = Tape::no_grad();
    let h = l1.forward(&tape, &tape.constant(xs.clone())).unwrap();
    let h = l2.forward(&tape, &h).unwrap();
    let logits = l3.forward(&tape, &h).unwrap().value.to_vec_f32().unwrap();
    let correct = (0..n)
        .filter(|&i| {
            let row = &logits[i * 3..i * 3 + 3];
            let arg = (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            arg as i32 == y[i]
        })
        .count();
    assert!(correct as f32 / n as f32 > 0.9, "train accuracy {correct}/{n}");
}
