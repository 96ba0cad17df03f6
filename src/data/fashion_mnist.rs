//! Fashion-MNIST (Zalando, MIT licence): 28x28 grey images of 10 kinds of clothing. The loader
//! looks in the given folder, then in `$KILN_DATA` (and its `fashion-mnist` subfolder), then in
//! `/usr/share/datasets/fashion-mnist` (Debian's package `dataset-fashion-mnist`), and otherwise
//! uses the subset shipped in this repository (`data/fashion-mnist`: the first 5,000 training and
//! 1,000 test images), so examples run on a fresh machine. Pixels are scaled to [0, 1].

use super::idx::read_idx;
use kiln_ir::{Error, Result};
use ndarray::{Array1, Array2};
use std::path::{Path, PathBuf};

pub const CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

/// Where the Debian package `dataset-fashion-mnist` installs the full set.
pub const SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Images as rows of 784 floats in [0, 1], labels as class indices.
pub struct FashionMnist {
    pub train_x: Array2<f32>,
    pub train_y: Array1<i64>,
    pub test_x: Array2<f32>,
    pub test_y: Array1<i64>,
    /// The folder the files came from.
    pub source: PathBuf,
    /// Whether this is the small subset shipped with kiln rather than the full set.
    pub is_subset: bool,
}

/// The subset shipped with the repository.
pub fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join("fashion-mnist")
}

fn has_files(dir: &Path) -> bool {
    FILES.iter().all(|f| dir.join(f).is_file())
}

/// The folders searched, in order (a given folder first).
pub fn search_path(dir: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = vec![];
    if let Some(d) = dir {
        dirs.push(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("KILN_DATA") {
        let d = PathBuf::from(d);
        dirs.push(d.join("fashion-mnist"));
        dirs.push(d);
    }
    dirs.push(PathBuf::from(SYSTEM_DIR));
    dirs
}

/// Loads Fashion-MNIST from the first folder of `search_path(dir)` that has all four files, else
/// from the shipped subset. A folder given explicitly must have the files.
pub fn load(dir: Option<&Path>) -> Result<FashionMnist> {
    if let Some(d) = dir {
        if !has_files(d) {
            return Err(missing(&[d.to_path_buf()]));
        }
    }
    let found = search_path(dir).into_iter().find(|d| has_files(d));
    match found {
        Some(d) => {
            let shipped = std::fs::canonicalize(shipped_dir()).ok();
            let is_subset = shipped.is_some() && std::fs::canonicalize(&d).ok() == shipped;
            load_from(&d, is_subset)
        }
        None => {
            let shipped = shipped_dir();
            if has_files(&shipped) {
                load_from(&shipped, true)
            } else {
                let mut looked = search_path(dir);
                looked.push(shipped);
                Err(missing(&looked))
            }
        }
    }
}

fn missing(looked: &[PathBuf]) -> Error {
    let dirs: Vec<String> = looked.iter().map(|d| d.display().to_string()).collect();
    Error::Invalid(format!(
        "Fashion-MNIST not found: looked for {} in {}. Install the Debian package dataset-fashion-mnist \
         (apt-get install dataset-fashion-mnist puts it in {SYSTEM_DIR}) or set KILN_DATA",
        FILES.join(", "),
        dirs.join(", ")
    ))
}

/// Loads the four files of one folder.
pub fn load_from(dir: &Path, is_subset: bool) -> Result<FashionMnist> {
    let images = |f: &str| -> Result<Array2<f32>> {
        let path = dir.join(f);
        let a = read_idx(&path)?;
        if a.dims.len() != 3 || a.dims[1] != 28 || a.dims[2] != 28 {
            return Err(Error::Invalid(format!("{}: expected images of 28x28, got dims {:?}", path.display(), a.dims)));
        }
        let pixels = a.data.iter().map(|&p| p as f32 / 255.0).collect();
        Ok(Array2::from_shape_vec((a.dims[0], 784), pixels).expect("dims checked"))
    };
    let labels = |f: &str| -> Result<Array1<i64>> {
        let path = dir.join(f);
        let a = read_idx(&path)?;
        if a.dims.len() != 1 || a.data.iter().any(|&l| l > 9) {
            return Err(Error::Invalid(format!(
                "{}: expected labels 0..9 in one dim, got dims {:?}",
                path.display(),
                a.dims
            )));
        }
        Ok(a.data.iter().map(|&l| l as i64).collect())
    };
    let (train_x, train_y) = (images(FILES[0])?, labels(FILES[1])?);
    let (test_x, test_y) = (images(FILES[2])?, labels(FILES[3])?);
    if train_x.nrows() != train_y.len() || test_x.nrows() != test_y.len() {
        return Err(Error::Invalid(format!("{}: image and label counts differ", dir.display())));
    }
    Ok(FashionMnist { train_x, train_y, test_x, test_y, source: dir.to_path_buf(), is_subset })
}
