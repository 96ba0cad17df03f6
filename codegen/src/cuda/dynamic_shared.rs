//! Shared memory past the 48 KiB a kernel may declare statically. A kernel whose `__shared__`
//! arrays take more gathers them into one type laid over the dynamic shared memory it is launched
//! with (`Stmt::SharedUnion` with `dynamic`): a side-by-side kernel's union of its sections'
//! arrays as it stands, any other kernel's arrays (wherever declared) as one struct, which its
//! code then names `smem.array`. The type's size is computed here by C's layout rules, asserted
//! by the printed code (`static_assert`, so NVRTC and the emulator both check it), and passed at
//! launch once the kernel's function is allowed that much (`exec.rs`). What a block may have on
//! a card comes from its compute capability (`max_block_bytes`); a kernel past it is an error
//! naming it, never a launch that fails. Kernels within 48 KiB are left exactly as they are.

use super::ast::*;
use super::side::SHARED_UNION;
use super::single::rewrite_stmts;
use kiln_ir::{Error, Result};
use std::collections::HashMap;

/// Shared memory a kernel may declare statically.
pub(super) const STATIC_BYTES: usize = 48 * 1024;

/// The most shared memory one block may have on a card of compute capability `capability` (its
/// opt-in maximum, static and dynamic together; CUDA C Programming Guide, compute capabilities).
pub(super) fn max_block_bytes(capability: u32) -> usize {
    let kib = match capability {
        90.. => 227,
        80 | 87 => 163,
        86 | 89 => 99,
        70 | 72 => 96,
        75 => 64,
        _ => 48,
    };
    kib * 1024
}

/// Shared memory an SM of a card of compute capability `capability` holds for its blocks.
fn sm_bytes(capability: u32) -> usize {
    let kib = match capability {
        90.. => 228,
        80 | 87 => 164,
        86 | 89 => 100,
        70 | 72 => 96,
        75 => 64,
        _ => 48,
    };
    kib * 1024
}

/// The most shared memory each of `blocks` blocks may take and still share an SM of a card of
/// compute capability `capability` (from 8.0 on, each block also holds 1 KiB for the system).
fn shared_for_blocks_an_sm(capability: u32, blocks: usize) -> usize {
    let reserved = if capability >= 80 { 1024 } else { 0 };
    (sm_bytes(capability) / blocks.max(1)).saturating_sub(reserved).min(max_block_bytes(capability))
}

/// The most shared memory a block may take and still share an SM of the card the code is
/// generated for with another: what a tile on tensor cores may take (`tile_plan.rs`), and a
/// side-by-side kernel with such a tile (`side.rs`).
pub(super) fn target_two_blocks_an_sm() -> usize {
    shared_for_blocks_an_sm(super::target_capability(), 2)
}

/// Shared memory a block may have on the card the code is generated for.
pub(super) fn target_block_bytes() -> usize {
    max_block_bytes(super::target_capability())
}

/// The byte size and alignment of `T name[len]` (`alignas` where given).
fn array_layout(s: &Stmt) -> (usize, usize) {
    let Stmt::SharedArray { ty, len, align, .. } = s else { unreachable!("a shared array") };
    let element = ty.size().max(1);
    (len * element, (*align).max(element))
}

/// The byte size and alignment of a struct of `arrays`, in order, as C lays it out.
fn struct_layout(arrays: &[Stmt]) -> (usize, usize) {
    let (mut end, mut most) = (0usize, 1usize);
    for a in arrays {
        let (bytes, align) = array_layout(a);
        end = end.next_multiple_of(align) + bytes;
        most = most.max(align);
    }
    (end.next_multiple_of(most), most)
}

/// The byte size of a union of structs (or of one struct, a member named "").
fn union_bytes(members: &[(String, Vec<Stmt>)]) -> usize {
    let layouts: Vec<(usize, usize)> = members.iter().map(|(_, arrays)| struct_layout(arrays)).collect();
    let most = layouts.iter().map(|l| l.1).max().unwrap_or(1);
    layouts.iter().map(|l| l.0).max().unwrap_or(0).next_multiple_of(most)
}

/// The bytes of every `__shared__` array a statement declares (a union's largest member).
fn declared_bytes(s: &Stmt) -> usize {
    let all = |body: &[Stmt]| body.iter().map(declared_bytes).sum::<usize>();
    match s {
        Stmt::SharedArray { .. } => array_layout(s).0,
        Stmt::SharedUnion { members, .. } => union_bytes(members),
        Stmt::If(_, a, b) => all(a) + all(b),
        Stmt::For { body, .. } | Stmt::Block(body) => all(body),
        _ => 0,
    }
}

/// Takes every shared array declared in `body`, at any depth, out of it (in order).
fn take_arrays(body: &mut Vec<Stmt>, into: &mut Vec<Stmt>) {
    for s in std::mem::take(body) {
        match s {
            Stmt::SharedArray { .. } => into.push(s),
            Stmt::If(c, mut a, mut b) => {
                take_arrays(&mut a, into);
                take_arrays(&mut b, into);
                body.push(Stmt::If(c, a, b));
            }
            Stmt::For { ty, var, init, end, step, body: mut inner } => {
                take_arrays(&mut inner, into);
                body.push(Stmt::For { ty, var, init, end, step, body: inner });
            }
            Stmt::Block(mut inner) => {
                take_arrays(&mut inner, into);
                body.push(Stmt::Block(inner));
            }
            s => body.push(s),
        }
    }
}

/// Puts `k`'s shared arrays in dynamic shared memory where they pass `STATIC_BYTES` (see the
/// module docs); an error where they pass what a block may have on the target card.
pub(super) fn place(k: &mut Kernel) -> Result<()> {
    let declared: usize = k.body.iter().map(declared_bytes).sum();
    if declared <= STATIC_BYTES {
        return Ok(());
    }
    let most = target_block_bytes();
    if declared > most {
        return Err(Error::Invalid(format!(
            "CUDA kernel {} needs {declared} bytes of shared memory a block; the target card allows {most}",
            k.name
        )));
    }
    let name = k.name.clone();
    if let Some(Stmt::SharedUnion { members, dynamic, .. }) =
        k.body.iter_mut().find(|s| matches!(s, Stmt::SharedUnion { .. }))
    {
        // A side-by-side kernel: its sections' top-level arrays already overlap in the union;
        // the arrays nested in its sections stay static beside it, within what a kernel may
        // declare statically.
        let bytes = union_bytes(members);
        if declared - bytes > STATIC_BYTES {
            return Err(Error::Invalid(format!(
                "CUDA kernel {name} declares {} bytes of static shared memory beside its union; at most {STATIC_BYTES} may be",
                declared - bytes
            )));
        }
        *dynamic = Some(DynamicShared { bytes });
        return Ok(());
    }
    let mut arrays = vec![];
    take_arrays(&mut k.body, &mut arrays);
    let mut names = HashMap::new();
    for a in &arrays {
        let Stmt::SharedArray { name, .. } = a else { unreachable!("taken arrays") };
        if names.insert(name.clone(), format!("{SHARED_UNION}.{name}")).is_some() {
            return Err(Error::Invalid(format!("CUDA kernel {} declares two shared arrays named {name}", k.name)));
        }
    }
    rewrite_stmts(&mut k.body, &names, &|_| None);
    let members = vec![(String::new(), arrays)];
    let bytes = union_bytes(&members);
    k.body.insert(0, Stmt::SharedUnion { name: SHARED_UNION.into(), members, dynamic: Some(DynamicShared { bytes }) });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array(ty: CType, name: &str, len: usize, align: usize) -> Stmt {
        Stmt::SharedArray { ty, name: name.into(), len, align }
    }

    #[test]
    fn structs_are_laid_out_as_c_lays_them_out() {
        // A bool, then a uint2 array aligned to 8, then floats aligned to 16: 1 -> 8 + 16 -> 32
        // + 40, rounded to the struct's alignment of 16.
        let arrays =
            [array(CType::Bool, "flag", 1, 0), array(CType::UInt2, "split", 2, 0), array(CType::Float, "t", 10, 16)];
        assert_eq!(struct_layout(&arrays), (80, 16));
        let members =
            vec![("s0".to_string(), arrays.to_vec()), ("s1".to_string(), vec![array(CType::Float, "u", 30, 0)])];
        assert_eq!(union_bytes(&members), 128);
    }

    #[test]
    fn kernels_within_48_kib_keep_their_static_arrays() {
        let body = vec![array(CType::Float, "tile_a", 12 * 1024, 16), Stmt::SyncThreads];
        let mut k =
            Kernel::plain("k0", vec![], vec![], body.clone(), Launch { grid: (1, 1), block: (256, 1), cluster: 1 });
        place(&mut k).unwrap();
        assert_eq!(k.body, body);
        assert_eq!(k.dynamic_shared_bytes(), 0);
    }

    #[test]
    fn larger_kernels_name_their_arrays_in_one_struct_of_dynamic_shared_memory() {
        let read = |name: &str| {
            Stmt::Assign(Expr::Var("x".into()), Expr::Index(Box::new(Expr::Var(name.into())), Box::new(int(0))))
        };
        let nested =
            Stmt::If(Expr::Bool(true), vec![array(CType::Bool, "last_block", 1, 0), read("last_block")], vec![]);
        let body = vec![
            array(CType::Float, "tile_a", 8 * 1024, 16),
            array(CType::Float, "tile_b", 6 * 1024, 16),
            read("tile_b"),
            nested,
        ];
        let launch = Launch { grid: (1, 1), block: (256, 1), cluster: 1 };
        let mut k = Kernel::plain("k0", vec![], vec![], body, launch);
        super::super::with_target_arch("sm_90", || place(&mut k)).unwrap();
        assert_eq!(k.dynamic_shared_bytes(), 56 * 1024 + 16);
        let printed = {
            let mut s = String::new();
            super::super::print::kernel(&mut s, &k);
            s
        };
        assert!(printed.contains("x = smem.tile_b[0];"), "{printed}");
        assert!(printed.contains("x = smem.last_block[0];"), "{printed}");
        assert!(printed.contains("static_assert(sizeof(kiln_shared) == 57360"), "{printed}");
        // Past what an 8.6 card allows a block: an error naming the kernel.
        let mut big = Kernel::plain("k7", vec![], vec![], vec![array(CType::Float, "t", 26 * 1024, 0)], launch);
        let err = super::super::with_target_arch("sm_86", || place(&mut big)).unwrap_err().to_string();
        assert!(err.contains("k7") && err.contains("106496") && err.contains("101376"), "{err}");
    }

    #[test]
    fn a_side_by_side_kernel_lays_its_union_over_dynamic_shared_memory_its_nested_arrays_static() {
        let union = |len: usize| Stmt::SharedUnion {
            name: SHARED_UNION.into(),
            members: vec![("s0".into(), vec![array(CType::Float, "tile_a", len, 16)])],
            dynamic: None,
        };
        let nested = |len: usize| Stmt::If(Expr::Bool(true), vec![array(CType::Float, "partial", len, 0)], vec![]);
        let launch = Launch { grid: (1, 1), block: (256, 1), cluster: 1 };
        let mut k = Kernel::plain("k3_and_k5", vec![], vec![], vec![union(16 * 1024), nested(256)], launch);
        super::super::with_target_arch("sm_90", || place(&mut k)).unwrap();
        assert_eq!(k.dynamic_shared_bytes(), 64 * 1024);
        assert!(matches!(&k.body[1], Stmt::If(_, a, _) if matches!(a[0], Stmt::SharedArray { .. })));
        // Nested arrays past 48 KiB of their own cannot stay static: an error, not a kernel
        // that NVRTC refuses.
        let mut k = Kernel::plain("k3_and_k5", vec![], vec![], vec![union(1024), nested(13 * 1024)], launch);
        let err = super::super::with_target_arch("sm_90", || place(&mut k)).unwrap_err().to_string();
        assert!(err.contains("k3_and_k5") && err.contains("53248 bytes of static"), "{err}");
    }
}
