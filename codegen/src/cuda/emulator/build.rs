//! Turns a printed CUDA module into a shared library the emulator can call: the shim (CUDA's
//! built-ins for the CPU), the module's text as printed for NVRTC (each shared array's declaration
//! followed, on its line, by the shim's garbage fill), and one C entry point per kernel
//! (`kiln_emu_<kernel>(args, grid, block, mirrored)`, arguments as cuLaunchKernel takes them,
//! returning the first fault the launch met: undefined behaviour, a barrier or shuffle that not
//! every thread reaches, with the race check a conflicting access). Compiled by the system's C++
//! compiler (`$CXX`, else `g++`) with undefined-behaviour checks (and for the race check, the
//! thread sanitizer's instrumentation), and cached on disk by source, like NVRTC's output.

use crate::cuda::ast::{Kernel, Module, Stmt};
use kiln_ir::{Error, Result};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

const SHIM: &str = include_str!("shim.h");
const CLUSTER: &str = include_str!("cluster.h");
const RACE: &str = include_str!("race.h");

/// The undefined behaviour checked in emulated kernels (the shim's handlers report it as an error):
/// what a GPU faults on (misaligned vector access) or computes differently from a CPU.
const SANITIZE: &str = "-fsanitize=alignment,bounds,shift,integer-divide-by-zero,signed-integer-overflow,vla-bound";

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".into())
}

/// The flag that bounds-checks a struct's last array too: a kernel's shared arrays are members of
/// one type where they overlap (`side.rs`) or pass 48 KiB (`dynamic_shared.rs`), and a compiler
/// otherwise takes a last member for a flexible array and checks no index of it (GCC's
/// `bounds-strict`; clang's strict flexible arrays).
fn strict_trailing_bounds() -> &'static str {
    static FLAG: OnceLock<&'static str> = OnceLock::new();
    FLAG.get_or_init(|| {
        let version = std::process::Command::new(compiler()).arg("--version").output();
        match version {
            Ok(o) if String::from_utf8_lossy(&o.stdout).contains("clang") => "-fstrict-flex-arrays=3",
            _ => "-fsanitize=bounds-strict",
        }
    })
}

/// Why the emulator cannot run here, or `None` if it can (a C++ compiler answers `--version`).
pub fn unavailable_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            let cxx = compiler();
            match std::process::Command::new(&cxx).arg("--version").output() {
                Ok(o) if o.status.success() => None,
                _ => Some(format!(
                    "the CUDA emulator needs a C++ compiler: `{cxx} --version` failed (set CXX, or install g++)"
                )),
            }
        })
        .clone()
}

/// Whether a kernel waits on its block or warp (then its threads run as fibers): a barrier, a
/// shuffle, or a tensor-core multiply-add.
fn waits(body: &[Stmt]) -> bool {
    crate::cuda::ast::syncs(body)
        || crate::cuda::ast::calls(body, &|f| {
            f.starts_with("__shfl") || f == crate::cuda::mma::MMA_HELPER || f == crate::cuda::cluster::SYNC_HELPER
        })
}

fn entry_point(k: &Kernel) -> String {
    let args: Vec<String> = k.params.iter().enumerate().map(|(i, p)| format!("({}*)args[{i}]", p.ty.name())).collect();
    format!(
        "static void kiln_emu_body_{name}(void** args) {{ {name}({args}); }}\n\
         extern \"C\" __attribute__((visibility(\"default\"))) const char* kiln_emu_{name}(void** args, \
         unsigned gx, unsigned gy, unsigned bx, unsigned by, int mirrored) {{\n    \
         kiln_emu::fault[0] = 0;\n    \
         kiln_emu::launch(gx, gy, bx, by, {waits}, kiln_emu_body_{name}, args, mirrored != 0, {cluster});\n    \
         return kiln_emu::fault[0] ? kiln_emu::fault : nullptr;\n}}\n",
        name = k.name,
        args = args.join(", "),
        waits = waits(&k.body),
        cluster = k.launch.cluster
    )
}

/// `source` with `KILN_EMU_SHARED(name);` after each shared array's declaration, on its line (so
/// that line numbers stay those of the module NVRTC compiles): the shim fills the array with
/// garbage when a block first reaches it, as a GPU's shared memory would hold. A kernel's dynamic
/// shared memory (`dynamic_shared.rs`), which a launch sizes on a GPU, becomes an array of the
/// size of the type laid over it, per block as the static arrays are.
fn poisoned_shared(source: &str) -> String {
    use crate::cuda::print::{DYNAMIC_SHARED_ARRAY, DYNAMIC_SHARED_DECLARATION, DYNAMIC_SHARED_TYPE};
    let mut out = String::with_capacity(source.len() + 1024);
    // A side-by-side kernel's union of its sections' arrays is filled where its declaration ends.
    let union_end = format!("}} {};", crate::cuda::side::SHARED_UNION);
    let dynamic_union = format!("{DYNAMIC_SHARED_TYPE}& {} = ", crate::cuda::side::SHARED_UNION);
    // Within the type laid over dynamic shared memory, array declarations are its members.
    let mut in_type = false;
    for line in source.lines() {
        let declaration = line.trim_start();
        if declaration.ends_with(&format!(" {DYNAMIC_SHARED_TYPE} {{")) {
            in_type = true;
        } else if in_type && declaration == "};" {
            in_type = false;
        }
        if in_type {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if declaration == DYNAMIC_SHARED_DECLARATION {
            let indent = &line[..line.len() - declaration.len()];
            out.push_str(&format!(
                "{indent}alignas(16) static thread_local unsigned char {DYNAMIC_SHARED_ARRAY}[sizeof({DYNAMIC_SHARED_TYPE})];\n"
            ));
            continue;
        }
        out.push_str(line);
        if declaration == union_end || declaration.starts_with(&dynamic_union) {
            out.push_str(&format!(" KILN_EMU_SHARED({});", crate::cuda::side::SHARED_UNION));
        } else if (declaration.starts_with("__shared__ ") && !declaration.starts_with("__shared__ union"))
            || declaration.starts_with("alignas(")
        {
            if let Some(name) = declaration.split('[').next().and_then(|d| d.split_whitespace().last()) {
                out.push_str(&format!(" KILN_EMU_SHARED({name});"));
            }
        }
        out.push('\n');
    }
    out
}

/// What opens a unit compiled for the race check (see the shim): the shim's race check on, and the
/// compiler's thread-sanitizer instrumentation calling it on every load and store.
const RACE_CHECK: &str = "#define KILN_EMU_RACECHECK 1\n";

/// The C++ compilation unit for a module printed as `source`; `race_check`: with every load and
/// store checked against CUDA's ordering rules (slower).
pub fn unit(module: &Module, source: &str, race_check: bool) -> String {
    let source = poisoned_shared(source);
    let race = if race_check { RACE_CHECK } else { "" };
    let mut out = format!("{race}{SHIM}\n{CLUSTER}\n{RACE}\n#line 1 \"kiln-module.cu\"\n{source}\n");
    for k in &module.kernels {
        out.push_str(&entry_point(k));
    }
    out
}

fn cache_dir() -> PathBuf {
    crate::cuda::nvrtc::cache_dir("emu").unwrap_or_else(|| std::env::temp_dir().join("kiln-emu"))
}

fn loaded() -> &'static Mutex<HashMap<String, Arc<libloading::Library>>> {
    static LOADED: OnceLock<Mutex<HashMap<String, Arc<libloading::Library>>>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// Runs the C++ compiler with `args`; an error quoting its complaint about `unit` if it fails.
fn run_compiler<'a>(args: impl IntoIterator<Item = &'a std::ffi::OsStr>, unit: &std::path::Path) -> Result<()> {
    let out = std::process::Command::new(compiler())
        .args(args)
        .output()
        .map_err(|e| Error::Invalid(format!("running {}: {e}", compiler())))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "the CUDA emulator could not compile the generated CUDA C as C++ ({}):\n{}",
        unit.display(),
        String::from_utf8_lossy(&out.stderr)
    )))
}

/// The compiled library of a C++ unit (compiled once per text; kept loaded for the process).
pub fn library(unit: &str) -> Result<Arc<libloading::Library>> {
    if let Some(lib) = loaded().lock().expect("emulator cache").get(unit) {
        return Ok(lib.clone());
    }
    if let Some(why) = unavailable_reason() {
        return Err(Error::Invalid(why));
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (unit, SANITIZE, strict_trailing_bounds()).hash(&mut h);
    let key = format!("{:016x}", h.finish());
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::Invalid(format!("creating {}: {e}", dir.display())))?;
    let (cpp, so) = (dir.join(format!("{key}.cpp")), dir.join(format!("{key}.so")));
    // A cached library is used only if the text stored beside it is this unit.
    let cached = std::fs::read_to_string(&cpp).is_ok_and(|s| s == unit) && so.exists();
    if !cached {
        let tag = format!("{}.{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "");
        let (tmp_cpp, tmp_so) = (dir.join(format!("{key}.{tag}.cpp")), dir.join(format!("{key}.{tag}.so")));
        std::fs::write(&tmp_cpp, unit).map_err(|e| Error::Invalid(format!("writing {}: {e}", tmp_cpp.display())))?;
        let tmp_o = tmp_so.with_extension("o");
        // Compiled with the checks, linked without them: the shim defines their handlers, so the
        // library needs no sanitizer runtime (which the driver would link when asked to check).
        let compile = [
            "-std=c++17",
            "-O1",
            "-fPIC",
            "-fvisibility=hidden",
            "-fno-strict-aliasing",
            "-ffp-contract=off",
            "-w",
            SANITIZE,
            strict_trailing_bounds(),
            "-fsanitize-recover=all",
            "-c",
        ];
        // The race check's instrumentation calls hooks the shim defines; linked with `-z defs`, a
        // hook the shim lacks is an error here rather than a crash in a kernel.
        let (instrument, link_check): (&[&str], &[&str]) =
            if unit.contains(RACE_CHECK) { (&["-fsanitize=thread"], &["-Wl,-z,defs"]) } else { (&[], &[]) };
        let (source, object, shared_object) = (tmp_cpp.as_os_str(), tmp_o.as_os_str(), tmp_so.as_os_str());
        let compile = compile.iter().chain(instrument).map(|a| a.as_ref());
        run_compiler(compile.chain([source, "-o".as_ref(), object]), &tmp_cpp)?;
        let link = ["-shared"].iter().chain(link_check).map(|a| a.as_ref());
        run_compiler(link.chain(["-o".as_ref(), shared_object, object]), &tmp_cpp)?;
        let _ = std::fs::remove_file(&tmp_o);
        // Renames are atomic: a concurrent compile of the same unit leaves one whole library.
        let _ = std::fs::rename(&tmp_so, &so);
        let _ = std::fs::rename(&tmp_cpp, &cpp);
    }
    // SAFETY: the library is kiln's own generated code; its initializers only set up statics.
    let lib = unsafe { libloading::Library::new(&so) }
        .map_err(|e| Error::Invalid(format!("loading {}: {e}", so.display())))?;
    let lib = Arc::new(lib);
    loaded().lock().expect("emulator cache").insert(unit.to_string(), lib.clone());
    Ok(lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_arrays_are_poisoned_on_their_own_line() {
        let source = "__global__ void k() {\n  __shared__ float s[4];\n  alignas(16) __shared__ float t[8];\n  \
                      s[0] = t[1];\n}\n";
        let out = poisoned_shared(source);
        assert_eq!(out.lines().count(), source.lines().count(), "line numbers stay those NVRTC reports");
        assert!(out.contains("  __shared__ float s[4]; KILN_EMU_SHARED(s);\n"), "{out}");
        assert!(out.contains("  alignas(16) __shared__ float t[8]; KILN_EMU_SHARED(t);\n"), "{out}");
        assert!(out.contains("  s[0] = t[1];\n"), "{out}");
        // A side-by-side kernel's union is filled as a whole, where its declaration ends.
        let source = "  __shared__ union {\n    struct { float s[4]; } s0;\n  } smem;\n  smem.s0.s[0] = 1.0f;\n";
        let out = poisoned_shared(source);
        assert_eq!(out.lines().count(), source.lines().count());
        assert_eq!(out.matches("KILN_EMU_SHARED").count(), 1, "{out}");
        assert!(out.contains("  } smem; KILN_EMU_SHARED(smem);\n"), "{out}");
    }

    #[test]
    fn dynamic_shared_memory_is_an_array_the_size_of_its_type_filled_where_it_is_named() {
        let source = "  struct kiln_shared {\n    alignas(16) float t[16384];\n  };\n  \
                      static_assert(sizeof(kiln_shared) == 65536, \"\");\n  \
                      extern __shared__ __align__(16) unsigned char kiln_shared_bytes[];\n  \
                      kiln_shared& smem = *reinterpret_cast<kiln_shared*>(kiln_shared_bytes);\n  smem.t[0] = 1.0f;\n";
        let out = poisoned_shared(source);
        assert_eq!(out.lines().count(), source.lines().count(), "line numbers stay those NVRTC reports");
        assert!(out.contains("    alignas(16) float t[16384];\n"), "a member, not an array to fill: {out}");
        assert!(
            out.contains("  alignas(16) static thread_local unsigned char kiln_shared_bytes[sizeof(kiln_shared)];\n"),
            "{out}"
        );
        assert!(out.contains("(kiln_shared_bytes); KILN_EMU_SHARED(smem);\n"), "{out}");
        assert_eq!(out.matches("KILN_EMU_SHARED").count(), 1, "{out}");
    }
}
