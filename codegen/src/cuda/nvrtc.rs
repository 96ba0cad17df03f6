//! NVRTC compilation of generated CUDA C to PTX, with two caches: in the process (keyed by the
//! source and the target architecture) and on disk (`$KILN_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/kiln/ptx`, else `~/.cache/kiln/ptx`), so a second run of a program loads its PTX
//! instead of compiling again. A disk entry is used only if the source stored beside it is the
//! same text, so a hash collision cannot load the wrong code. Needs libnvrtc, not a GPU.

use kiln_ir::{Error, Result};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// Whether libnvrtc can be loaded (`LD_LIBRARY_PATH` must name its folder).
#[cfg(feature = "cuda")]
pub fn available() -> bool {
    // SAFETY: only tries to open the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}
#[cfg(not(feature = "cuda"))]
pub fn available() -> bool {
    false
}

/// The file names cudarc tries for a CUDA library, each once.
#[cfg(not(feature = "cuda"))]
pub fn library_names(lib: &str) -> String {
    format!("lib{lib}.so (not loaded: kiln was built without its `cuda` feature)")
}
/// The file names cudarc tries for a CUDA library, each once.
#[cfg(feature = "cuda")]
pub fn library_names(lib: &str) -> String {
    let mut names = cudarc::get_lib_name_candidates(lib);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names.join(", ")
}

/// Why NVRTC cannot be used, for error messages and skipped tests.
pub fn missing_reason() -> String {
    format!(
        "libnvrtc was not found (looked for {}; set LD_LIBRARY_PATH to the folder holding it, e.g. \
         /usr/local/cuda/lib64 or the `lib` folder of the pip package nvidia-cuda-nvrtc)",
        library_names("nvrtc")
    )
}

/// kiln's cache folder for `what` (`ptx`, `emu`): `$KILN_CACHE_DIR` (PTX directly in it, others
/// in a subfolder), else `$XDG_CACHE_HOME/kiln/<what>`, else `~/.cache/kiln/<what>`.
pub(crate) fn cache_dir(what: &str) -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        let d = PathBuf::from(d);
        return Some(if what == "ptx" { d } else { d.join(what) });
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("kiln").join(what))
}

/// A stable key: `DefaultHasher::new()` has fixed keys, and the stored source is compared anyway.
fn key(source: &str, arch: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut h);
    arch.hash(&mut h);
    format!("{:016x}-{arch}", h.finish())
}

fn memory() -> &'static Mutex<HashMap<(String, String), String>> {
    static CACHE: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Where the PTX of a compilation came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Compiled,
    Memory,
    Disk,
}

/// Compiles `source` for `arch` (e.g. `compute_90`), or finds it in a cache.
pub fn compile(source: &str, arch: &'static str) -> Result<(String, Origin)> {
    compile_with_cache(source, arch, cache_dir("ptx"))
}

/// `compile` with the given disk cache folder (`None`: memory cache only).
pub fn compile_with_cache(source: &str, arch: &'static str, dir: Option<PathBuf>) -> Result<(String, Origin)> {
    let mem_key = (source.to_string(), arch.to_string());
    if let Some(ptx) = memory().lock().expect("cache lock").get(&mem_key) {
        return Ok((ptx.clone(), Origin::Memory));
    }
    let k = key(source, arch);
    if let Some(dir) = &dir {
        let (cu, ptx) = (dir.join(format!("{k}.cu")), dir.join(format!("{k}.ptx")));
        if let (Ok(s), Ok(p)) = (std::fs::read_to_string(&cu), std::fs::read_to_string(&ptx)) {
            if s == source {
                memory().lock().expect("cache lock").insert(mem_key, p.clone());
                return Ok((p, Origin::Disk));
            }
        }
    }
    let ptx = compile_uncached(source, arch)?;
    if let Some(dir) = &dir {
        // The disk cache is an optimization: failing to write it is not an error.
        if std::fs::create_dir_all(dir).is_ok() {
            let tmp = dir.join(format!("{k}.{}.tmp", std::process::id()));
            if std::fs::write(&tmp, &ptx).is_ok() {
                let _ = std::fs::write(dir.join(format!("{k}.cu")), source);
                let _ = std::fs::rename(&tmp, dir.join(format!("{k}.ptx")));
            }
        }
    }
    memory().lock().expect("cache lock").insert(mem_key, ptx.clone());
    Ok((ptx, Origin::Compiled))
}

/// Compilation units per module at most (the threads that compile them).
const MAX_PARTS: usize = 8;

/// One compilation unit of a module and its PTX: `kernels` index the module's kernels.
pub struct CompiledPart {
    pub kernels: Vec<usize>,
    pub ptx: String,
}

/// Compiles a module cut into compilation units (`print::module_parts`), each on a thread of its
/// own and through the caches, so that a step of many kernels compiles cold in about the time of
/// its largest unit (NVRTC's calls may run concurrently on separate programs). The origin is the
/// slowest of the units' (compiled, else from disk, else from memory).
pub fn compile_module(m: &super::ast::Module, arch: &'static str) -> Result<(Vec<CompiledPart>, Origin)> {
    compile_units(m, &|source| compile(source, arch))
}

/// `compile_module` without the caches (to measure a cold compile).
pub fn compile_module_uncached(m: &super::ast::Module, arch: &'static str) -> Result<Vec<CompiledPart>> {
    Ok(compile_units(m, &|source| Ok((compile_uncached(source, arch)?, Origin::Compiled)))?.0)
}

/// The module's compilation units, each compiled by `compile_one` on a thread of its own.
fn compile_units(
    m: &super::ast::Module,
    compile_one: &(dyn Fn(&str) -> Result<(String, Origin)> + Sync),
) -> Result<(Vec<CompiledPart>, Origin)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_PARTS);
    let units = super::print::module_parts(m, threads);
    let compiled: Vec<Result<(String, Origin)>> = std::thread::scope(|s| {
        let handles: Vec<_> = units.iter().map(|(source, _)| s.spawn(move || compile_one(source))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Invalid("an NVRTC compilation thread panicked".into()))))
            .collect()
    });
    let mut parts = Vec::with_capacity(units.len());
    let mut origin = Origin::Memory;
    for ((_, kernels), c) in units.into_iter().zip(compiled) {
        let (ptx, o) = c?;
        origin = match (origin, o) {
            (Origin::Compiled, _) | (_, Origin::Compiled) => Origin::Compiled,
            (Origin::Disk, _) | (_, Origin::Disk) => Origin::Disk,
            _ => Origin::Memory,
        };
        parts.push(CompiledPart { kernels, ptx });
    }
    Ok((parts, origin))
}

/// One NVRTC compilation (the `cuda` feature is off: always an error).
#[cfg(not(feature = "cuda"))]
pub fn compile_uncached(_source: &str, _arch: &'static str) -> Result<String> {
    Err(Error::Invalid(missing_reason()))
}

/// One NVRTC compilation, with its log in the error.
#[cfg(feature = "cuda")]
pub fn compile_uncached(source: &str, arch: &'static str) -> Result<String> {
    if !available() {
        return Err(Error::Invalid(missing_reason()));
    }
    if source.contains('\0') {
        return Err(Error::Invalid("generated CUDA C contains a NUL byte".into()));
    }
    let opts =
        cudarc::nvrtc::CompileOptions { arch: Some(arch), options: vec!["--std=c++17".into()], ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            Error::Invalid(format!("NVRTC rejected the generated CUDA C:\n{}", log.to_string_lossy()))
        }
        other => Error::Invalid(format!("NVRTC failed: {other:?}")),
    })?;
    Ok(ptx.to_src())
}
