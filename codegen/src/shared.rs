//! Values of shared variables as backends see them. A value always has a host tensor of the right
//! type; a device backend may also keep a *resident* copy in its own memory and mark it newer than
//! the host copy, so a training loop never copies its parameters back and forth. The host copy is
//! brought up to date only when someone reads it (`host`), and writing the host copy (`host_mut`,
//! `set`) drops the resident one, so the two can never silently disagree.

use kiln_ir::{Result, Tensor, TensorType};
use std::any::Any;

/// A copy of a shared variable's value that lives in a backend's memory.
pub trait Resident: Any {
    /// Copies the resident value into `host` (same type).
    fn download(&self, host: &mut Tensor) -> Result<()>;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

pub struct SharedValue {
    host: Tensor,
    /// Whether `host` holds the current value (otherwise `resident` does).
    host_current: bool,
    resident: Option<Box<dyn Resident>>,
}

impl SharedValue {
    pub fn new(value: Tensor) -> SharedValue {
        SharedValue { host: value, host_current: true, resident: None }
    }
    pub fn ty(&self) -> TensorType {
        self.host.ty()
    }
    pub fn shape(&self) -> &[usize] {
        self.host.shape()
    }
    /// The current value on the host (copied back from the resident copy if that is newer).
    pub fn host(&mut self) -> Result<&Tensor> {
        if !self.host_current {
            let r = self.resident.as_ref().expect("a value whose host copy is stale has a resident copy");
            r.download(&mut self.host)?;
            self.host_current = true;
        }
        Ok(&self.host)
    }
    /// The host value for writing: any resident copy is dropped, since it will be stale.
    pub fn host_mut(&mut self) -> Result<&mut Tensor> {
        self.host()?;
        self.resident = None;
        Ok(&mut self.host)
    }
    /// Replaces the value (the resident copy is dropped).
    pub fn set(&mut self, value: Tensor) {
        self.host = value;
        self.host_current = true;
        self.resident = None;
    }
    /// The resident copy, if there is one of type `R`.
    pub fn resident_mut<R: Resident>(&mut self) -> Option<&mut R> {
        self.resident.as_mut().and_then(|r| r.as_any_mut().downcast_mut::<R>())
    }
    /// Whether the host copy is current (else only the resident copy is).
    pub fn host_is_current(&self) -> bool {
        self.host_current
    }
    /// The host tensor whatever its state, for its type and for uploading when it is current.
    pub fn host_unchecked(&self) -> &Tensor {
        &self.host
    }
    /// Installs a resident copy equal to the current value (after an upload).
    pub fn set_resident(&mut self, r: Box<dyn Resident>) {
        debug_assert!(self.host_current, "a resident copy made from a stale host value");
        self.resident = Some(r);
    }
    /// Records that the resident copy was written: the host copy is now stale.
    pub fn mark_resident_newer(&mut self) {
        debug_assert!(self.resident.is_some());
        self.host_current = false;
    }
}

/// Runs `f` over the host tensors of `shared` (brought up to date first, resident copies dropped):
/// the way a backend that computes on the host takes its variables.
pub fn with_host_values<R>(shared: &mut [SharedValue], f: impl FnOnce(&mut [Tensor]) -> Result<R>) -> Result<R> {
    let mut taken = Vec::with_capacity(shared.len());
    for s in shared.iter_mut() {
        taken.push(std::mem::replace(s.host_mut()?, Tensor::zeros(kiln_ir::DType::F32, &[0])));
    }
    let r = f(&mut taken);
    for (s, t) in shared.iter_mut().zip(taken) {
        s.host = t;
    }
    r
}
