//! `Function::profile`: the time per step of a function compiled with `KILN_CPU_PROFILE=1` (its
//! own test binary, since the variable is read by every compile in the process).

use kiln::prelude::*;
use kiln::testing::random_tensor;

#[test]
fn a_profiled_function_reports_each_step() {
    std::env::set_var("KILN_CPU_PROFILE", "1");
    let g = Graph::new();
    let x = g.input("x", F32, [64, 32]);
    let w = g.input("w", F32, [32, 16]);
    let mut f = g.function([&x, &w], [&x.matmul(&w).relu().sum_all()]).compile(Device::Cpu).unwrap();
    let args = [random_tensor(&[64, 32], -1.0, 1.0, 1).cast(F32), random_tensor(&[32, 16], -1.0, 1.0, 2).cast(F32)];
    for _ in 0..3 {
        f.call(&args).unwrap();
    }
    let p = f.profile().expect("KILN_CPU_PROFILE=1 asks for a profile");
    assert_eq!(p.backend, "CPU");
    assert!(!p.steps.is_empty() && p.seconds_per_call > 0.0, "{p}");
    let shares: f64 = p.steps.iter().map(|s| s.share).sum();
    assert!((shares - 1.0).abs() < 1e-9, "{p}");
    assert!(p.steps.windows(2).all(|w| w[0].share >= w[1].share), "{p}");
    assert!(p.to_string().starts_with("kiln CPU profile: "), "{p}");
    // Without the variable, no profile is kept.
    std::env::remove_var("KILN_CPU_PROFILE");
    let f = g.function([&x, &w], [&x.matmul(&w)]).compile(Device::Cpu).unwrap();
    assert!(f.profile().is_none());
}
