//! Checking gradients and backends, for kiln's tests and for users' own ops and models.
//! `verify_grad` is Theano's: it projects the output on a fixed random tensor to get a scalar cost,
//! compares kiln's symbolic gradient of that cost with central finite differences, and reports the
//! worst element. Inputs may be f64 or f32; `GradCheck::for_dtype` picks the step and tolerance.

use crate::prelude::*;
use crate::OptimizeOptions;
use kiln_ir::{Error, Result};

#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    /// Finite-difference step.
    pub eps: f64,
    /// Accepted |symbolic - numeric| <= atol + rtol * |numeric|.
    pub atol: f64,
    pub rtol: f64,
    /// Seed of the random projection.
    pub seed: u64,
    pub device: Device,
    /// Optimize the graph before differentiating numerically and symbolically.
    pub optimize: bool,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck::for_dtype(DType::F64)
    }
}

impl GradCheck {
    /// Step and tolerances suited to the precision of `dtype` (Theano's per-dtype defaults, adapted:
    /// a float32 difference quotient is only good to about sqrt of its epsilon).
    pub fn for_dtype(dtype: DType) -> GradCheck {
        let (eps, atol, rtol) = match dtype {
            DType::F32 => (1e-2, 1e-2, 1e-2),
            _ => (1e-6, 1e-5, 1e-4),
        };
        GradCheck { eps, atol, rtol, seed: 1234, device: Device::Reference, optimize: true }
    }
}

/// A small deterministic generator (SplitMix64) for projections and test data.
pub fn splitmix(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed;
    move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An f64 tensor of the given shape with values uniform in [low, high).
pub fn random_tensor(shape: &[usize], low: f64, high: f64, seed: u64) -> Tensor {
    let mut r = splitmix(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| low + (high - low) * r()).collect();
    Tensor::from_f64(DType::F64, shape, &v)
}

/// Checks the gradient of `f` at `inputs` (f64 tensors). `f` builds the expression from one input
/// variable per tensor. Returns the largest error found, or an error describing the first mismatch.
pub fn verify_grad(f: impl Fn(&Graph, &[Var]) -> Var, inputs: &[Tensor], opts: GradCheck) -> Result<f64> {
    let g = Graph::new();
    let vars: Vec<Var> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| g.input(&format!("x{i}"), t.dtype(), t.shape().iter().map(|&n| Dim::Fixed(n))))
        .collect();
    let out = f(&g, &vars);
    let oshape = out.ty()?.concrete().ok_or_else(|| Error::Invalid("verify_grad needs a fixed output shape".into()))?;
    let proj = g.constant(random_tensor(&oshape, 0.5, 1.5, opts.seed).cast(out.dtype()?));
    let cost = (&out * &proj).sum_all();
    let refs: Vec<&Var> = vars.iter().collect();
    let grads = g.grad_with(&cost, &refs, Disconnected::Raise)?;
    let mut outs = vec![&cost];
    outs.extend(grads.iter());
    let o = OptimizeOptions { rewrite: opts.optimize, fuse: opts.optimize };
    let mut both = g.function(refs.iter().copied(), outs).optimize(o).compile(opts.device)?;
    let mut cost_only = g.function(refs.iter().copied(), [&cost]).optimize(o).compile(opts.device)?;
    let symbolic = both.call(inputs)?;
    let mut worst = 0.0f64;
    for (k, x) in inputs.iter().enumerate() {
        let base = x.to_f64_vec();
        let sym = symbolic[k + 1].to_f64_vec();
        for i in 0..base.len() {
            let mut eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                let mut args = inputs.to_vec();
                args[k] = Tensor::from_f64(x.dtype(), x.shape(), &v);
                Ok(cost_only.call1(&args)?.item().expect("scalar cost"))
            };
            let numeric = (eval(opts.eps)? - eval(-opts.eps)?) / (2.0 * opts.eps);
            let err = (sym[i] - numeric).abs();
            if err.is_nan() || err > opts.atol + opts.rtol * numeric.abs() {
                return Err(Error::Invalid(format!(
                    "gradient mismatch for input {k} element {i}: symbolic {} vs numeric {numeric}",
                    sym[i]
                )));
            }
            worst = worst.max(err);
        }
    }
    Ok(worst)
}

/// Prints a note that the test harness does not capture (it writes to stderr itself), so that a
/// skipped check shows in every test run.
pub fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "note: {text}");
}

/// The devices every backend test runs on: the reference interpreter, the CPU backend, the CUDA
/// emulator (the CUDA backend's kernels run on the CPU) where a C++ compiler is found, and
/// `Device::Cuda(0)` where this machine can run it. Where one cannot run, the reason is printed
/// (once per test process), so a skipped test is never silent.
pub fn test_devices() -> Vec<Device> {
    let mut d = vec![Device::Reference, Device::Cpu];
    match emulator_skip_reason() {
        None => d.push(Device::CudaEmulator),
        Some(why) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| note(&format!("CUDA emulator tests skipped: {why}")));
        }
    }
    match cuda_skip_reason() {
        None => d.push(Device::Cuda(0)),
        Some(why) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| note(&format!("CUDA tests skipped: {why}")));
        }
    }
    d
}

/// The devices of `test_devices` that run the CUDA backend's program: the CUDA emulator and the
/// GPU, each where it can run (each one that cannot says why, once).
pub fn cuda_test_devices() -> Vec<Device> {
    test_devices().into_iter().filter(|d| matches!(d, Device::CudaEmulator | Device::Cuda(_))).collect()
}

/// Runs `f` once for `device`, and for the CUDA emulator a second time with every program emitted
/// kernel by kernel (the multi-block forms that large inputs get; small programs otherwise run as
/// one single-block kernel) on the emulator's mirrored schedule (blocks and threads in the other
/// order, which shows the races the usual one hides) and under its race check (every load and store
/// checked against CUDA's ordering rules: barriers, and between blocks the last-block protocol).
/// `f` gets a label for messages: "" or " (kernel by kernel, mirrored, race-checked)".
pub fn in_each_cuda_form(device: Device, mut f: impl FnMut(&str)) {
    use kiln_codegen::cuda::emulator::{with_mirrored_schedule, with_race_check};
    f("");
    if device == Device::CudaEmulator {
        kiln_codegen::cuda::kernel_by_kernel(|| {
            with_mirrored_schedule(|| with_race_check(|| f(" (kernel by kernel, mirrored, race-checked)")))
        });
    }
}

/// Why the CUDA emulator's tests are skipped here (`None` where it can run). `KILN_TEST_EMULATOR=0`
/// skips them on purpose.
pub fn emulator_skip_reason() -> Option<String> {
    if std::env::var("KILN_TEST_EMULATOR").is_ok_and(|v| v == "0") {
        return Some("KILN_TEST_EMULATOR=0".into());
    }
    kiln_codegen::cuda::emulator::unavailable_reason()
}

/// Why GPU tests are skipped here (`None` where a CUDA device can be used). `KILN_TEST_CUDA=0`
/// skips them on purpose.
pub fn cuda_skip_reason() -> Option<String> {
    if std::env::var("KILN_TEST_CUDA").is_ok_and(|v| v == "0") {
        return Some("KILN_TEST_CUDA=0".into());
    }
    Device::cuda_unavailable_reason()
}

/// Compiles the CUDA C that `f` generates for `args` with NVRTC (this needs libnvrtc, not a GPU),
/// cut into compilation units compiled on threads of their own, as the CUDA backend does.
/// Returns `Ok(false)` where libnvrtc is not found (and says so once on stderr).
pub fn check_cuda_source_compiles(f: &Function, args: &[Tensor]) -> Result<bool> {
    if !kiln_codegen::cuda::nvrtc::available() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| note(&format!("NVRTC checks skipped: {}", kiln_codegen::cuda::nvrtc::missing_reason())));
        return Ok(false);
    }
    kiln_codegen::cuda::nvrtc::compile_module(&f.cuda_module(args)?, kiln_codegen::cuda::nvrtc::CHECK_ARCH)?;
    Ok(true)
}

/// The CUDA C that `f` generates for `args`, after checking that NVRTC compiles it where
/// libnvrtc is found (`check_cuda_source_compiles`).
pub fn checked_cuda_source(f: &Function, args: &[Tensor]) -> Result<String> {
    check_cuda_source_compiles(f, args)?;
    f.cuda_source(args)
}

/// Checks that `outs` of graph `g`, computed from `ins` set to `args`, come out of the CUDA
/// emulator as the reference backend computes them (to 1e-5), or notes why the emulator is
/// skipped here. Panics (it is a test's check) where they differ.
pub fn emulated_agrees(g: &Graph, ins: &[&Var], outs: &[&Var], args: &[Tensor]) {
    if let Some(why) = emulator_skip_reason() {
        note(&format!("emulator check skipped: {why}"));
        return;
    }
    let mut emu = g.function(ins.to_vec(), outs.to_vec()).compile(Device::CudaEmulator).unwrap();
    let mut reference = g.function(ins.to_vec(), outs.to_vec()).compile(Device::Reference).unwrap();
    let (a, b) = (emu.call(args).unwrap(), reference.call(args).unwrap());
    for (x, y) in a.iter().zip(&b) {
        assert!(x.allclose(y, 1e-5, 1e-5), "differs by {}", x.max_abs_diff(y));
    }
}

/// The forms the CUDA tests force a tiled product into, for one tile shape: whole and in 4 slices,
/// by float32 FMAs and on tensor cores (3xTF32); with slabs copied asynchronously (whole in 3
/// buffers, 4 slices in 2, and both in as many as fit of 8, so that the buffers wrap around a
/// count that is not a power of two and a slice's every slab may be in flight; on tensor cores,
/// split by the block once landed, whole in 3 and 4 slices in as many as fit of 8); and with a
/// tile's slices as a thread block cluster (4 by FMAs, 3 on tensor cores with one buffer and with
/// 3, 3 by FMAs with 3 buffers and with up to 8; used where the whole tile fits beside its slabs,
/// or in them).
pub fn tile_forms(tile: kiln_codegen::cuda::TileShape) -> Vec<kiln_codegen::cuda::TileChoice> {
    use kiln_codegen::cuda::TileChoice;
    let forms = [
        (1, false, 1, false),
        (4, false, 1, false),
        (1, true, 1, false),
        (4, true, 1, false),
        (1, false, 3, false),
        (4, false, 2, false),
        (1, false, 8, false),
        (4, false, 8, false),
        (1, true, 3, false),
        (4, true, 8, false),
        (4, false, 1, true),
        (3, true, 1, true),
        (3, true, 3, true),
        (3, false, 3, true),
        (3, false, 8, true),
    ];
    forms
        .into_iter()
        .map(|(slices, tensor_cores, stages, cluster)| TileChoice {
            stages: Some(stages),
            cluster: Some(cluster),
            ..TileChoice::forced(tile, slices, tensor_cores)
        })
        .collect()
}
