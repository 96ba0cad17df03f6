//! The main example: a 784-256-256-10 ReLU MLP on Fashion-MNIST with kiln's Keras-style API.
//! Uses the full data set where it is installed (`--data-dir`, `$KILN_DATA`, or Debian's package
//! `dataset-fashion-mnist`), else the 5,000-image subset shipped in `data/`. Prints the model, the
//! progress of every epoch, the test accuracy and the time per epoch; writes the loss curve as a PNG
//! and saves the weights (safetensors).
//!
//! `cargo run --release --example fashion_mnist_mlp -- [--device cpu|cuda] [--epochs N]
//!  [--data-dir DIR] [--optimizer adam|sgd] [--out DIR] [--autotune]` (`--autotune`, on a CUDA
//! device: the training step is autotuned on one batch before training, `Sequential::autotune`).

use clap::Parser;
use kiln::data::fashion_mnist;
use kiln::nn::*;
use kiln::{Device, Tensor};
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// cpu, reference, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Epochs (default: 10 on the full set, 15 on the shipped subset).
    #[arg(long)]
    epochs: Option<usize>,
    /// A folder holding the four Fashion-MNIST .gz files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// adam, or sgd (with momentum 0.9)
    #[arg(long, default_value = "adam")]
    optimizer: String,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Where the loss curve and the weights go.
    #[arg(long, default_value = "target/fashion_mnist_mlp")]
    out: PathBuf,
    /// Autotune the training step on its CUDA device before training (the report is printed).
    #[arg(long)]
    autotune: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = Device::parse(&args.device)?;
    let data = fashion_mnist::load(args.data_dir.as_deref())?;
    let what = if data.is_subset { "the shipped subset" } else { "the full set" };
    println!(
        "Fashion-MNIST from {} ({what}): {} training and {} test images",
        data.source.display(),
        data.train_x.nrows(),
        data.test_x.nrows()
    );
    let epochs = args.epochs.unwrap_or(if data.is_subset { 15 } else { 10 });
    let optimizer = match args.optimizer.as_str() {
        "adam" => Optimizer::adam(0.001),
        "sgd" => Optimizer::sgd_momentum(0.05, 0.9, false),
        other => return Err(format!("--optimizer adam|sgd, got {other}").into()),
    };

    let mut model = Sequential::new().seed(1).device(device);
    model.add(Dense::new(256).input_dim(784).activation(Activation::Relu));
    model.add(Dense::new(256).activation(Activation::Relu));
    model.add(Dense::new(10).activation(Activation::Softmax));
    print!("{}", model.summary()?);
    let t = std::time::Instant::now();
    model.compile(Loss::SparseCategoricalCrossentropy, optimizer, &[Metric::Accuracy])?;
    println!("compiled for {device:?} in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);

    let (x, y): (Tensor, Tensor) = (data.train_x.clone().into(), data.train_y.clone().into());
    let (tx, ty): (Tensor, Tensor) = (data.test_x.clone().into(), data.test_y.clone().into());
    let fit = Fit {
        batch_size: args.batch_size,
        epochs,
        seed: 7,
        validation_data: Some((tx.clone(), ty.clone())),
        ..Fit::default()
    };
    if args.autotune {
        let rows: Vec<usize> = (0..args.batch_size.min(data.train_x.nrows())).collect();
        let batch_x: Tensor = data.train_x.select(ndarray::Axis(0), &rows).into();
        let batch_y: Tensor = data.train_y.select(ndarray::Axis(0), &rows).into();
        print!("{}", model.autotune(&batch_x, &batch_y, &kiln::AutotuneOptions::default())?);
    }
    let history = model.fit(&x, &y, &fit)?;
    let test = model.evaluate(&tx, &ty, 1000)?;
    let seconds: Vec<f64> = history.epochs.iter().map(|e| e.seconds).collect();
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "test accuracy: {:.4} (loss {:.4}); time per epoch: median {:.2} s (first {:.2} s, {} epochs)",
        test.get("accuracy").unwrap_or(f64::NAN),
        test.loss,
        sorted[sorted.len() / 2],
        seconds[0],
        seconds.len()
    );
    std::fs::create_dir_all(&args.out)?;
    let png = args.out.join("loss.png");
    match history.plot(&png) {
        Ok(()) => println!("loss curve: {}", png.display()),
        Err(e) => println!("loss curve not written: {e}"),
    }
    let weights = args.out.join("weights.safetensors");
    model.save_weights(&weights)?;
    println!("weights: {}", weights.display());
    Ok(())
}
