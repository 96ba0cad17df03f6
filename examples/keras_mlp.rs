//! The lecture's Keras MLP, line for line in kiln:
//!
//! ```python
//! model = Sequential()
//! model.add(Dense(64, input_dim=20, activation='relu'))
//! model.add(Dropout(0.5))
//! model.add(Dense(10, activation='softmax'))
//! sgd = SGD(lr=0.01, decay=1e-6, momentum=0.9, nesterov=True)
//! model.compile(loss='categorical_crossentropy', optimizer=sgd, metrics=['accuracy'])
//! model.fit(x_train, y_train, epochs=20, batch_size=16)
//! score = model.evaluate(x_test, y_test, batch_size=16)
//! ```
//!
//! on a synthetic problem it can learn: 20 features, 10 classes, each class a noisy Gaussian
//! cluster around its own centre. Prints the test accuracy.
//!
//! `cargo run --release --example keras_mlp -- [--device cpu|cuda] [--epochs N]`

use clap::Parser;
use kiln::data::one_hot;
use kiln::nn::*;
use kiln::{Device, Tensor};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Unused (the data are synthetic); accepted like the other examples.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

/// `n` examples: class c's features are N(centre_c, 1), the centres N(0, 1.5^2) per feature.
fn synthetic(n: usize, seed: u64, centres: &Array2<f64>) -> (Tensor, Tensor) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let noise = Normal::new(0.0, 1.0).expect("unit normal");
    let labels: Array1<i64> = (0..n).map(|_| rng.random_range(0..10)).collect();
    let x = Array2::from_shape_fn((n, 20), |(i, j)| (centres[[labels[i] as usize, j]] + noise.sample(&mut rng)) as f32);
    (x.into(), one_hot(&labels, 10).into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = Device::parse(&args.device)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let spread = Normal::new(0.0, 1.5).expect("normal");
    let centres = Array2::from_shape_fn((10, 20), |_| spread.sample(&mut rng));
    let (x_train, y_train) = synthetic(1000, 1, &centres);
    let (x_test, y_test) = synthetic(100, 2, &centres);

    let mut model = Sequential::new().device(device);
    model.add(Dense::new(64).input_dim(20).activation(Activation::Relu));
    model.add(Dropout::new(0.5));
    model.add(Dense::new(10).activation(Activation::Softmax));
    let sgd = Optimizer::Sgd { learning_rate: 0.01, decay: 1e-6, momentum: 0.9, nesterov: true };
    model.compile(Loss::CategoricalCrossentropy, sgd, &[Metric::Accuracy])?;
    print!("{}", model.summary()?);
    model.fit(&x_train, &y_train, &Fit { epochs: args.epochs, batch_size: 16, verbose: 2, ..Fit::default() })?;
    let score = model.evaluate(&x_test, &y_test, 16)?;
    println!("test loss {:.4}, test accuracy {:.4}", score.loss, score.get("accuracy").unwrap_or(f64::NAN));
    Ok(())
}
