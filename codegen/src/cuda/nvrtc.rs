//! NVRTC compilation of generated CUDA C into what the driver loads, with two caches: in the
//! process (keyed by the source and the target architecture) and on disk (`$KILN_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/kiln/ptx`, else `~/.cache/kiln/ptx`), so a second run of a program loads its
//! code instead of compiling again. For a real architecture (`sm_90`, what the runtime asks for)
//! NVRTC makes machine code (a cubin) that loads without the driver's JIT; for a virtual one
//! (`compute_90`) it makes PTX, which the driver compiles when it loads it. Cut into units, a
//! step's code is compiled on threads of their own, so that machine-code generation runs in
//! parallel rather than in the driver's loads, one after another. A disk entry is used only if the
//! source stored beside it is the same text, so a hash collision cannot load the wrong code.
//! Needs libnvrtc, not a GPU.

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

/// What NVRTC made of a source (`compile`): a cubin, or PTX text with its closing NUL.
pub type Image = Vec<u8>;

/// The process's images by (source, architecture).
type MemoryCache = Mutex<HashMap<(String, String), Image>>;

fn memory() -> &'static MemoryCache {
    static CACHE: OnceLock<MemoryCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The architecture that the checks made without a GPU compile for: an H100's, as the runtime
/// would there (machine code, so that what only the code generator checks, such as the shared
/// memory a kernel may declare, is checked too).
pub const CHECK_ARCH: &str = "sm_90";

/// Where the code of a compilation came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Compiled,
    Memory,
    Disk,
}

/// Compiles `source` for `arch` (e.g. `sm_90`), or finds it in a cache: the image `cuModuleLoadData`
/// takes (a cubin, or PTX text with its closing NUL; see the module docs).
pub fn compile(source: &str, arch: &'static str) -> Result<(Image, Origin)> {
    compile_with_cache(source, arch, cache_dir("ptx"))
}

/// The file name ending of a cached image for `arch`.
fn extension(arch: &str) -> &'static str {
    if arch.starts_with("sm_") {
        "cubin"
    } else {
        "ptx"
    }
}

/// The image of `source` for `arch` in the disk cache folder `dir`, if it is there (stored beside
/// the same source text).
pub fn read_disk_cache(source: &str, arch: &str, dir: &std::path::Path) -> Option<Image> {
    let k = key(source, arch);
    let stored = std::fs::read_to_string(dir.join(format!("{k}.cu"))).ok()?;
    let mut image = (stored == source).then(|| std::fs::read(dir.join(format!("{k}.{}", extension(arch)))).ok())??;
    // PTX cached by an earlier kiln lacks the NUL that the driver reads to.
    if extension(arch) == "ptx" && image.last() != Some(&0) {
        image.push(0);
    }
    Some(image)
}

/// `compile` with the given disk cache folder (`None`: memory cache only).
pub fn compile_with_cache(source: &str, arch: &'static str, dir: Option<PathBuf>) -> Result<(Image, Origin)> {
    let mem_key = (source.to_string(), arch.to_string());
    if let Some(image) = memory().lock().expect("cache lock").get(&mem_key) {
        return Ok((image.clone(), Origin::Memory));
    }
    if let Some(image) = dir.as_deref().and_then(|d| read_disk_cache(source, arch, d)) {
        memory().lock().expect("cache lock").insert(mem_key, image.clone());
        return Ok((image, Origin::Disk));
    }
    let image = compile_uncached(source, arch)?;
    if let Some(dir) = &dir {
        // The disk cache is an optimization: failing to write it is not an error.
        let k = key(source, arch);
        if std::fs::create_dir_all(dir).is_ok() {
            let tmp = dir.join(format!("{k}.{}.tmp", std::process::id()));
            if std::fs::write(&tmp, &image).is_ok() {
                let _ = std::fs::write(dir.join(format!("{k}.cu")), source);
                let _ = std::fs::rename(&tmp, dir.join(format!("{k}.{}", extension(arch))));
            }
        }
    }
    memory().lock().expect("cache lock").insert(mem_key, image.clone());
    Ok((image, Origin::Compiled))
}

/// Compilation units per module at most (the threads that compile them).
const MAX_PARTS: usize = 8;

/// One compilation unit of a module and its image (`compile`): `kernels` index the module's kernels.
pub struct CompiledPart {
    pub kernels: Vec<usize>,
    pub image: Image,
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
    compile_one: &(dyn Fn(&str) -> Result<(Image, Origin)> + Sync),
) -> Result<(Vec<CompiledPart>, Origin)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_PARTS);
    let units = super::print::module_parts(m, threads);
    let compiled: Vec<Result<(Image, Origin)>> = std::thread::scope(|s| {
        let handles: Vec<_> = units.iter().map(|(source, _)| s.spawn(move || compile_one(source))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Invalid("an NVRTC compilation thread panicked".into()))))
            .collect()
    });
    let mut parts = Vec::with_capacity(units.len());
    let mut origin = Origin::Memory;
    for ((_, kernels), c) in units.into_iter().zip(compiled) {
        let (image, o) = c?;
        origin = match (origin, o) {
            (Origin::Compiled, _) | (_, Origin::Compiled) => Origin::Compiled,
            (Origin::Disk, _) | (_, Origin::Disk) => Origin::Disk,
            _ => Origin::Memory,
        };
        parts.push(CompiledPart { kernels, image });
    }
    Ok((parts, origin))
}

/// One NVRTC compilation (the `cuda` feature is off: always an error).
#[cfg(not(feature = "cuda"))]
pub fn compile_uncached(_source: &str, _arch: &'static str) -> Result<Image> {
    Err(Error::Invalid(missing_reason()))
}

/// One NVRTC compilation, with its log in the error: a cubin for a real architecture (`sm_XX`),
/// else PTX with its closing NUL.
#[cfg(feature = "cuda")]
pub fn compile_uncached(source: &str, arch: &'static str) -> Result<Image> {
    Ok(run_nvrtc(source, arch, &[])?.0)
}

/// What the code generator gave one kernel (`kernel_resources`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelResources {
    pub name: String,
    pub registers: usize,
    /// Bytes of registers spilled to local memory (stores and loads), and of stack.
    pub spill_stores: usize,
    pub spill_loads: usize,
    pub stack_frame: usize,
    /// Static shared memory.
    pub shared_bytes: usize,
}

/// The registers, spills and shared memory of every kernel of `source` compiled for a real
/// architecture (`sm_XX`), as ptxas reports them: what decides a kernel's occupancy and whether it
/// waits on local memory, read without a GPU.
#[cfg(feature = "cuda")]
pub fn kernel_resources(source: &str, arch: &'static str) -> Result<Vec<KernelResources>> {
    if extension(arch) != "cubin" {
        return Err(Error::Invalid(format!("kernel resources need a real architecture (sm_XX), not {arch}")));
    }
    let (_, log) = run_nvrtc(source, arch, &["--ptxas-options=-v".to_string()])?;
    Ok(parse_ptxas_report(&log))
}

/// Kernel resources (the `cuda` feature is off: always an error).
#[cfg(not(feature = "cuda"))]
pub fn kernel_resources(_source: &str, _arch: &'static str) -> Result<Vec<KernelResources>> {
    Err(Error::Invalid(missing_reason()))
}

/// `kernel_resources` from ptxas's verbose log: an entry's lines follow its "Compiling entry
/// function 'name'" line.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    // The number before `unit` in `text` (as in "64 registers" or "0 bytes spill stores").
    fn before(text: &str, unit: &str) -> Option<usize> {
        let at = text.find(unit)?;
        text[..at].split_whitespace().last()?.parse().ok()
    }
    let mut out: Vec<KernelResources> = vec![];
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources { name, ..Default::default() });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            k.stack_frame = before(line, " bytes stack frame").unwrap_or(0);
            k.spill_stores = before(line, " bytes spill stores").unwrap_or(0);
            k.spill_loads = before(line, " bytes spill loads").unwrap_or(0);
        } else if line.contains(" registers") {
            k.registers = before(line, " registers").unwrap_or(0);
            k.shared_bytes = before(line, " bytes smem").unwrap_or(0);
        }
    }
    out
}

/// Runs NVRTC on `source` for `arch` with `extra` options: the image (a cubin for `sm_XX`, else
/// PTX with its closing NUL) and the program log; the log in the error if NVRTC rejects it.
#[cfg(feature = "cuda")]
fn run_nvrtc(source: &str, arch: &'static str, extra: &[String]) -> Result<(Image, String)> {
    use cudarc::nvrtc::{result, sys};
    if !available() {
        return Err(Error::Invalid(missing_reason()));
    }
    let text =
        std::ffi::CString::new(source).map_err(|_| Error::Invalid("generated CUDA C contains a NUL byte".into()))?;
    let failed = |what: &str, e: result::NvrtcError| Error::Invalid(format!("NVRTC failed {what}: {e:?}"));
    let program = result::create_program(&text, None).map_err(|e| failed("creating a program", e))?;
    let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    options.extend_from_slice(extra);
    // SAFETY: `program` is live until destroyed below; each call gets buffers of the size NVRTC
    // reported for it.
    let compiled = || unsafe {
        let status = result::compile_program(program, &options);
        let log = result::get_program_log(program).unwrap_or_default();
        let log: Vec<u8> = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        let log = String::from_utf8_lossy(&log).into_owned();
        if status.is_err() {
            return Err(Error::Invalid(format!("NVRTC rejected the generated CUDA C:\n{log}")));
        }
        if extension(arch) == "ptx" {
            // With its closing NUL, as `cuModuleLoadData` reads PTX.
            let ptx = result::get_ptx(program).map_err(|e| failed("reading the PTX", e))?;
            return Ok((ptx.into_iter().map(|c| c as u8).collect(), log));
        }
        let mut size = 0usize;
        sys::nvrtcGetCUBINSize(program, &mut size).result().map_err(|e| failed("sizing the cubin", e))?;
        let mut cubin = vec![0u8; size];
        sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr() as *mut std::ffi::c_char)
            .result()
            .map_err(|e| failed("reading the cubin", e))?;
        Ok((cubin, log))
    };
    let image = compiled();
    // SAFETY: created above, not used after this.
    let _ = unsafe { result::destroy_program(program) };
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_reports_are_read_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'k1_fused' for 'sm_90'\n\
            ptxas info    : Function properties for k1_fused\n\
            ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 64 registers, used 1 barriers, 19458 bytes smem\n\
            ptxas info    : Compile time = 75.122 ms\n\
            ptxas info    : Compiling entry function 'k2_run' for 'sm_90'\n\
            ptxas info    : Function properties for k2_run\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 30 registers, used 0 barriers\n";
        let k = parse_ptxas_report(log);
        assert_eq!(
            k,
            vec![
                KernelResources {
                    name: "k1_fused".into(),
                    registers: 64,
                    spill_stores: 4,
                    spill_loads: 12,
                    stack_frame: 8,
                    shared_bytes: 19458
                },
                KernelResources { name: "k2_run".into(), registers: 30, ..Default::default() },
            ]
        );
    }
}
