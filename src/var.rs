//! `Var`: a symbolic tensor, i.e. a node of a user's graph. Methods build new nodes; every method
//! records the caller's source line. An op applied to ill-typed operands gives an error `Var` instead
//! of panicking: the error (naming both shapes and the line) travels through every later use and is
//! returned by `check`, `ty`, `grad` and `compile`.

use crate::graph::Graph;
use kiln_ir::ops::{BinaryOp, MoveOp, NnOp, Op, ReduceOp, SliceRange, SourceOp, UnaryOp};
use kiln_ir::{DType, Dim, Error, Loc, NodeId, Result, Tensor, TensorType};
use std::panic::Location;

#[derive(Clone)]
pub struct Var {
    pub(crate) graph: Graph,
    pub(crate) node: std::result::Result<NodeId, Error>,
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.node.clone(), self.ty()) {
            (Ok(n), Ok(t)) => write!(f, "Var({n:?}: {t})"),
            (Err(e), _) | (_, Err(e)) => write!(f, "Var(error: {e})"),
        }
    }
}

/// A right-hand operand: another `Var`, or a Rust number taken as a 0-d constant of the other
/// operand's dtype.
pub trait Operand {
    fn to_var(&self, like: &Var, at: Loc) -> Var;
    /// The operand itself when it is a variable.
    fn as_var(&self) -> Option<Var> {
        None
    }
}
impl Operand for Var {
    fn to_var(&self, _: &Var, _: Loc) -> Var {
        self.clone()
    }
    fn as_var(&self) -> Option<Var> {
        Some(self.clone())
    }
}
impl Operand for &Var {
    fn to_var(&self, _: &Var, _: Loc) -> Var {
        (*self).clone()
    }
    fn as_var(&self) -> Option<Var> {
        Some((*self).clone())
    }
}
macro_rules! number_operand {
    ($($t:ty),*) => {$(
        impl Operand for $t {
            fn to_var(&self, like: &Var, at: Loc) -> Var {
                match like.ty() {
                    Ok(t) => {
                        let id = like.graph.state.borrow_mut().ir.scalar(t.dtype, *self as f64, at);
                        Var::new(&like.graph, id)
                    }
                    Err(e) => Var { graph: like.graph.clone(), node: Err(e) },
                }
            }
        }
    )*};
}
number_operand!(f64, f32, i32, i64, usize);

impl Var {
    pub(crate) fn new(g: &Graph, id: NodeId) -> Var {
        Var { graph: g.clone(), node: Ok(id) }
    }
    pub(crate) fn from_result(g: &Graph, r: Result<NodeId>) -> Var {
        Var { graph: g.clone(), node: r }
    }
    fn error(&self, e: Error) -> Var {
        Var { graph: self.graph.clone(), node: Err(e) }
    }
    fn type_error(&self, op: &str, detail: String, at: Loc) -> Var {
        self.error(Error::Type { op: op.into(), detail, at })
    }

    /// The node, or the error that made this variable.
    pub fn id(&self) -> Result<NodeId> {
        self.node.clone()
    }
    /// `Ok(self)` if this variable is well-typed, else the error that made it.
    pub fn check(&self) -> Result<&Var> {
        self.node.as_ref().map(|_| self).map_err(Clone::clone)
    }
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    pub fn ty(&self) -> Result<TensorType> {
        Ok(self.graph.state.borrow().ir.ty(self.id()?).clone())
    }
    pub fn dtype(&self) -> Result<DType> {
        Ok(self.ty()?.dtype)
    }
    pub fn shape(&self) -> Result<Vec<Dim>> {
        Ok(self.ty()?.shape)
    }
    pub fn rank(&self) -> Result<usize> {
        Ok(self.ty()?.rank())
    }
    /// Names the node (shown by `debugprint`).
    pub fn named(self, name: &str) -> Var {
        if let Ok(id) = self.node {
            self.graph.state.borrow_mut().ir.set_name(id, name);
        }
        self
    }

    /// Adds `op` over `self` and `others`, carrying the first operand error along.
    pub(crate) fn apply(&self, op: Op, others: &[&Var], at: Loc) -> Var {
        let mut ids = vec![];
        for v in std::iter::once(self).chain(others.iter().copied()) {
            if !v.graph.same(&self.graph) {
                return self.type_error(&op.label(), "operands belong to different graphs".into(), at);
            }
            match &v.node {
                Ok(id) => ids.push(*id),
                Err(e) => return self.error(e.clone()),
            }
        }
        self.graph.node(op, &ids, at)
    }

    fn shared_id(&self) -> Result<kiln_ir::ops::SharedId> {
        match self.graph.state.borrow().ir.op(self.id()?) {
            Op::Source(SourceOp::Shared { id, .. }) => Ok(*id),
            other => Err(Error::Invalid(format!("'{}' is not a shared variable", other.label()))),
        }
    }
    /// The current value of a shared variable (copied back from a device where it is resident).
    pub fn value(&self) -> Result<Tensor> {
        let id = self.shared_id()?;
        let mut st = self.graph.state.borrow_mut();
        st.shared.get_mut(&id).expect("variables live in their graph").host().cloned()
    }
    /// Sets a shared variable's value; dtype and shape must stay those it was created with.
    pub fn set_value(&self, value: impl Into<Tensor>) -> Result<()> {
        let id = self.shared_id()?;
        let value = value.into();
        let ty = self.ty()?;
        if value.ty() != ty {
            return Err(Error::Invalid(format!(
                "shared variable {:?} is {ty}, cannot set a {}",
                self.name(),
                value.ty()
            )));
        }
        self.graph.state.borrow_mut().shared.get_mut(&id).expect("variables live in their graph").set(value);
        Ok(())
    }
    /// The node's name, if any.
    pub fn name(&self) -> Option<String> {
        let id = self.node.as_ref().ok()?;
        self.graph.state.borrow().ir.node(*id).name.clone()
    }

    /// Normalizes possibly negative axes against this variable's rank.
    fn axes(&self, op: &str, axes: &[isize], at: Loc) -> std::result::Result<Vec<usize>, Var> {
        let r = match self.rank() {
            Ok(r) => r as isize,
            Err(e) => return Err(self.error(e)),
        };
        let mut out = Vec::new();
        for &a in axes {
            let n = if a < 0 { a + r } else { a };
            if n < 0 || n >= r {
                return Err(self.type_error(op, format!("axis {a} out of range for rank {r}"), at));
            }
            out.push(n as usize);
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
    /// Applies the op made by `make` for one (possibly negative) axis.
    #[track_caller]
    fn on_axis(&self, name: &str, axis: isize, others: &[&Var], make: impl FnOnce(usize) -> Op) -> Var {
        let at = Location::caller();
        match self.axes(name, &[axis], at) {
            Ok(a) => self.apply(make(a[0]), others, at),
            Err(e) => e,
        }
    }

    #[track_caller]
    pub fn unary(&self, op: UnaryOp) -> Var {
        self.apply(Op::Unary(op), &[], Location::caller())
    }
    #[track_caller]
    pub fn binary(&self, op: BinaryOp, rhs: impl Operand) -> Var {
        let at = Location::caller();
        let r = rhs.to_var(self, at);
        self.apply(Op::Binary(op), &[&r], at)
    }
    #[track_caller]
    pub fn cast(&self, dtype: DType) -> Var {
        self.unary(UnaryOp::Cast(dtype))
    }
}

macro_rules! unary_methods {
    ($($name:ident => $op:ident),* $(,)?) => {
        impl Var {$(
            #[track_caller]
            pub fn $name(&self) -> Var {
                self.unary(UnaryOp::$op)
            }
        )*}
    };
}
unary_methods!(
    exp => Exp, log => Log, log1p => Log1p, expm1 => Expm1, sqrt => Sqrt, rsqrt => Rsqrt,
    reciprocal => Reciprocal, abs => Abs, sign => Sign, tanh => Tanh, sigmoid => Sigmoid, relu => Relu,
    softplus => Softplus, sin => Sin, cos => Cos, floor => Floor, ceil => Ceil, not => Not,
);

macro_rules! binary_methods {
    ($($name:ident => $op:ident),* $(,)?) => {
        impl Var {$(
            #[track_caller]
            pub fn $name(&self, rhs: impl Operand) -> Var {
                self.binary(BinaryOp::$op, rhs)
            }
        )*}
    };
}
binary_methods!(
    pow => Pow, maximum => Maximum, minimum => Minimum, eq => Eq, ne => Ne, lt => Lt, le => Le,
    gt => Gt, ge => Ge, and => And, or => Or,
);

macro_rules! reduce_methods {
    ($($name:ident, $keep:ident => $op:ident),* $(,)?) => {
        impl Var {$(
            /// Reduces over `axes` (negative counts from the end).
            #[track_caller]
            pub fn $name(&self, axes: &[isize]) -> Var {
                self.reduce(ReduceOp::$op, axes, false)
            }
            /// Like the plain form, keeping the reduced axes as size 1.
            #[track_caller]
            pub fn $keep(&self, axes: &[isize]) -> Var {
                self.reduce(ReduceOp::$op, axes, true)
            }
        )*}
    };
}
reduce_methods!(
    sum, sum_keepdims => Sum, mean, mean_keepdims => Mean, max, max_keepdims => Max,
    min, min_keepdims => Min, prod, prod_keepdims => Prod,
);

impl Var {
    #[track_caller]
    pub fn reduce(&self, op: ReduceOp, axes: &[isize], keepdims: bool) -> Var {
        let at = Location::caller();
        match self.axes(op.name(), axes, at) {
            Ok(axes) => self.apply(Op::Reduce { op, axes, keepdims }, &[], at),
            Err(e) => e,
        }
    }
    /// Sum of every element (a scalar).
    #[track_caller]
    pub fn sum_all(&self) -> Var {
        let all: Vec<isize> = (0..self.rank().unwrap_or(0) as isize).collect();
        self.reduce(ReduceOp::Sum, &all, false)
    }
    /// Mean of every element (a scalar).
    #[track_caller]
    pub fn mean_all(&self) -> Var {
        let all: Vec<isize> = (0..self.rank().unwrap_or(0) as isize).collect();
        self.reduce(ReduceOp::Mean, &all, false)
    }
    /// Index of the largest element along `axis` (i64).
    #[track_caller]
    pub fn argmax(&self, axis: isize) -> Var {
        self.reduce(ReduceOp::ArgMax, &[axis], false)
    }

    /// Matrix product with numpy's rules: vectors are promoted to matrices and the added axis removed
    /// again; operands of rank > 2 are batches of matrices with broadcast batch axes.
    #[track_caller]
    pub fn matmul(&self, rhs: &Var) -> Var {
        let at = Location::caller();
        let (ra, rb) = match (self.rank(), rhs.rank()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return self.error(e),
        };
        let a = if ra == 1 { self.reshape_dims(&[Some(Dim::Fixed(1)), None], at) } else { self.clone() };
        let b = if rb == 1 { rhs.reshape_dims(&[None, Some(Dim::Fixed(1))], at) } else { rhs.clone() };
        let p = a.apply(Op::MatMul, &[&b], at);
        let Ok(mut shape) = p.shape() else { return p };
        if rb == 1 {
            shape.pop();
        }
        if ra == 1 {
            shape.remove(shape.len() - if rb == 1 { 1 } else { 2 });
        }
        if ra == 1 || rb == 1 {
            p.reshape_dims(&shape.into_iter().map(Some).collect::<Vec<_>>(), at)
        } else {
            p
        }
    }
    /// Alias of `matmul` (Theano's `dot`).
    #[track_caller]
    pub fn dot(&self, rhs: &Var) -> Var {
        self.matmul(rhs)
    }

    fn reshape_dims(&self, spec: &[Option<Dim>], at: Loc) -> Var {
        self.apply(Op::Movement(MoveOp::Reshape(spec.to_vec())), &[], at)
    }
    /// Reshape; one entry may be -1 (inferred).
    #[track_caller]
    pub fn reshape(&self, shape: &[i64]) -> Var {
        let spec: Vec<Option<Dim>> =
            shape.iter().map(|&d| if d < 0 { None } else { Some(Dim::Fixed(d as usize)) }).collect();
        self.reshape_dims(&spec, Location::caller())
    }
    /// Reshape to dims that may be symbolic.
    #[track_caller]
    pub fn reshape_to(&self, shape: &[Dim]) -> Var {
        self.reshape_dims(&shape.iter().cloned().map(Some).collect::<Vec<_>>(), Location::caller())
    }
    /// Collapses all axes after the first (Keras's Flatten).
    #[track_caller]
    pub fn flatten(&self) -> Var {
        let at = Location::caller();
        let Ok(shape) = self.shape() else {
            return self.clone();
        };
        let first = shape.first().cloned();
        self.reshape_dims(&[first, None], at)
    }
    /// Reorders axes (Theano's dimshuffle without broadcastable insertions).
    #[track_caller]
    pub fn permute(&self, perm: &[usize]) -> Var {
        self.apply(Op::Movement(MoveOp::Permute(perm.to_vec())), &[], Location::caller())
    }
    /// Swaps the last two axes (a matrix transpose).
    #[track_caller]
    pub fn t(&self) -> Var {
        let r = self.rank().unwrap_or(0);
        if r < 2 {
            return self.clone();
        }
        let mut p: Vec<usize> = (0..r).collect();
        p.swap(r - 2, r - 1);
        self.permute(&p)
    }
    /// Inserts an axis of size 1 at `axis`.
    #[track_caller]
    pub fn expand_dims(&self, axis: usize) -> Var {
        let at = Location::caller();
        let Ok(mut shape) = self.shape() else {
            return self.clone();
        };
        if axis > shape.len() {
            return self.type_error("expand_dims", format!("axis {axis} out of range"), at);
        }
        shape.insert(axis, Dim::Fixed(1));
        self.reshape_dims(&shape.into_iter().map(Some).collect::<Vec<_>>(), at)
    }
    #[track_caller]
    pub fn broadcast_to(&self, shape: &[Dim]) -> Var {
        self.apply(Op::Movement(MoveOp::BroadcastTo(shape.to_vec())), &[], Location::caller())
    }
    /// numpy slicing, one `(start, stop, step)` per leading axis (`None` = open end); axes not given
    /// are taken whole.
    #[track_caller]
    pub fn slice(&self, ranges: &[(Option<i64>, Option<i64>, i64)]) -> Var {
        let at = Location::caller();
        let r = self.rank().unwrap_or(0);
        let mut rs: Vec<SliceRange> =
            ranges.iter().map(|&(start, stop, step)| SliceRange { start, stop, step }).collect();
        if rs.len() > r {
            return self.type_error("slice", format!("{} ranges for rank {r}", rs.len()), at);
        }
        rs.resize(r, SliceRange::FULL);
        self.apply(Op::Movement(MoveOp::Slice(rs)), &[], at)
    }
    /// `x[start:stop:step]` along one axis.
    #[track_caller]
    pub fn slice_axis(&self, axis: usize, start: Option<i64>, stop: Option<i64>, step: i64) -> Var {
        let mut ranges = vec![(None, None, 1); axis];
        ranges.push((start, stop, step));
        self.slice(&ranges)
    }
    /// numpy's `take(x, indices, axis)` with integer indices (negative ones wrap).
    #[track_caller]
    pub fn take(&self, indices: &Var, axis: isize) -> Var {
        self.on_axis("take", axis, &[indices], |axis| Op::Movement(MoveOp::Take { axis }))
    }
    /// One-hot encoding of integer labels along a new last axis of size `depth`, in `dtype`.
    #[track_caller]
    pub fn one_hot(&self, depth: usize, dtype: DType) -> Var {
        let at = Location::caller();
        let Ok(idt) = self.dtype() else {
            return self.clone();
        };
        if !idt.is_int() {
            return self.type_error("one_hot", format!("labels must be integers, got {idt}"), at);
        }
        let classes = Tensor::from_f64(idt, &[depth], &(0..depth).map(|i| i as f64).collect::<Vec<_>>());
        let id = self.graph.state.borrow_mut().ir.constant(classes, at);
        let classes = Var::new(&self.graph, id);
        let r = self.rank().unwrap_or(0);
        let labels = self.expand_dims_at(r, at);
        labels.apply(Op::Binary(BinaryOp::Eq), &[&classes], at).apply(Op::Unary(UnaryOp::Cast(dtype)), &[], at)
    }
    fn expand_dims_at(&self, axis: usize, at: Loc) -> Var {
        let Ok(mut shape) = self.shape() else {
            return self.clone();
        };
        shape.insert(axis, Dim::Fixed(1));
        self.reshape_dims(&shape.into_iter().map(Some).collect::<Vec<_>>(), at)
    }

    /// `where(self, a, b)`: elements of `a` where self is true, else of `b` (Theano's switch).
    #[track_caller]
    pub fn select(&self, a: impl Operand, b: impl Operand) -> Var {
        let at = Location::caller();
        // A number branch takes the dtype of the other branch.
        let Some(like) = a.as_var().or_else(|| b.as_var()) else {
            return self.type_error("where", "at least one branch must be a variable".into(), at);
        };
        let (a, b) = (a.to_var(&like, at), b.to_var(&like, at));
        self.apply(Op::Where, &[&a, &b], at)
    }

    #[track_caller]
    pub fn softmax(&self, axis: isize) -> Var {
        self.on_axis("softmax", axis, &[], |axis| Op::Nn(NnOp::Softmax { axis }))
    }
    #[track_caller]
    pub fn log_softmax(&self, axis: isize) -> Var {
        self.on_axis("log_softmax", axis, &[], |axis| Op::Nn(NnOp::LogSoftmax { axis }))
    }
    /// Per-sample binary cross-entropy of probabilities `self` against targets `t`:
    /// `-(t log p + (1 - t) log(1 - p))`; with `p = sigmoid(z)` the optimizer makes it stable.
    #[track_caller]
    pub fn binary_crossentropy(&self, t: &Var) -> Var {
        let lp = self.log();
        let l1p = (1.0f64 - self).log();
        -(t * &lp + (1.0f64 - t) * &l1p)
    }
    /// Per-sample categorical cross-entropy of probabilities `self` (classes on the last axis)
    /// against target distributions `t`: `-sum(t log p, -1)`. After `softmax` it becomes the fused
    /// stable op.
    #[track_caller]
    pub fn categorical_crossentropy(&self, t: &Var) -> Var {
        -(t * &self.log()).sum(&[-1])
    }
    /// Categorical cross-entropy against integer class labels.
    #[track_caller]
    pub fn sparse_categorical_crossentropy(&self, labels: &Var) -> Var {
        let Ok(t) = self.ty() else {
            return self.clone();
        };
        let depth = match t.shape.last() {
            Some(Dim::Fixed(n)) => *n,
            _ => {
                return self.type_error(
                    "sparse_categorical_crossentropy",
                    format!("the class axis must have a fixed size, got {t}"),
                    Location::caller(),
                )
            }
        };
        self.categorical_crossentropy(&labels.one_hot(depth, t.dtype))
    }
    /// Softmax cross-entropy on logits `self` against target distributions `t` (the stable op).
    #[track_caller]
    pub fn softmax_cross_entropy_with_logits(&self, t: &Var) -> Var {
        let at = Location::caller();
        let r = self.rank().unwrap_or(1);
        self.apply(Op::Nn(NnOp::SoftmaxCrossEntropy { axis: r.saturating_sub(1) }), &[t], at)
    }
}

/// Concatenates along `axis`.
#[track_caller]
pub fn concat(vars: &[&Var], axis: usize) -> Var {
    let at = Location::caller();
    vars[0].apply(Op::Movement(MoveOp::Concat { axis }), &vars[1..], at)
}

/// Stacks along a new axis `axis`.
#[track_caller]
pub fn stack(vars: &[&Var], axis: usize) -> Var {
    let at = Location::caller();
    let expanded: Vec<Var> = vars.iter().map(|v| v.expand_dims_at(axis, at)).collect();
    let refs: Vec<&Var> = expanded.iter().collect();
    refs[0].apply(Op::Movement(MoveOp::Concat { axis }), &refs[1..], at)
}

/// `where(cond, a, b)`.
#[track_caller]
pub fn where_(cond: &Var, a: impl Operand, b: impl Operand) -> Var {
    cond.select(a, b)
}
