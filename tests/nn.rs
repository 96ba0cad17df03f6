//! The Keras-style API: each optimizer's update against a step computed by hand, each loss against
//! its formula and the finite-difference gradient check, dropout off in `evaluate`/`predict`,
//! reproducible `fit`, the `summary()` table, weights round-tripping through safetensors (and
//! mismatches named), and the data loaders' errors. Where Debian's `dataset-fashion-mnist` is
//! installed (CI installs it), one epoch on the real data must reach a loose accuracy bound.
#![allow(clippy::cloned_ref_to_slice_refs)]

use kiln::data::{fashion_mnist, idx};
use kiln::nn::*;
use kiln::prelude::*;
use kiln::testing::{verify_grad, GradCheck};

/// Two steps of `opt` on `p` (f32[2], starting at [1, -2]) with the loss `sum(c * p)`, so the
/// gradient is always `c = [0.5, -1.5]`.
fn two_steps(opt: Optimizer) -> Vec<Vec<f64>> {
    let g = Graph::new();
    let p = g.shared("p", array![1.0f32, -2.0]);
    let c = g.constant(array![0.5f32, -1.5]);
    let loss = (&p * &c).sum_all();
    let [gp] = g.grad(&loss, [&p]).unwrap();
    let updates = opt.updates(&g, &[p.clone()], &[gp]).unwrap();
    let mut step =
        g.function([], [&loss]).updates(updates.iter().map(|(a, b)| (a, b.clone()))).compile(Device::Cpu).unwrap();
    (0..2)
        .map(|_| {
            step.call(&[]).unwrap();
            p.value().unwrap().to_f64_vec()
        })
        .collect()
}

fn close(got: &[Vec<f64>], want: &[Vec<f64>]) {
    for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "got {got:?}, want {want:?}");
    }
}

#[test]
fn optimizers_match_hand_computed_steps() {
    let (p0, c) = ([1.0, -2.0], [0.5, -1.5]);
    let by_hand = |f: &mut dyn FnMut(usize, f64, &mut [f64; 4]) -> f64| -> Vec<Vec<f64>> {
        // state per coordinate: [p, s1, s2, unused]
        let mut st = [[p0[0], 0.0, 0.0, 0.0], [p0[1], 0.0, 0.0, 0.0]];
        (0..2).map(|t| (0..2).map(|i| f(t, c[i], &mut st[i])).collect()).collect()
    };
    // plain SGD
    close(
        &two_steps(Optimizer::sgd(0.1)),
        &by_hand(&mut |_, g, s| {
            s[0] -= 0.1 * g;
            s[0]
        }),
    );
    // momentum
    close(
        &two_steps(Optimizer::sgd_momentum(0.1, 0.9, false)),
        &by_hand(&mut |_, g, s| {
            s[1] = 0.9 * s[1] - 0.1 * g;
            s[0] += s[1];
            s[0]
        }),
    );
    // Nesterov
    close(
        &two_steps(Optimizer::sgd_momentum(0.1, 0.9, true)),
        &by_hand(&mut |_, g, s| {
            s[1] = 0.9 * s[1] - 0.1 * g;
            s[0] += 0.9 * s[1] - 0.1 * g;
            s[0]
        }),
    );
    // decay: lr / (1 + decay * t)
    let decayed = Optimizer::Sgd { learning_rate: 0.1, momentum: 0.0, nesterov: false, decay: 0.5 };
    close(
        &two_steps(decayed),
        &by_hand(&mut |t, g, s| {
            s[0] -= 0.1 / (1.0 + 0.5 * t as f64) * g;
            s[0]
        }),
    );
    // Adam
    close(
        &two_steps(Optimizer::adam(0.01)),
        &by_hand(&mut |t, g, s| {
            let t = (t + 1) as f64;
            s[1] = 0.9 * s[1] + 0.1 * g;
            s[2] = 0.999 * s[2] + 0.001 * g * g;
            let lr_t = 0.01 * (1.0 - 0.999f64.powf(t)).sqrt() / (1.0 - 0.9f64.powf(t));
            s[0] -= lr_t * s[1] / (s[2].sqrt() + 1e-7);
            s[0]
        }),
    );
    // RMSprop
    close(
        &two_steps(Optimizer::rmsprop(0.01)),
        &by_hand(&mut |_, g, s| {
            s[1] = 0.9 * s[1] + 0.1 * g * g;
            s[0] -= 0.01 * g / (s[1].sqrt() + 1e-7);
            s[0]
        }),
    );
    // Adagrad (accumulator starts at 0.1)
    close(
        &two_steps(Optimizer::adagrad(0.1)),
        &by_hand(&mut |t, g, s| {
            if t == 0 {
                s[1] = 0.1;
            }
            s[1] += g * g;
            s[0] -= 0.1 * g / (s[1].sqrt() + 1e-7);
            s[0]
        }),
    );
}

fn loss_value(loss: Loss, pred: Tensor, target: Tensor) -> f64 {
    let g = Graph::new();
    let p = g.input("p", pred.dtype(), pred.shape().iter().map(|&d| Dim::Fixed(d)).collect::<Vec<_>>());
    let t = g.input("t", target.dtype(), target.shape().iter().map(|&d| Dim::Fixed(d)).collect::<Vec<_>>());
    let mut f = g.function([&p, &t], [&loss.batch_mean(&p, &t)]).compile(Device::Cpu).unwrap();
    f.call1(&[pred, target]).unwrap().item().unwrap()
}

#[test]
fn losses_match_their_formulas() {
    let pred = array![[0.7f64, 0.2, 0.1], [0.1, 0.3, 0.6]];
    let onehot = array![[1.0f64, 0.0, 0.0], [0.0, 0.0, 1.0]];
    let cce = -((0.7f64).ln() + (0.6f64).ln()) / 2.0;
    assert!(
        (loss_value(Loss::CategoricalCrossentropy, pred.clone().into(), onehot.clone().into()) - cce).abs() < 1e-12
    );
    let sparse = loss_value(Loss::SparseCategoricalCrossentropy, pred.clone().into(), array![0i64, 2].into());
    assert!((sparse - cce).abs() < 1e-12);
    let bce: f64 =
        pred.iter().zip(onehot.iter()).map(|(p, t)| -(t * p.ln() + (1.0 - t) * (1.0 - p).ln())).sum::<f64>() / 6.0;
    assert!((loss_value(Loss::BinaryCrossentropy, pred.clone().into(), onehot.clone().into()) - bce).abs() < 1e-12);
    let mse: f64 = pred.iter().zip(onehot.iter()).map(|(p, t)| (p - t) * (p - t)).sum::<f64>() / 6.0;
    assert!((loss_value(Loss::MeanSquaredError, pred.into(), onehot.into()) - mse).abs() < 1e-12);
}

#[test]
fn losses_pass_the_gradient_check() {
    let logits = kiln::testing::random_tensor(&[4, 3], -2.0, 2.0, 1);
    let target = Tensor::from(array![[1.0f64, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]);
    let probs = Tensor::from(array![[0.9f64, 0.1, 0.4], [0.2, 0.7, 0.3], [0.5, 0.5, 0.8], [0.6, 0.1, 0.2]]);
    for loss in [Loss::CategoricalCrossentropy, Loss::BinaryCrossentropy, Loss::MeanSquaredError] {
        let t = target.clone();
        let f = move |g: &Graph, v: &[Var]| {
            let pred = match loss {
                Loss::CategoricalCrossentropy => v[0].softmax(-1),
                Loss::BinaryCrossentropy => v[0].sigmoid(),
                _ => v[0].clone(),
            };
            loss.batch_mean(&pred, &g.constant(t.clone()))
        };
        let err = verify_grad(f, &[logits.clone()], GradCheck::default()).unwrap();
        assert!(err < 1e-6, "{loss:?}: {err}");
    }
    let f = |g: &Graph, v: &[Var]| {
        Loss::SparseCategoricalCrossentropy.batch_mean(&v[0].softmax(-1), &g.constant(array![0i64, 1, 2, 0]))
    };
    assert!(verify_grad(f, &[logits.clone()], GradCheck::default()).unwrap() < 1e-6);
    let f = |g: &Graph, v: &[Var]| Loss::MeanSquaredError.batch_mean(&v[0], &g.constant(probs.clone()));
    assert!(verify_grad(f, &[logits], GradCheck::default()).unwrap() < 1e-6);
}

fn small_model(seed: u64, dropout: f64) -> Sequential {
    let mut m = Sequential::new().seed(seed);
    m.add(Dense::new(8).input_dim(4).activation(Activation::Relu).kernel_regularizer(Regularizer::L2(1e-3)));
    m.add(Dropout::new(dropout));
    m.add(Dense::new(3).activation(Activation::Softmax));
    m
}

fn blobs(n: usize) -> (Tensor, Tensor) {
    let mut r = kiln::testing::splitmix(5);
    let y: Vec<i64> = (0..n).map(|i| (i % 3) as i64).collect();
    let x =
        Array2::from_shape_fn((n, 4), |(i, j)| (y[i] as f64 * if j % 2 == 0 { 1.0 } else { -1.0 } + r() - 0.5) as f32);
    (x.into(), Array1::from(y).into())
}

#[test]
fn dropout_is_off_in_evaluate_and_predict() {
    let mut m = small_model(3, 0.9);
    m.compile(Loss::SparseCategoricalCrossentropy, Optimizer::sgd(0.1), &[Metric::Accuracy]).unwrap();
    let (x, y) = blobs(30);
    let a = m.predict(&x, 7).unwrap();
    assert_eq!(a, m.predict(&x, 30).unwrap(), "batching and repetition do not change predictions");
    // the same numbers by hand, with no dropout
    let w = m.weights();
    let v = |i: usize| w[i].1.value().unwrap().to_f64_vec();
    let (k1, b1, k2, b2) = (v(0), v(1), v(2), v(3));
    let xs = x.to_f64_vec();
    for row in 0..30 {
        let h: Vec<f64> =
            (0..8).map(|j| ((0..4).map(|i| xs[row * 4 + i] * k1[i * 8 + j]).sum::<f64>() + b1[j]).max(0.0)).collect();
        let z: Vec<f64> = (0..3).map(|j| (0..8).map(|i| h[i] * k2[i * 3 + j]).sum::<f64>() + b2[j]).collect();
        let e: Vec<f64> = z.iter().map(|v| v.exp()).collect();
        for j in 0..3 {
            let want = e[j] / e.iter().sum::<f64>();
            assert!((a.to_f64_vec()[row * 3 + j] - want).abs() < 1e-5);
        }
    }
    let s1 = m.evaluate(&x, &y, 8).unwrap();
    assert_eq!(s1, m.evaluate(&x, &y, 8).unwrap());
}

#[test]
fn fit_is_reproducible_and_learns() {
    let (x, y) = blobs(90);
    let run = || {
        let mut m = small_model(11, 0.2);
        m.compile(Loss::SparseCategoricalCrossentropy, Optimizer::adam(0.05), &[Metric::Accuracy]).unwrap();
        let h = m
            .fit(
                &x,
                &y,
                &Fit { epochs: 8, batch_size: 16, seed: 4, verbose: 0, validation_split: 0.2, ..Fit::default() },
            )
            .unwrap();
        let w: Vec<Tensor> = m.weights().iter().map(|(_, v)| v.value().unwrap()).collect();
        (h, w)
    };
    let (h1, w1) = run();
    let (h2, w2) = run();
    assert_eq!(h1.loss(), h2.loss());
    assert_eq!(w1, w2);
    assert!(h1.loss()[7] < h1.loss()[0] * 0.5, "{:?}", h1.loss());
    // the model is a graph: its training step prints, draws and shows its generated code
    let mut m = small_model(11, 0.2);
    assert!(m.debugprint().is_err(), "nothing to print before compile");
    m.compile(Loss::SparseCategoricalCrossentropy, Optimizer::adam(0.05), &[Metric::Accuracy]).unwrap();
    m.fit(&x, &y, &Fit { epochs: 1, verbose: 0, ..Fit::default() }).unwrap();
    assert!(m.debugprint().unwrap().contains("matmul") && m.to_dot().unwrap().starts_with("digraph"));
    assert!(m.generated_code().unwrap().contains("update of shared variable 'dense.kernel'"));
    // training accuracy is measured with dropout on; the held-out rows without it
    assert!(h1.epochs[7].val.as_ref().unwrap().get("accuracy").unwrap() > 0.9, "{:?}", h1.epochs[7]);
    assert_eq!(h1.val_loss().len(), 8);
}

#[test]
fn summary_table() {
    let mut m = Sequential::new().input_shape(&[28, 28]);
    m.add(Flatten);
    m.add(Dense::new(256).activation(Activation::Relu));
    m.add(Dropout::new(0.2));
    m.add(Dense::new(256).activation(Activation::Relu));
    m.add(Dense::new(10));
    m.add(Activation::Softmax);
    insta::assert_snapshot!(m.summary().unwrap());
    // a Dense directly on images is an error that says what to do
    let mut bad = Sequential::new().input_shape(&[28, 28]);
    bad.add(Dense::new(10));
    let err = bad.summary().unwrap_err().to_string();
    assert!(err.contains("layer 'dense'") && err.contains("Flatten"), "{err}");
    let mut none = Sequential::new();
    none.add(Dense::new(10));
    assert!(none.summary().unwrap_err().to_string().contains("input_dim"));
}

#[test]
fn weights_round_trip_and_mismatches_are_named() {
    let dir = std::env::temp_dir().join(format!("kiln-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    let mut a = small_model(1, 0.0);
    a.save_weights(&path).unwrap();
    let mut b = small_model(2, 0.0);
    b.load_weights(&path).unwrap();
    for ((n1, v1), (n2, v2)) in a.weights().iter().zip(b.weights().iter()) {
        assert_eq!(n1, n2);
        assert_eq!(v1.value().unwrap(), v2.value().unwrap(), "{n1}");
    }
    let mut other = Sequential::new();
    other.add(Dense::new(5).input_dim(4));
    other.add(Dense::new(3));
    let err = other.load_weights(&path).unwrap_err().to_string();
    assert!(err.contains("layer 'dense'") && err.contains("[4, 8]") && err.contains("[4, 5]"), "{err}");
    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(b.load_weights(&path).unwrap_err().to_string().contains("not a safetensors file"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_idx_and_missing_dataset_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("kiln-idx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad-idx3-ubyte");
    std::fs::write(&path, [0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28, 1, 2, 3]).unwrap();
    let err = idx::read_idx(&path).unwrap_err().to_string();
    assert!(err.contains("bad-idx3-ubyte") && err.contains("need 1568 bytes"), "{err}");
    let gz = dir.join("bad.gz");
    std::fs::write(&gz, b"this is not gzip").unwrap();
    assert!(idx::read_idx(&gz).unwrap_err().to_string().contains("bad.gz"));
    let good = idx::IdxArray { dims: vec![2, 3], data: vec![1, 2, 3, 4, 5, 6] };
    idx::write_idx(&dir.join("good.gz"), &good).unwrap();
    assert_eq!(idx::read_idx(&dir.join("good.gz")).unwrap(), good);
    let err = fashion_mnist::load(Some(&dir.join("nowhere"))).err().expect("missing").to_string();
    assert!(err.contains("nowhere") && err.contains("dataset-fashion-mnist"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shipped_subset_loads() {
    let d = fashion_mnist::load_from(&fashion_mnist::shipped_dir(), true).unwrap();
    assert_eq!((d.train_x.dim(), d.test_x.dim()), ((5000, 784), (1000, 784)));
    assert!(d.train_x.iter().all(|&p| (0.0..=1.0).contains(&p)));
    assert!(d.train_y.iter().all(|&l| (0..10).contains(&l)));
}

#[test]
fn one_epoch_on_the_real_fashion_mnist() {
    let dir = std::path::Path::new(fashion_mnist::SYSTEM_DIR);
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        kiln::testing::note(&format!(
            "skipped: the full Fashion-MNIST is not installed ({} is empty; apt-get install dataset-fashion-mnist)",
            dir.display()
        ));
        return;
    }
    let d = fashion_mnist::load(Some(dir)).unwrap();
    assert_eq!(d.train_x.nrows(), 60000);
    let mut m = Sequential::new().seed(1);
    m.add(Dense::new(256).input_dim(784).activation(Activation::Relu));
    m.add(Dense::new(256).activation(Activation::Relu));
    m.add(Dense::new(10).activation(Activation::Softmax));
    m.compile(Loss::SparseCategoricalCrossentropy, Optimizer::adam(0.001), &[Metric::Accuracy]).unwrap();
    let fit = Fit { epochs: 1, batch_size: 128, verbose: 0, ..Fit::default() };
    m.fit(&d.train_x.clone().into(), &d.train_y.clone().into(), &fit).unwrap();
    let s = m.evaluate(&d.test_x.clone().into(), &d.test_y.clone().into(), 1000).unwrap();
    assert!(s.get("accuracy").unwrap() > 0.8, "{s:?}");
}

#[test]
fn fit_on_the_gpu_where_there_is_one() {
    // The GPU, and the CUDA emulator (the same program on the CPU), each where it can run.
    let devices = kiln::testing::cuda_test_devices();
    let (x, y) = blobs(90);
    let on = |device| {
        let mut m = small_model(11, 0.2).device(device);
        m.compile(Loss::SparseCategoricalCrossentropy, Optimizer::adam(0.05), &[Metric::Accuracy]).unwrap();
        m.fit(&x, &y, &Fit { epochs: 4, batch_size: 16, seed: 4, verbose: 0, ..Fit::default() }).unwrap().loss()
    };
    let cpu = on(Device::Cpu);
    for device in devices {
        let gpu = on(device);
        for (a, b) in cpu.iter().zip(&gpu) {
            assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "cpu {cpu:?} {device:?} {gpu:?}");
        }
    }
}

#[test]
fn autotuned_fit_on_the_gpu_matches_the_cpu() {
    // Autotuning the training step (on one batch) trains nothing: its weights and dropout stream
    // are put back, so the fit after it is the CPU's fit.
    let (x, y) = blobs(90);
    let fit = Fit { epochs: 3, batch_size: 16, seed: 4, verbose: 0, ..Fit::default() };
    let mut cpu = small_model(11, 0.2);
    cpu.compile(Loss::SparseCategoricalCrossentropy, Optimizer::adam(0.05), &[Metric::Accuracy]).unwrap();
    let want = cpu.fit(&x, &y, &fit).unwrap().loss();
    for device in kiln::testing::cuda_test_devices() {
        let mut m = small_model(11, 0.2).device(device);
        m.compile(Loss::SparseCategoricalCrossentropy, Optimizer::adam(0.05), &[Metric::Accuracy]).unwrap();
        let (batch_x, batch_y) = blobs(16);
        let opts = kiln::AutotuneOptions { seconds_per_setting: 0.0, min_calls: 1, cache: false, ..Default::default() };
        let report = m.autotune(&batch_x, &batch_y, &opts).unwrap();
        assert!(report.outcome.timed >= 2, "{report}");
        let got = m.fit(&x, &y, &fit).unwrap().loss();
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "cpu {want:?} {device:?} {got:?}");
        }
    }
    let err = cpu.autotune(&x, &y, &kiln::AutotuneOptions::default()).unwrap_err().to_string();
    assert!(err.contains("Device::Cuda"), "{err}");
}

#[test]
fn history_plots_the_loss_curves_as_png() {
    let (x, y) = blobs(60);
    let mut m = small_model(2, 0.0);
    m.compile(Loss::SparseCategoricalCrossentropy, Optimizer::rmsprop(0.01), &[Metric::Accuracy]).unwrap();
    let h = m.fit(&x, &y, &Fit { epochs: 3, verbose: 0, validation_split: 0.25, ..Fit::default() }).unwrap();
    let path = std::env::temp_dir().join(format!("kiln-loss-{}.png", std::process::id()));
    match h.plot(&path) {
        Ok(()) => {
            let bytes = std::fs::read(&path).unwrap();
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000, "{} bytes", bytes.len());
            std::fs::remove_file(&path).unwrap();
        }
        // Only a missing font may stop the plot, and the error says which package to install.
        Err(e) => {
            assert!(e.to_string().contains("fonts-dejavu-core"), "{e}");
            kiln::testing::note(&format!("plot skipped: {e}"));
        }
    }
}
