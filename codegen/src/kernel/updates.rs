//! Where the updates of shared variables are written: in place by the kernel that computes the
//! new value when that is safe, else copied in after the last step.

use super::*;

/// How a backend writes one update of a shared variable.
#[derive(Clone, Debug, PartialEq)]
pub enum UpdateWrite {
    /// The kernel computing the new value writes it straight into the variable's buffer.
    InPlace { shared: usize },
    /// The new value is computed into `from` and copied into the variable after every step.
    CopyAtEnd { from: BufId, shared: usize },
}

/// Decides, for each update `(output, shared index)`, whether its value can be written in place:
/// when one loop kernel computes it, nothing reads the variable's old value after that kernel, the
/// kernel itself reads the old value only element by element at the position it writes. Such a
/// value's buffer is replaced by the variable's everywhere.
/// Other updates are copied at the end; a value that is itself a source buffer (another variable,
/// an input or a constant) is first copied into a temporary by a kernel at the start, so it keeps
/// the old value whatever is written in place. So is an updated variable that the function also
/// returns as it is: the call returns its old value (as Theano's does, outputs being computed
/// before any update), which a backend reading its outputs back after the step would otherwise
/// find overwritten by the update; no updated variable is then returned as it is, so none needs
/// its update kept out of place for that.
pub fn place_updates(p: &mut KernelProgram, updates: &[(usize, usize)]) -> Vec<UpdateWrite> {
    let shared_buf = |p: &KernelProgram, s: usize| p.buffers.iter().position(|b| b.kind == BufKind::Shared(s));
    // Snapshot source-valued updates first.
    for &(o, _) in updates {
        let vb = p.outputs[o];
        if p.buffers[vb].kind != BufKind::Temp {
            p.outputs[o] = snapshot(p, vb);
        }
    }
    // Then each updated variable returned as it is.
    for &(_, s) in updates {
        let Some(sb) = shared_buf(p, s) else { continue };
        let as_is: Vec<usize> =
            (0..p.outputs.len()).filter(|&o| p.outputs[o] == sb && !updates.iter().any(|u| u.0 == o)).collect();
        if !as_is.is_empty() {
            let snap = snapshot(p, sb);
            as_is.into_iter().for_each(|o| p.outputs[o] = snap);
        }
    }
    let mut writes = Vec::with_capacity(updates.len());
    for &(o, s) in updates {
        let vb = p.outputs[o];
        let Some(sb) = shared_buf(p, s) else {
            writes.push(UpdateWrite::CopyAtEnd { from: vb, shared: s });
            continue;
        };
        let writers: Vec<usize> = (0..p.steps.len()).filter(|&i| step_writes(&p.steps[i]).contains(&vb)).collect();
        // The loop kernel writing the value: a step of its own, or the epilogue of a product that
        // does not read the variable (its other row blocks may still be reading when one finishes).
        let kernel = match writers.as_slice() {
            [w] => match &p.steps[*w] {
                Step::Loop(k) => Some(k),
                Step::MatMul(m) if m.a != sb && m.b != sb => m.epilogue.as_deref().filter(|k| k.out.buf == vb),
                _ => None,
            },
            _ => None,
        };
        let in_place = p.buffers[vb].kind == BufKind::Temp
            && kernel.is_some_and(|k| {
                let w = writers[0];
                let same_view = |v: &View| v.offset == k.out.offset && v.strides == k.out.strides;
                k.inputs.iter().filter(|v| v.buf == sb).all(same_view)
                    && (w + 1..p.steps.len()).all(|i| !step_reads(&p.steps[i]).contains(&sb))
            });
        if in_place {
            replace_buffer(p, vb, sb);
            writes.push(UpdateWrite::InPlace { shared: s });
        } else {
            writes.push(UpdateWrite::CopyAtEnd { from: vb, shared: s });
        }
    }
    writes
}

/// A temporary holding `source`'s value as the step starts, copied by a kernel placed first.
fn snapshot(p: &mut KernelProgram, source: BufId) -> BufId {
    let (len, dtype) = (p.buffers[source].len, p.buffers[source].dtype);
    p.buffers.push(Buffer { dtype, len, kind: BufKind::Temp });
    let snap = p.buffers.len() - 1;
    let copy = LoopKernel {
        name: format!("k{}_update_snapshot", p.steps.len()),
        origin: vec!["the old value of an updated variable".into()],
        shape: vec![len],
        inputs: vec![View { buf: source, offset: 0, strides: vec![1] }],
        input_dtypes: vec![dtype],
        exprs: vec![ScalarExpr::Input(0)],
        out: View { buf: snap, offset: 0, strides: vec![1] },
        out_dtype: dtype,
        reduce: None,
    };
    p.steps.insert(0, Step::Loop(copy));
    snap
}

/// The buffers a step writes (a product with an epilogue writes two).
pub fn step_writes(s: &Step) -> Vec<BufId> {
    match s {
        Step::Loop(k) => vec![k.out.buf],
        Step::MatMul(m) => std::iter::once(m.c).chain(m.epilogue.as_ref().map(|k| k.out.buf)).collect(),
        Step::Gather(g) | Step::ScatterAdd(g) => vec![g.out],
        Step::Random { out, .. } => vec![*out],
    }
}

pub fn step_reads(s: &Step) -> Vec<BufId> {
    match s {
        Step::Loop(k) => k.inputs.iter().map(|v| v.buf).collect(),
        Step::MatMul(m) => {
            [m.a, m.b].into_iter().chain(m.epilogue.iter().flat_map(|k| k.inputs.iter().map(|v| v.buf))).collect()
        }
        Step::Gather(g) | Step::ScatterAdd(g) => vec![g.src, g.idx],
        Step::Random { state, .. } => vec![*state],
    }
}

/// Makes every step and output use buffer `to` where it used `from`.
fn replace_buffer(p: &mut KernelProgram, from: BufId, to: BufId) {
    let r = |b: &mut BufId| {
        if *b == from {
            *b = to
        }
    };
    for s in &mut p.steps {
        match s {
            Step::Loop(k) => {
                k.inputs.iter_mut().for_each(|v| r(&mut v.buf));
                r(&mut k.out.buf);
            }
            Step::MatMul(m) => {
                [&mut m.a, &mut m.b, &mut m.c].into_iter().for_each(r);
                if let Some(k) = &mut m.epilogue {
                    k.inputs.iter_mut().for_each(|v| r(&mut v.buf));
                    r(&mut k.out.buf);
                }
            }
            Step::Gather(g) | Step::ScatterAdd(g) => [&mut g.src, &mut g.idx, &mut g.out].into_iter().for_each(r),
            Step::Random { state, out, .. } => [state, out].into_iter().for_each(r),
        }
    }
    p.outputs.iter_mut().for_each(r);
}
