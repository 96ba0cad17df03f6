//! How a step's results come back to the host. The outputs a call returns that the step itself
//! computes (temporaries, such as a loss) and the word in which kernels report a bad index lie
//! side by side in one device allocation, the egress (the word first, each output's slot at a
//! 256-byte boundary after it), so that one copy after the step brings them all back where each
//! was a copy of its own: a round trip through the copy engine each, and into pageable memory each
//! waits for the stream before the next is issued. Returned outputs that are an input or a shared
//! variable stay where they are and are copied on their own. The copies land in one staging area,
//! page-locked with `KILN_CUDA_PINNED=1` (opt-in until timed on a GPU), then one wait.
//!
//! The host clears the error word (a memset on the main stream, before the step) only when the
//! last step may have left a code in it: a step sets it dirty when it is launched, and reading the
//! word back as clear makes it clean again. So a replayed graph starts with its first kernel
//! rather than with a memset node ahead of it, and a bad index is still reported by the call that
//! met it and by no later one. `KILN_CUDA_EGRESS=0` (`with_egress(false, ..)` for one thread)
//! keeps each output in its own slot, copied back on its own, and the word cleared by a memset
//! inside the step, as before, to time the difference on a card.

use super::runtime::{cuda_err, DeviceBuffer, Gpu};
use crate::bytes::tensor_from_bytes;
use crate::kernel::{BufKind, KernelProgram, MemoryPlan};
use cudarc::driver::{result, PinnedHostSlice};
use kiln_ir::{Result, Tensor};
use std::collections::hash_map::{Entry, HashMap};
use std::sync::Arc;

/// Where each placed slot starts: cuBLAS and the vectorized kernels want aligned operands, and a
/// device allocation starts at least this aligned.
const PLACE_ALIGN: usize = 256;

/// A returned output: its buffer, and where its bytes lie in the staging area.
struct Returned {
    buf: usize,
    dtype: kiln_ir::DType,
    shape: Vec<usize>,
    offset: usize,
    size: usize,
    /// Its bytes come with the egress's copy (else a copy of its own, from `ptr[buf]`).
    in_egress: bool,
}

/// A plan's read-back, laid out once: the egress, which memory slots lie in it, and where each
/// returned output lands in the staging area (the egress's image first, then the outputs copied
/// on their own).
pub(super) struct Readback {
    /// The error word at offset 0 (where the step has one), then the placed slots.
    egress: Option<DeviceBuffer>,
    /// The offset in the egress of each placed memory slot.
    placed: HashMap<usize, usize>,
    /// The bytes of the egress that one copy brings back.
    len: usize,
    returned: Vec<Returned>,
    error_word: bool,
    /// The word is cleared by a memset inside the step (`KILN_CUDA_EGRESS=0`).
    clears_in_step: bool,
    /// The word may hold a code the host has not cleared.
    dirty: bool,
    /// Where the copies land: page-locked memory (`KILN_CUDA_PINNED=1`), else pageable.
    pinned: Option<PinnedHostSlice<u8>>,
    pageable: Vec<u8>,
}

/// Whether outputs come back through page-locked memory (`KILN_CUDA_PINNED=1`).
fn pinned_requested() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::switch_from_env(&ON, "KILN_CUDA_PINNED", "1")
}

impl Readback {
    /// The read-back of a step that returns buffers `outputs` (of shapes `shapes`), with an
    /// error word where `error_word`; its returned temporaries' slots are placed in the egress
    /// unless `KILN_CUDA_EGRESS=0`.
    pub(super) fn new(
        gpu: &Arc<Gpu>,
        kp: &KernelProgram,
        memory: &MemoryPlan,
        outputs: &[usize],
        shapes: Vec<Vec<usize>>,
        error_word: bool,
    ) -> Result<Readback> {
        let egress_on = super::EGRESS.on();
        let size_of = |b: usize| super::exec::bytes_of(kp, b);
        let mut placed = HashMap::new();
        let mut len: usize = if error_word { 4 } else { 0 };
        let temporaries = outputs.iter().filter(|_| egress_on).filter(|&&b| kp.buffers[b].kind == BufKind::Temp);
        for &b in temporaries {
            let Some(s) = memory.slot[b].filter(|_| size_of(b) > 0) else { continue };
            if let Entry::Vacant(slot) = placed.entry(s) {
                let at = len.next_multiple_of(PLACE_ALIGN);
                slot.insert(at);
                len = at + memory.slot_bytes[s];
            }
        }
        let mut total = len;
        let returned = outputs
            .iter()
            .zip(shapes)
            .map(|(&b, shape)| {
                let size = size_of(b);
                let in_egress = memory.slot[b].and_then(|s| placed.get(&s)).copied();
                let offset = in_egress.unwrap_or_else(|| {
                    total += size;
                    total - size
                });
                Returned { buf: b, dtype: kp.buffers[b].dtype, shape, offset, size, in_egress: in_egress.is_some() }
            })
            .collect();
        let egress = if len > 0 { Some(DeviceBuffer::new(gpu, len)?) } else { None };
        let pinned = if pinned_requested() {
            // SAFETY: every byte read from it is first written by a copy (`read`).
            let pinned = unsafe { gpu.ctx.alloc_pinned_with_flags::<u8>(total.max(1), 0) };
            Some(pinned.map_err(cuda_err("allocating page-locked memory"))?)
        } else {
            None
        };
        let pageable = if pinned.is_some() { vec![] } else { vec![0; total] };
        Ok(Readback {
            egress,
            placed,
            len,
            returned,
            error_word,
            clears_in_step: !egress_on,
            dirty: true,
            pinned,
            pageable,
        })
    }

    /// The device address of memory slot `s` where it lies in the egress.
    pub(super) fn slot_ptr(&self, s: usize) -> Option<u64> {
        Some(self.egress.as_ref()?.ptr + *self.placed.get(&s)? as u64)
    }

    /// The error word's device address (0: the step has none).
    pub(super) fn error_ptr(&self) -> u64 {
        match &self.egress {
            Some(e) if self.error_word => e.ptr,
            _ => 0,
        }
    }

    /// Whether the step clears the error word itself, first (`KILN_CUDA_EGRESS=0`).
    pub(super) fn clears_in_step(&self) -> bool {
        self.clears_in_step && self.error_word
    }

    /// Before a step is launched on `stream` (outside any capture): clears the error word if the
    /// last step may have left a code in it, and marks it dirty until this step's is read clear.
    pub(super) fn before_step(&mut self, stream: &cudarc::driver::CudaStream) -> Result<()> {
        let word = self.error_ptr();
        if word != 0 && !self.clears_in_step && self.dirty {
            // SAFETY: the error word is the egress's first 4 bytes.
            unsafe { result::memset_d8_async(word, 0xff, 4, stream.cu_stream()) }
                .map_err(cuda_err("clearing the error word"))?;
        }
        self.dirty = true;
        Ok(())
    }

    /// After the step is enqueued on the device's stream: copies the returned outputs (each
    /// buffer `b` at device address `ptr[b]`) and the error word back, waits, and returns the
    /// outputs and the word (`NO_ERROR` where the step has none).
    pub(super) fn read(&mut self, gpu: &Gpu, ptr: &[u64]) -> Result<(Vec<Tensor>, u32)> {
        let staging: &mut [u8] = match &mut self.pinned {
            Some(p) => p.as_mut_slice().map_err(cuda_err("reading page-locked memory"))?,
            None => &mut self.pageable,
        };
        let stream = gpu.stream.cu_stream();
        if let Some(egress) = &self.egress {
            // SAFETY: the egress holds `len` bytes; the copy is ordered after the step and the
            // staging area outlives the wait below.
            unsafe { result::memcpy_dtoh_async(&mut staging[..self.len], egress.ptr, stream) }
                .map_err(cuda_err("copying the outputs and the error word"))?;
        }
        for r in self.returned.iter().filter(|r| !r.in_egress && r.size > 0) {
            let chunk = &mut staging[r.offset..r.offset + r.size];
            match ptr[r.buf] {
                // An output with no device memory reads as zeros (not the last call's bytes).
                0 => chunk.fill(0),
                // SAFETY: the buffer holds `size` bytes; as above.
                src => {
                    unsafe { result::memcpy_dtoh_async(chunk, src, stream) }.map_err(cuda_err("copying an output"))?
                }
            }
        }
        gpu.synchronize()?;
        let tensors = self
            .returned
            .iter()
            .map(|r| tensor_from_bytes(r.dtype, &r.shape, &staging[r.offset..r.offset + r.size]))
            .collect();
        let code = if self.error_word {
            u32::from_ne_bytes([staging[0], staging[1], staging[2], staging[3]])
        } else {
            super::NO_ERROR
        };
        if code == super::NO_ERROR {
            self.dirty = false;
        }
        Ok((tensors, code))
    }
}
