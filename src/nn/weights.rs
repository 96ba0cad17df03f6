//! Saving and loading a model's weights as safetensors: one f32 tensor per parameter, named
//! `{layer}.kernel` and `{layer}.bias` (Keras's layer names). Loading checks that the file has
//! every parameter of the model with the same shape, and names the layer and both shapes when not.

use super::model::Sequential;
use crate::prelude::*;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::Path;

impl Sequential {
    /// Writes every parameter to a safetensors file.
    pub fn save_weights(&mut self, path: &Path) -> Result<()> {
        self.build()?;
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
        for (name, v) in self.weights() {
            let t = v.value()?.cast(F32);
            let bytes: Vec<u8> = t.to_f64_vec().iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
            data.push((name, t.shape().to_vec(), bytes));
        }
        let views = data
            .iter()
            .map(|(n, s, b)| {
                TensorView::new(Dtype::F32, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Invalid(format!("{n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, path)
            .map_err(|e| Error::Invalid(format!("cannot write weights to {}: {e}", path.display())))
    }

    /// Reads every parameter from a safetensors file written by `save_weights` (of a model with
    /// the same layers).
    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        self.build()?;
        let bytes = std::fs::read(path).map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Invalid(format!("{} is not a safetensors file: {e}", path.display())))?;
        let weights = self.weights();
        // Check everything before changing anything.
        let mut values = vec![];
        for (name, v) in &weights {
            let layer = name.split('.').next().unwrap_or(name);
            let t = file
                .tensor(name)
                .map_err(|_| Error::Invalid(format!("{}: no weights for layer '{layer}' ({name})", path.display())))?;
            let want = v.value()?.shape().to_vec();
            if t.shape() != want.as_slice() || t.dtype() != Dtype::F32 {
                return Err(Error::Invalid(format!(
                    "{}: layer '{layer}': {name} is {:?} {:?} in the file but {want:?} f32 in the model",
                    path.display(),
                    t.dtype(),
                    t.shape()
                )));
            }
            let floats: Vec<f64> =
                t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64).collect();
            values.push(Tensor::from_f64(F32, &want, &floats));
        }
        let known: Vec<&str> = weights.iter().map(|w| w.0.as_str()).collect();
        if let Some(extra) = file.names().into_iter().find(|n| !known.contains(n)) {
            return Err(Error::Invalid(format!(
                "{}: weights for '{extra}', which this model does not have",
                path.display()
            )));
        }
        for ((_, v), t) in weights.iter().zip(values) {
            v.set_value(t)?;
        }
        Ok(())
    }
}
