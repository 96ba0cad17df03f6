//! Elementwise groups (no reduction, no product in tiles): each thread of a grid-stride loop
//! computes four adjacent elements through 16-byte loads and stores where every view allows it,
//! else one element at a time. A view allows it when its innermost dimension is contiguous float32
//! data starting on a 16-byte boundary, with every outer stride a multiple of four floats (so each
//! row's quads stay aligned), or when it is broadcast along that dimension (one value a quad: a
//! column of a bias, or a scalar). So a dense layer's `relu(x w + b)` over `[4096, 256]`, whose bias
//! is broadcast along the rows, moves 16 bytes a load as a contiguous update does. The buffers
//! themselves are at least 256-byte aligned (every kiln allocation), and the lowering checked every
//! view against its buffer, so a quad never reaches past a view's last element.

use super::ast::*;
use super::emit::{decompose, global_id, grid_stride, grid_stride_loop, launch_1d, offset, Emitter, Source};
use crate::kernel::View;
use kiln_ir::DType;

/// How a vectorized loop reads one input of a member.
enum QuadRead {
    /// Four adjacent floats of a contiguous row, as one `float4`.
    Quad,
    /// One value for the whole quad (broadcast along the innermost dimension), per quad.
    Scalar,
    /// One value for every quad (broadcast along every dimension), read once before the loop.
    Once,
}

/// How `v` (of element type `d`) is read four elements at a time along the innermost of `rank`
/// dimensions, or `None` where it cannot be.
fn quad_read(v: &View, d: DType, rank: usize) -> Option<QuadRead> {
    let aligned = |x: isize| x.rem_euclid(4) == 0;
    let outer = &v.strides[..rank - 1];
    match v.strides[rank - 1] {
        _ if v.strides.iter().all(|&s| s == 0) => Some(QuadRead::Once),
        0 => Some(QuadRead::Scalar),
        1 if d == DType::F32 && aligned(v.offset) && outer.iter().all(|&s| aligned(s)) => Some(QuadRead::Quad),
        _ => None,
    }
}

/// The index of the quad of `v` (a `QuadRead::Quad` view, its offset added to the pointer) at the
/// quad multi-index `i0..` over `rank` dimensions: its outer strides in quads.
fn quad_index(v: &View, rank: usize) -> Expr {
    if rank == 1 {
        return var("u");
    }
    let mut strides: Vec<isize> = v.strides[..rank - 1].iter().map(|&s| s / 4).collect();
    strides.push(1);
    offset(&View { buf: v.buf, offset: 0, strides }, rank)
}

impl<'a> Emitter<'a> {
    /// Whether the group is computed four elements a thread: every member an elementwise kernel
    /// over the first's shape, whose innermost dimension is a multiple of four (one dimension
    /// and at least four elements: the rest go one at a time after the quads), every output a
    /// `QuadRead::Quad` view and every input read from memory one that `quad_read` allows.
    pub(super) fn vectorizable(&self) -> bool {
        let k = &self.group[0].kernel;
        let rank = k.shape.len();
        let n: usize = k.shape.iter().product();
        // A group computing a product is bound by its dot products, not by memory.
        if self.product.is_some() || rank == 0 || n < 4 || (rank > 1 && !k.shape[rank - 1].is_multiple_of(4)) {
            return false;
        }
        self.group.iter().all(|m| {
            m.kernel.reduce.is_none()
                && m.kernel.shape == k.shape
                && matches!(quad_read(&m.kernel.out, m.kernel.out_dtype, rank), Some(QuadRead::Quad))
                && m.kernel
                    .inputs
                    .iter()
                    .zip(&m.kernel.input_dtypes)
                    .zip(&m.sources)
                    .all(|((v, &d), src)| *src != Source::Memory || quad_read(v, d, rank).is_some())
        })
    }

    /// The elementwise group: four elements per thread through 16-byte accesses where every view
    /// allows, then (or else) one element at a time.
    pub(super) fn elementwise(&mut self) -> (Vec<Stmt>, Launch) {
        let k = self.group[0].kernel.clone();
        let it = self.index_type(&k);
        let n: usize = k.shape.iter().product();
        let rank = k.shape.len();
        let mut body = vec![];
        let mut first_scalar = 0;
        if self.vectorizable() {
            let n4 = n / 4;
            let mut inner = vec![];
            if rank > 1 {
                let mut quads = k.shape.clone();
                quads[rank - 1] /= 4;
                decompose(var("u"), &quads, 0, it, &mut inner);
            }
            // Per member, per input: the four lanes (a float4's fields, or one scalar read once).
            let mut lanes: Vec<Vec<[Expr; 4]>> = vec![];
            for (m, mem) in self.group.iter().enumerate() {
                let suffix = if m == 0 { String::new() } else { format!("_f{m}") };
                let mut per_input = vec![];
                for (j, ((v, &d), src)) in
                    mem.kernel.inputs.iter().zip(&mem.kernel.input_dtypes).zip(&mem.sources).enumerate()
                {
                    let name = format!("x{j}{suffix}");
                    let param = var(Self::param_name(m, &format!("in{j}")));
                    per_input.push(match src {
                        Source::Register(w) => std::array::from_fn(|l| var(format!("y{w}_{l}"))),
                        Source::Product => unreachable!("groups computing a product are not vectorized"),
                        Source::Memory => match quad_read(v, d, rank).expect("vectorizable") {
                            QuadRead::Once => {
                                let base = if v.offset == 0 { param } else { param + int(v.offset as i64) };
                                body.push(decl(CType::of(d), name.clone(), index(base, int(0))));
                                std::array::from_fn(|_| var(&name))
                            }
                            QuadRead::Scalar => {
                                inner.push(decl(CType::of(d), name.clone(), index(param, offset(v, rank))));
                                std::array::from_fn(|_| var(&name))
                            }
                            QuadRead::Quad => {
                                let base = if v.offset == 0 { param } else { param + int(v.offset as i64) };
                                let quad = Expr::Vec4(Box::new(base), Box::new(quad_index(v, rank)));
                                inner.push(decl(CType::Float4, name.clone(), quad));
                                std::array::from_fn(|l| Expr::Lane(Box::new(var(&name)), l as u8))
                            }
                        },
                    });
                }
                lanes.push(per_input);
            }
            for l in 0..4 {
                for (m, member_lanes) in lanes.iter().enumerate() {
                    let ins: Vec<Expr> = member_lanes.iter().map(|x| x[l].clone()).collect();
                    let suffix = if m == 0 { format!("_{l}") } else { format!("_f{m}_{l}") };
                    let (mk, dtypes) = (self.group[m].kernel.clone(), self.group[m].dtypes.clone());
                    let r = self.exprs(&mk, &dtypes, &ins, &suffix, &mut inner);
                    self.member_value(m, r, *dtypes.last().expect("non-empty"), &format!("_{l}"), &mut inner);
                }
            }
            for m in 0..self.group.len() {
                let o = &self.group[m].kernel.out;
                let param = var(Self::param_name(m, "out"));
                let base = if o.offset == 0 { param } else { param + int(o.offset as i64) };
                let ys = (0..4).map(|l| var(format!("y{m}_{l}"))).collect();
                let quad = Expr::Vec4(Box::new(base), Box::new(quad_index(o, rank)));
                inner.push(assign(quad, call("make_float4", ys)));
            }
            body.push(grid_stride_loop(it, "u", n4, inner));
            first_scalar = n4 * 4;
            if first_scalar == n {
                return (body, launch_1d(n4));
            }
            body.push(Stmt::Comment("the last elements, one at a time".into()));
        }
        let mut inner = vec![];
        decompose(var("i"), &k.shape, 0, it, &mut inner);
        for m in 0..self.group.len() {
            self.member_element(m, rank, &mut inner);
        }
        let init = if first_scalar > 0 { int(first_scalar as i64) + global_id(it) } else { global_id(it) };
        body.push(Stmt::For { ty: it, var: "i".into(), init, end: int(n as i64), step: grid_stride(it), body: inner });
        // With the 16-byte loop first, the few elements left over go to its first threads.
        let work = if first_scalar > 0 { n / 4 } else { n };
        (body, launch_1d(work))
    }
}
