//! Layout helpers every native backend shares: element sizes, collapsing of dims that all views of a
//! loop kernel walk contiguously, and the memory plan that assigns each temporary buffer a storage
//! slot, reusing a slot once the buffer that held it has had its last reader. A step never writes a
//! slot that one of its own reads lives in.

use super::{step_reads, step_writes, BufKind, KernelProgram, LoopKernel, View};
use kiln_ir::DType;
use std::collections::HashMap;

/// Bytes per element of a dtype (bools take one byte).
pub fn elem_size(d: DType) -> i64 {
    match d {
        DType::F32 | DType::I32 => 4,
        DType::F64 | DType::I64 => 8,
        DType::Bool => 1,
    }
}

/// Where each buffer of a program lives: `slot[b]` indexes `slot_bytes` for temporaries and
/// constants (`None` for inputs, shared variables and buffers nothing uses).
pub struct MemoryPlan {
    pub slot: Vec<Option<usize>>,
    /// Size of each slot in bytes, a multiple of 8 and at least 8.
    pub slot_bytes: Vec<usize>,
}

/// Assigns temporaries to storage slots, reusing a slot of the same size once the buffer that held
/// it has had its last reader; outputs and constants keep their own slots.
pub fn plan_memory(kp: &KernelProgram) -> MemoryPlan {
    plan_memory_with(kp, true)
}

/// `plan_memory`, or (`reuse: false`) a slot of its own for every temporary: more memory, but no
/// step then waits for another only because it reuses its memory (for steps that run side by side
/// on several streams).
pub fn plan_memory_with(kp: &KernelProgram, reuse: bool) -> MemoryPlan {
    let bytes = |b: usize| (kp.buffers[b].len * elem_size(kp.buffers[b].dtype) as usize).div_ceil(8).max(1) * 8;
    let mut last_read: HashMap<usize, usize> = HashMap::new();
    for (i, s) in kp.steps.iter().enumerate() {
        for r in step_reads(s) {
            last_read.insert(r, i);
        }
    }
    let mut slot = vec![None; kp.buffers.len()];
    let mut slot_bytes: Vec<usize> = vec![];
    let mut free: HashMap<usize, Vec<usize>> = HashMap::new();
    for (b, buf) in kp.buffers.iter().enumerate() {
        if let BufKind::Constant(_) = &buf.kind {
            slot_bytes.push(bytes(b));
            slot[b] = Some(slot_bytes.len() - 1);
        }
    }
    for (i, s) in kp.steps.iter().enumerate() {
        let (reads, writes) = (step_reads(s), step_writes(s));
        // Slots are taken before any of this step's reads is released, so what a step writes never
        // shares memory with what it reads.
        for &w in &writes {
            if slot[w].is_none() && kp.buffers[w].kind == BufKind::Temp {
                let n = bytes(w);
                let reusable = reuse && !kp.outputs.contains(&w);
                let reused = if reusable { free.get_mut(&n).and_then(|v| v.pop()) } else { None };
                slot[w] = Some(reused.unwrap_or_else(|| {
                    slot_bytes.push(n);
                    slot_bytes.len() - 1
                }));
            }
        }
        for r in reads.into_iter().chain(writes) {
            let dead = last_read.get(&r).is_none_or(|&l| l <= i);
            if dead && kp.buffers[r].kind == BufKind::Temp && !kp.outputs.contains(&r) {
                if let Some(sl) = slot[r] {
                    let list = free.entry(bytes(r)).or_default();
                    if !list.contains(&sl) && last_read.get(&r) == Some(&i) {
                        list.push(sl);
                    }
                }
            }
        }
    }
    MemoryPlan { slot, slot_bytes }
}

/// An elementwise kernel without its dims of size 1 (their index is always 0), so that it can be
/// compared with kernels over the same elements shaped without them (a `[16, 1]` row statistic
/// and the `[16]` rows of the reduction that made it). Kernels with only such dims stay as they are.
pub fn squeeze(k: &LoopKernel) -> LoopKernel {
    let keep: Vec<usize> = (0..k.shape.len()).filter(|&d| k.shape[d] != 1).collect();
    if k.reduce.is_some() || keep.is_empty() || keep.len() == k.shape.len() {
        return k.clone();
    }
    let view = |v: &View| View { buf: v.buf, offset: v.offset, strides: keep.iter().map(|&d| v.strides[d]).collect() };
    LoopKernel {
        shape: keep.iter().map(|&d| k.shape[d]).collect(),
        inputs: k.inputs.iter().map(view).collect(),
        out: view(&k.out),
        ..k.clone()
    }
}

/// Merges adjacent dims that every view walks contiguously (and drops dims of size 1).
pub fn collapse(k: &LoopKernel) -> LoopKernel {
    let reduced = k.reduce.map_or(0, |r| r.1);
    let kept = k.shape.len() - reduced;
    let mut shape: Vec<usize> = vec![];
    let mut ins: Vec<Vec<isize>> = vec![vec![]; k.inputs.len()];
    let mut out: Vec<isize> = vec![];
    let (mut new_kept, mut new_reduced) = (0, 0);
    for d in 0..k.shape.len() {
        let is_kept = d < kept;
        if k.shape[d] == 1 {
            continue;
        }
        let same_class = if is_kept { new_reduced == 0 && new_kept > 0 } else { new_reduced > 0 };
        let mergeable = same_class && {
            let last = shape.len() - 1;
            let n = k.shape[d] as isize;
            k.inputs.iter().enumerate().all(|(j, v)| ins[j][last] == v.strides[d] * n)
                && (!is_kept || out[last] == k.out.strides[d] * n)
        };
        if mergeable {
            let last = shape.len() - 1;
            shape[last] *= k.shape[d];
            for (j, v) in k.inputs.iter().enumerate() {
                ins[j][last] = v.strides[d];
            }
            if is_kept {
                out[last] = k.out.strides[d];
            }
        } else {
            shape.push(k.shape[d]);
            for (j, v) in k.inputs.iter().enumerate() {
                ins[j].push(v.strides[d]);
            }
            if is_kept {
                out.push(k.out.strides[d]);
                new_kept += 1;
            } else {
                new_reduced += 1;
            }
        }
    }
    let inputs = k.inputs.iter().zip(ins).map(|(v, s)| View { buf: v.buf, offset: v.offset, strides: s }).collect();
    LoopKernel {
        shape,
        inputs,
        out: View { buf: k.out.buf, offset: k.out.offset, strides: out },
        reduce: k.reduce.map(|(op, _)| (op, new_reduced)),
        ..k.clone()
    }
}
