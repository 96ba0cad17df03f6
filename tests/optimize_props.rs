//! Property tests: random graphs give the same values optimized (every pass, fusion included) and
//! unoptimized, on the reference backend and on the CPU backend; and the CUDA backend's program for
//! them, run on the CUDA emulator, gives the reference's values. Where the unoptimized graph
//! overflows or cancels to a non-finite value the optimized one may be finite (that is what
//! stabilization is for), so only finite reference values are compared.
#![allow(clippy::cloned_ref_to_slice_refs, clippy::type_complexity)]

use kiln::prelude::*;
use kiln::testing::random_tensor;
use kiln::OptimizeOptions;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Unary(usize, usize),
    Binary(usize, usize, usize),
    Where(usize, usize, usize),
    ReduceKeep(usize, usize, usize),
    Softmax(usize, bool),
    AddConst(usize, i8),
    LogOnePlusExp(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..18usize, any::<usize>()).prop_map(|(o, a)| Step::Unary(o, a)),
        (0..7usize, any::<usize>(), any::<usize>()).prop_map(|(o, a, b)| Step::Binary(o, a, b)),
        (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(c, a, b)| Step::Where(c, a, b)),
        (0..5usize, any::<usize>(), 0..2usize).prop_map(|(o, a, ax)| Step::ReduceKeep(o, a, ax)),
        (any::<usize>(), any::<bool>()).prop_map(|(a, l)| Step::Softmax(a, l)),
        (any::<usize>(), -2i8..3).prop_map(|(a, c)| Step::AddConst(a, c)),
        any::<usize>().prop_map(Step::LogOnePlusExp),
    ]
}

const UNARY: [UnaryOp; 18] = [
    UnaryOp::Neg,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Log1p,
    UnaryOp::Expm1,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Reciprocal,
    UnaryOp::Abs,
    UnaryOp::Sign,
    UnaryOp::Tanh,
    UnaryOp::Sigmoid,
    UnaryOp::Relu,
    UnaryOp::Softplus,
    UnaryOp::Sin,
    UnaryOp::Cos,
    UnaryOp::Floor,
    UnaryOp::Ceil,
];
const BINARY: [BinaryOp; 7] =
    [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Pow, BinaryOp::Maximum, BinaryOp::Minimum];
const REDUCE: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min, ReduceOp::Prod];

/// Builds the program over three inputs of broadcast-compatible shapes; returns the outputs. With
/// `continuous`, the steps that are discontinuous in their input (floor, ceil, sign, a `where` on a
/// comparison) become continuous ones, so that a difference of a few ulps between two backends'
/// transcendentals cannot become a difference of 1 (ceil(1 + ulp) = 2).
fn build(inputs: &[Var], steps: &[Step], continuous: bool) -> Vec<Var> {
    let mut pool: Vec<Var> = inputs.to_vec();
    for s in steps {
        let pick = |i: usize| pool[i % pool.len()].clone();
        let v = match *s {
            Step::Unary(o, a) if continuous && matches!(UNARY[o], UnaryOp::Floor | UnaryOp::Ceil | UnaryOp::Sign) => {
                pick(a).tanh()
            }
            Step::Unary(o, a) => pick(a).unary(UNARY[o]),
            Step::Binary(o, a, b) => pick(a).binary(BINARY[o], pick(b)),
            Step::Where(_, a, b) if continuous => pick(a).maximum(pick(b)),
            Step::Where(c, a, b) => pick(c).gt(0.0).select(pick(a), pick(b)),
            Step::ReduceKeep(o, a, ax) => {
                let v = pick(a);
                let r = v.rank().unwrap().max(1);
                v.reduce(REDUCE[o], &[(ax % r) as isize], true)
            }
            Step::Softmax(a, log) => {
                let s = pick(a).softmax(-1);
                if log {
                    s.log()
                } else {
                    s
                }
            }
            Step::AddConst(a, c) => pick(a) + c as f64 * 0.5,
            // The textbook form that the rewrites turn into softplus. Its argument is kept above
            // -13: below, exp(v) is under 2e-6 and 1 + exp(v) keeps too few of its digits for the
            // unoptimized graph to be an oracle to 1e-9 (at -20 it is off by 5e-8, relative).
            Step::LogOnePlusExp(a) => (pick(a).maximum(-13.0).exp() + 1.0).log(),
        };
        v.check().expect("every step is well-typed on these shapes");
        pool.push(v);
    }
    // the last three values (and an input, so an input-only graph is covered too)
    pool.iter().rev().take(3).cloned().collect()
}

/// Whether `b` matches the reference values `a` to a relative 1e-9 wherever `a` is finite (near
/// exp's overflow a few ulps decide between huge and inf); `context` describes the program.
fn close(a: &[Tensor], b: &[Tensor], context: impl Fn() -> String) -> Result<(), TestCaseError> {
    for (k, (ra, rb)) in a.iter().zip(b).enumerate() {
        prop_assert_eq!(ra.shape(), rb.shape());
        for (i, (u, v)) in ra.to_f64_vec().iter().zip(rb.to_f64_vec()).enumerate() {
            if u.is_finite() && u.abs() < 1e300 {
                let ok = (u - v).abs() <= 1e-9 * (1.0 + u.abs());
                prop_assert!(ok, "output {} element {}: reference {} vs {}\n{}", k, i, u, v, context());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]
    #[test]
    fn optimized_equals_unoptimized(steps in prop::collection::vec(step(), 1..10), seed in 0u64..1000) {
        let g = Graph::new();
        let x = g.input("x", F64, [Dim::sym("n"), 4.into()]);
        let y = g.input("y", F64, [4]);
        let z = g.input("z", F64, [Dim::sym("n"), 1.into()]);
        let inputs = [x.clone(), y.clone(), z.clone()];
        let args = [random_tensor(&[3, 4], -2.0, 2.0, seed), random_tensor(&[4], -2.0, 2.0, seed + 1), random_tensor(&[3, 1], -2.0, 2.0, seed + 2)];
        let none = OptimizeOptions { rewrite: false, fuse: false };
        // The optimized graph on the reference backend (every op), and both graphs on the CPU
        // backend (the continuous variant of the program).
        for (device, opts, continuous) in
            [(Device::Reference, OptimizeOptions::default(), false), (Device::Cpu, none, true), (Device::Cpu, OptimizeOptions::default(), true)]
        {
            let outs = build(&inputs, &steps, continuous);
            let mut plain = g.function(inputs.iter(), outs.iter()).optimize(none).compile(Device::Reference).unwrap();
            let a = plain.call(&args).unwrap();
            let mut f = g.function(inputs.iter(), outs.iter()).optimize(opts).compile(device).unwrap();
            let b = f.call(&args).unwrap();
            // The CPU backend's inline math is within a few ulps of std's; chains of steep ops
            // (exp, pow) can amplify that, hence the relative bound.
            close(&a, &b, || format!("{device:?} {opts:?}\n{}", f.debugprint()))?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// The CUDA backend's program for random graphs, run on the CUDA emulator, against the
    /// reference backend running the same optimized graph: 20,000 rows, so the step is not one
    /// single-block kernel and the joins (runs of tiny kernels, kernels side by side, reductions
    /// following reductions, barriers only where needed) meet graphs nobody wrote by hand. (The
    /// unoptimized graph is no oracle here: over 20,000 rows some row's `log(softmax(x))` goes
    /// through a subnormal probability and loses digits that the stabilized log-softmax keeps.)
    #[test]
    fn cuda_program_equals_reference(steps in prop::collection::vec(step(), 1..10), seed in 0u64..1000) {
        if let Some(why) = kiln::testing::emulator_skip_reason() {
            kiln::testing::note(&format!("emulator skipped: {why}"));
            return Ok(());
        }
        let g = Graph::new();
        let x = g.input("x", F64, [Dim::sym("n"), 4.into()]);
        let y = g.input("y", F64, [4]);
        let z = g.input("z", F64, [Dim::sym("n"), 1.into()]);
        let inputs = [x.clone(), y.clone(), z.clone()];
        let n = 20_000;
        let args = [random_tensor(&[n, 4], -2.0, 2.0, seed), random_tensor(&[4], -2.0, 2.0, seed + 1), random_tensor(&[n, 1], -2.0, 2.0, seed + 2)];
        let outs = build(&inputs, &steps, true);
        let mut reference = g.function(inputs.iter(), outs.iter()).compile(Device::Reference).unwrap();
        let a = reference.call(&args).unwrap();
        let mut f = g.function(inputs.iter(), outs.iter()).compile(Device::CudaEmulator).unwrap();
        let b = f.call(&args).unwrap();
        // (sums over 20,000 rows in another order than the reference's)
        close(&a, &b, || f.generated_code())?;
    }
}
