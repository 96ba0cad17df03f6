//! The user's graph: a handle (`Graph`, cheap to clone) to one growing kiln-ir graph, plus the values
//! of its shared variables. Every `Var` made from it points back here. Sources (inputs, constants,
//! shared variables, random streams), gradients and `function` start here.

use crate::function::FunctionBuilder;
use crate::var::Var;
use kiln_codegen::SharedValue;
use kiln_ir::grad::Disconnected;
use kiln_ir::ops::{Op, SharedId, SourceOp};
use kiln_ir::{DType, Dim, Error, Loc, NodeId, Result, Tensor, TensorType};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

#[derive(Default)]
pub(crate) struct State {
    pub(crate) ir: kiln_ir::Graph,
    /// Current values of shared variables, read and written by compiled functions.
    pub(crate) shared: BTreeMap<SharedId, SharedValue>,
}

#[derive(Clone, Default)]
pub struct Graph {
    pub(crate) state: Rc<RefCell<State>>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    pub(crate) fn same(&self, other: &Graph) -> bool {
        Rc::ptr_eq(&self.state, &other.state)
    }

    /// Adds a node; a type error becomes an error `Var` that every later use carries along.
    pub(crate) fn node(&self, op: Op, inputs: &[NodeId], at: Loc) -> Var {
        let r = self.state.borrow_mut().ir.add(op, inputs, at);
        Var::from_result(self, r)
    }

    /// A symbolic input: its shape may mix fixed sizes and named symbolic sizes (`Dim::sym("batch")`
    /// or just `"batch"`), bound when the compiled function is called.
    #[track_caller]
    pub fn input<D: Into<Dim>>(&self, name: &str, dtype: DType, shape: impl IntoIterator<Item = D>) -> Var {
        let ty = TensorType::new(dtype, shape.into_iter().map(Into::into).collect());
        let v =
            self.node(Op::Source(SourceOp::Input { name: name.to_string(), ty }), &[], std::panic::Location::caller());
        v.named(name)
    }

    /// A constant tensor embedded in the graph.
    #[track_caller]
    pub fn constant(&self, value: impl Into<Tensor>) -> Var {
        let id = self.state.borrow_mut().ir.constant(value.into(), std::panic::Location::caller());
        Var::new(self, id)
    }

    /// A 0-d constant of the given dtype.
    #[track_caller]
    pub fn scalar(&self, dtype: DType, value: f64) -> Var {
        self.constant(Tensor::scalar(dtype, value))
    }

    /// A shared variable holding `value`: it persists between calls of compiled functions, can be
    /// updated by them, and read or set from Rust (`Var::value`, `Var::set_value`).
    #[track_caller]
    pub fn shared(&self, name: &str, value: impl Into<Tensor>) -> Var {
        let value = value.into();
        let at = std::panic::Location::caller();
        let mut st = self.state.borrow_mut();
        let id = SharedId(st.shared.len() as u32);
        let ty = value.ty();
        st.shared.insert(id, SharedValue::new(value));
        let r = st.ir.add(Op::Source(SourceOp::Shared { id, name: name.to_string(), ty }), &[], at);
        drop(st);
        Var::from_result(self, r).named(name)
    }

    /// A stream of random numbers seeded with `seed`: its state is a shared variable that each call of
    /// a function drawing from it advances, so draws differ per call and replay from the seed.
    #[track_caller]
    pub fn rng(&self, seed: u64) -> crate::random::RandomStream {
        let state = self.shared(&format!("rng{seed}"), ndarray::arr1(&[seed as i64, 0]));
        crate::random::RandomStream { state }
    }

    /// A stream whose state is a constant: every call draws the same numbers. For gradient checks
    /// and tests that need a fixed dropout mask.
    #[track_caller]
    pub fn frozen_rng(&self, seed: u64, call: u64) -> crate::random::RandomStream {
        crate::random::RandomStream { state: self.constant(ndarray::arr1(&[seed as i64, call as i64])) }
    }

    /// d cost / d wrt for each `wrt`, as new graph nodes. The cost must be a float scalar; a `wrt`
    /// the cost does not reach is an error (see `grad_with` for zeros instead).
    #[track_caller]
    pub fn grad<const N: usize>(&self, cost: &Var, wrt: [&Var; N]) -> Result<[Var; N]> {
        let v = self.grad_with(cost, &wrt, Disconnected::Raise)?;
        Ok(v.try_into().unwrap_or_else(|_| unreachable!("one gradient per wrt")))
    }

    /// `grad` over a slice, choosing what a disconnected `wrt` gets.
    pub fn grad_with(&self, cost: &Var, wrt: &[&Var], disconnected: Disconnected) -> Result<Vec<Var>> {
        let c = self.own(cost)?;
        let w: Vec<NodeId> = wrt.iter().map(|v| self.own(v)).collect::<Result<_>>()?;
        let ids = kiln_ir::grad::grad(&mut self.state.borrow_mut().ir, c, &w, disconnected)?;
        Ok(ids.into_iter().map(|id| Var::new(self, id)).collect())
    }

    /// The Jacobian of a fixed-shape `y` with respect to `x` (shape `y.shape + x.shape`).
    pub fn jacobian(&self, y: &Var, x: &Var) -> Result<Var> {
        let (y, x) = (self.own(y)?, self.own(x)?);
        let j = kiln_ir::grad::jacobian(&mut self.state.borrow_mut().ir, y, x, Disconnected::Zero)?;
        Ok(Var::new(self, j))
    }

    /// The Hessian of a scalar cost with respect to `x` (shape `x.shape + x.shape`).
    pub fn hessian(&self, cost: &Var, x: &Var) -> Result<Var> {
        let (c, x) = (self.own(cost)?, self.own(x)?);
        let h = kiln_ir::grad::hessian(&mut self.state.borrow_mut().ir, c, x)?;
        Ok(Var::new(self, h))
    }

    /// Starts a compiled function of `inputs` returning `outputs` (add `.updates`, `.givens`, then
    /// `.compile(device)`).
    pub fn function<'a>(
        &self,
        inputs: impl IntoIterator<Item = &'a Var>,
        outputs: impl IntoIterator<Item = &'a Var>,
    ) -> FunctionBuilder {
        FunctionBuilder::new(self, inputs.into_iter().cloned().collect(), outputs.into_iter().cloned().collect())
    }

    /// Theano-style tree of the (unoptimized) expressions `vars`.
    pub fn debugprint(&self, vars: &[&Var]) -> Result<String> {
        let ids: Vec<NodeId> = vars.iter().map(|v| self.own(v)).collect::<Result<_>>()?;
        Ok(kiln_ir::print::debugprint(&self.state.borrow().ir, &ids, Default::default()))
    }

    /// GraphViz DOT of the (unoptimized) expressions `vars`.
    pub fn to_dot(&self, vars: &[&Var]) -> Result<String> {
        let ids: Vec<NodeId> = vars.iter().map(|v| self.own(v)).collect::<Result<_>>()?;
        Ok(kiln_ir::print::to_dot(&self.state.borrow().ir, &ids))
    }

    /// The node of a `Var` of this graph, or its error.
    pub(crate) fn own(&self, v: &Var) -> Result<NodeId> {
        if !self.same(&v.graph) {
            return Err(Error::Invalid("a variable of another graph was used here".into()));
        }
        v.id()
    }
}
