//! What ptxas made of a compiled module, read from its machine code (SASS) with NVIDIA's
//! `nvdisasm`, for the checks that neither the CUDA C nor ptxas's register report can make without
//! a GPU: where each loop issues its global loads relative to its multiply-adds (a tile's next slab
//! loaded after the current one's multiply-adds makes every slab wait for memory in full, which
//! ptxas did in some kernels while it did not in others of the same form), and whether a spill lies
//! inside a loop (one value stored before a loop and loaded after it costs a block two
//! instructions; one inside costs every turn), and how many loads a reduction's thread issues
//! before it first waits for one. The code is parsed as nvdisasm prints it (`-c`): a
//! kernel's instructions follow its `.text.NAME:` label, and a loop runs from a label to a
//! branch back to it (but for a branch back from code placed past the kernel's end).

use kiln_ir::{Error, Result};
use std::path::PathBuf;

/// One loop of a kernel's machine code, from its label to the branch back to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Loop {
    pub kernel: String,
    /// Float multiply-adds (`FFMA`) and tensor-core ones (`HMMA`) in the loop.
    pub multiply_adds: usize,
    /// Block barriers (`BAR.SYNC`) and shared-memory loads (`LDS`) in it: a tile's loop over its
    /// slabs has both.
    pub barriers: usize,
    pub shared_loads: usize,
    /// Each global load (`LDG`) and asynchronous copy (`LDGSTS`) in it, in order.
    pub loads: Vec<Load>,
    /// Stores and loads of spilled registers (`STL`, `LDL`) in it.
    pub spills: usize,
    /// Global stores (`STG`) in it, and the global loads that come after its first (each then
    /// waits for memory behind the stores before it, where the compiler cannot tell that they
    /// touch other elements).
    pub stores: usize,
    pub loads_after_a_store: usize,
    /// Whether no other loop lies within it (an outer loop's counts include its inner loops').
    pub innermost: bool,
    /// Every instruction in it, the branches' arms all counted.
    pub instructions: usize,
}

/// A global load or an asynchronous copy of a loop, and how many of the loop's multiply-adds come
/// before it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    pub copy: bool,
    pub after: usize,
}

impl Loop {
    /// A tiled product's loop over its slabs: an innermost loop with barriers, shared loads and
    /// many multiply-adds.
    pub fn is_slab_loop(&self) -> bool {
        self.innermost && self.barriers > 0 && self.shared_loads > 0 && self.multiply_adds >= 64
    }

    /// A walk over elements that stores: an innermost loop with global stores and no barrier
    /// (a tile's epilogue walk, or an elementwise loop).
    pub fn is_storing_walk(&self) -> bool {
        self.innermost && self.barriers == 0 && self.stores > 0
    }

    /// Whether its loads come first in each of its turns: before any multiply-add, or, in a loop
    /// that takes several turns a pass (`tiled.rs`), in runs at the start of equal shares of its
    /// multiply-adds, a share for each run (a turn's loads before its own multiply-adds, after the
    /// turn before it's).
    pub fn loads_lead_each_turn(&self) -> bool {
        let mut runs: Vec<usize> = self.loads.iter().map(|l| l.after).collect();
        runs.dedup();
        let turns = runs.len().max(1);
        let share = self.multiply_adds / turns;
        self.multiply_adds.is_multiple_of(turns) && runs.iter().enumerate().all(|(i, &after)| after == i * share)
    }

    /// Its multiply-adds and instructions (every arm of its branches counted), and its loads as
    /// `load@N` / `copy@N`, N the multiply-adds before each.
    pub fn describe(&self) -> String {
        let loads: Vec<String> =
            self.loads.iter().map(|l| format!("{}@{}", if l.copy { "copy" } else { "load" }, l.after)).collect();
        format!(
            "{:<40} {:>4} multiply-adds in {:>4} instructions a turn; {}",
            self.kernel,
            self.multiply_adds,
            self.instructions,
            loads.join(" ")
        )
    }
}

/// `nvdisasm`: `$NVDISASM`, else on the `PATH`, else in the `bin` folder beside a `lib` folder of
/// `LD_LIBRARY_PATH` (where the pip packages `nvidia-cuda-nvrtc` and `nvidia-cuda-nvdisasm` put
/// libnvrtc and it). `None` where none is found. Looked up once a process (the `PATH` lookup runs
/// it).
pub fn nvdisasm() -> Option<PathBuf> {
    static FOUND: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    FOUND.get_or_init(find_nvdisasm).clone()
}

fn find_nvdisasm() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("NVDISASM") {
        return Some(PathBuf::from(path));
    }
    let runs = |p: &PathBuf| std::process::Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success());
    let on_path = PathBuf::from("nvdisasm");
    if runs(&on_path) {
        return Some(on_path);
    }
    let libs = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    libs.split(':').filter(|d| !d.is_empty()).map(|d| PathBuf::from(d).join("../bin/nvdisasm")).find(|p| p.is_file())
}

/// The loops of every kernel of `cubin` (machine code for a real architecture).
pub fn loops(cubin: &[u8]) -> Result<Vec<Loop>> {
    Ok(parse(&listing(cubin)?))
}

/// For each kernel of `cubin`, the global loads (`LDG`) it issues from its first one up to the
/// first instruction of opcode `first_use` (such as `DADD`, a double sum's add): how many loads a
/// thread has in flight before it first waits for one, where that add takes a loaded value.
pub fn loads_ahead_of(cubin: &[u8], first_use: &str) -> Result<Vec<(String, usize)>> {
    Ok(loads_ahead_in(&listing(cubin)?, first_use))
}

fn loads_ahead_in(listing: &str, first_use: &str) -> Vec<(String, usize)> {
    let mut out = vec![];
    for function in listing.split("\n.text.").skip(1) {
        let kernel = function.split(':').next().unwrap_or_default().to_string();
        let mut loads = 0;
        for opcode in function.lines().filter_map(opcode) {
            if opcode == "LDG" {
                loads += 1;
            } else if opcode == first_use && loads > 0 {
                break;
            }
        }
        out.push((kernel, loads));
    }
    out
}

/// The opcode of a line of the listing, without its modifiers (`LDG` of `@P0 LDG.E.CONSTANT R4,
/// ...`): the first word after the address comment and any predicate; `None` for a line that
/// holds no instruction.
fn opcode(text: &str) -> Option<&str> {
    let code = text.split("*/").nth(1)?.split_whitespace();
    let op = code.into_iter().find(|w| !w.starts_with('@'))?;
    op.split('.').next()
}

/// nvdisasm's listing of `cubin`.
fn listing(cubin: &[u8]) -> Result<String> {
    let tool = nvdisasm().ok_or_else(|| {
        Error::Invalid("nvdisasm not found ($NVDISASM, the PATH, or pip's nvidia-cuda-nvdisasm beside libnvrtc)".into())
    })?;
    let file =
        std::env::temp_dir().join(format!("kiln-sass-{}-{:?}.cubin", std::process::id(), std::thread::current().id()));
    std::fs::write(&file, cubin).map_err(|e| Error::Invalid(format!("{}: {e}", file.display())))?;
    let out = std::process::Command::new(&tool).arg("-c").arg(&file).output();
    let _ = std::fs::remove_file(&file);
    let out = out.map_err(|e| Error::Invalid(format!("{}: {e}", tool.display())))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!("{}: {}", tool.display(), String::from_utf8_lossy(&out.stderr))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The loops of nvdisasm's listing.
fn parse(listing: &str) -> Vec<Loop> {
    let mut out = vec![];
    for function in listing.split("\n.text.").skip(1) {
        let kernel = function.split(':').next().unwrap_or_default().to_string();
        let lines: Vec<&str> = function.lines().collect();
        let label_at = |label: &str| lines.iter().position(|l| l.trim().strip_suffix(':') == Some(label));
        // A branch back over an unconditional `EXIT` closes no loop: it ends code that ptxas put
        // out of line after the kernel's end (a warp shuffle's path for a divergent warp, entered
        // by `BRA.DIV`), which resumes where it was entered.
        let exits = |start: usize, end: usize| {
            lines[start..end]
                .iter()
                .any(|l| opcode(l) == Some("EXIT") && !l.split("*/").nth(1).unwrap_or("").contains('@'))
        };
        let spans: Vec<(usize, usize)> = (0..lines.len())
            .filter_map(|end| {
                let target = lines[end].split("BRA `(").nth(1)?.split(')').next()?;
                label_at(target).filter(|&start| start < end && !exits(start, end)).map(|start| (start, end))
            })
            .collect();
        for &(start, end) in &spans {
            let within = |&&(s, e): &&(usize, usize)| start <= s && e <= end && (s, e) != (start, end);
            let mut l = Loop {
                kernel: kernel.clone(),
                multiply_adds: 0,
                barriers: 0,
                shared_loads: 0,
                loads: vec![],
                spills: 0,
                stores: 0,
                loads_after_a_store: 0,
                innermost: !spans.iter().any(|span| within(&span)),
                instructions: 0,
            };
            for text in &lines[start..=end] {
                let Some(opcode) = opcode(text) else { continue };
                l.instructions += 1;
                if opcode == "LDG" && l.stores > 0 {
                    l.loads_after_a_store += 1;
                }
                match opcode {
                    "FFMA" | "HMMA" => l.multiply_adds += 1,
                    "BAR" => l.barriers += 1,
                    "LDS" => l.shared_loads += 1,
                    "LDG" => l.loads.push(Load { copy: false, after: l.multiply_adds }),
                    "LDGSTS" => l.loads.push(Load { copy: true, after: l.multiply_adds }),
                    "STG" => l.stores += 1,
                    "STL" | "LDL" => l.spills += 1,
                    _ => {}
                }
            }
            out.push(l);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_ahead_of_their_first_use_are_counted_from_the_first() {
        let listing = "\n.text.k1_sum:\n\
            /*0000*/ DADD R2, RZ, RZ ;\n\
            /*0010*/ LDG.E.CONSTANT R4, desc[UR6][R8.64] ;\n\
            /*0020*/ @P0 LDG.E.CONSTANT R5, desc[UR6][R8.64+0x400] ;\n\
            /*0030*/ F2F.F64.F32 R6, R4 ;\n\
            /*0040*/ DADD R2, R2, R6 ;\n\
            /*0050*/ LDG.E.CONSTANT R4, desc[UR6][R8.64+0x800] ;\n\
            \n.text.k2_none:\n\
            /*0000*/ EXIT ;\n";
        assert_eq!(loads_ahead_in(listing, "DADD"), [("k1_sum".to_string(), 2), ("k2_none".to_string(), 0)]);
    }

    #[test]
    fn loops_are_read_from_a_listing() {
        let listing = "\n.text.k1_fused:\n\
            /*0000*/ MOV R1, c[0x0][0x28] ;\n\
            /*0010*/ STL [R1], R24 ;\n\
            .L_x_1:\n\
            /*0020*/ STS [R7], R46 ;\n\
            /*0030*/ BAR.SYNC.DEFER_BLOCKING 0x0 ;\n\
            /*0040*/ @!P6 LDG.E.CONSTANT R24, desc[UR8][R22.64] ;\n\
            /*0050*/ LDS.128 R16, [R36] ;\n\
            /*0060*/ FFMA R60, R37, R16, R60 ;\n\
            /*0070*/ FFMA R61, R37, R17, R61 ;\n\
            /*0080*/ LDGSTS.E [R3], desc[UR8][R4.64] ;\n\
            /*0088*/ STL [R1+0x4], R2 ;\n\
            /*008c*/ STG.E desc[UR8][R8.64], R9 ;\n\
            /*008e*/ @P0 LDG.E R10, desc[UR8][R12.64] ;\n\
            /*0090*/ @!P5 BRA `(.L_x_1) ;\n\
            /*00a0*/ LDL R54, [R1] ;\n\
            \n.text.k2_other:\n\
            /*0000*/ EXIT ;\n";
        let loops = parse(listing);
        assert_eq!(loops.len(), 1);
        assert!(loops[0].innermost);
        let l = &loops[0];
        assert_eq!(
            (l.kernel.as_str(), l.multiply_adds, l.barriers, l.shared_loads, l.spills),
            ("k1_fused", 2, 1, 1, 1),
            "the spill inside the loop counted, the two outside it not"
        );
        assert_eq!(
            l.loads,
            [Load { copy: false, after: 0 }, Load { copy: true, after: 2 }, Load { copy: false, after: 2 }]
        );
        assert_eq!((l.stores, l.loads_after_a_store, l.is_storing_walk()), (1, 1, false));
        assert_eq!(l.instructions, 11, "from the label's line to the branch back, the label not counted");
        assert_eq!(
            l.describe(),
            format!("{:<40}    2 multiply-adds in   11 instructions a turn; load@0 copy@2 load@2", "k1_fused")
        );
    }

    #[test]
    fn loads_lead_each_turn_of_a_loop_or_of_a_pass() {
        let with = |multiply_adds: usize, afters: &[usize]| Loop {
            kernel: "k1_fused".into(),
            multiply_adds,
            barriers: 1,
            shared_loads: 1,
            loads: afters.iter().map(|&after| Load { copy: true, after }).collect(),
            spills: 0,
            stores: 0,
            loads_after_a_store: 0,
            innermost: true,
            instructions: 100,
        };
        // One turn a loop: its loads before its multiply-adds.
        assert!(with(48, &[0, 0, 0]).loads_lead_each_turn());
        assert!(!with(48, &[0, 0, 48]).loads_lead_each_turn());
        // A pass of three turns of 24: each turn's loads before its own multiply-adds.
        assert!(with(72, &[0, 0, 24, 24, 48, 48]).loads_lead_each_turn());
        assert!(!with(72, &[0, 0, 24, 30, 48, 48]).loads_lead_each_turn());
        assert!(!with(72, &[0, 24, 72]).loads_lead_each_turn(), "the last turn's loads after its multiply-adds");
        assert!(!with(72, &[12, 36, 60]).loads_lead_each_turn(), "each turn's loads inside its multiply-adds");
    }

    #[test]
    fn a_branch_back_from_out_of_line_code_past_the_kernels_end_is_no_loop() {
        // A shuffle's path for a divergent warp: entered by BRA.DIV, placed after the kernel's
        // EXIT, branching back to just after where it was entered. Only the real loop counts.
        let listing = "\n.text.k3_fused:\n\
            /*0000*/ BRA.DIV UR5, `(.L_x_7) ;\n\
            /*0010*/ SHFL.DOWN PT, R3, R2, 0x10, 0x1f ;\n\
            .L_x_32:\n\
            /*0020*/ @P0 EXIT ;\n\
            .L_x_2:\n\
            /*0030*/ FFMA R4, R3, R3, R4 ;\n\
            /*0040*/ @!P1 BRA `(.L_x_2) ;\n\
            /*0050*/ EXIT ;\n\
            .L_x_7:\n\
            /*0060*/ WARPSYNC.ALL ;\n\
            /*0070*/ BRA `(.L_x_32) ;\n";
        let loops = parse(listing);
        assert_eq!(loops.len(), 1);
        assert_eq!((loops[0].multiply_adds, loops[0].instructions, loops[0].innermost), (1, 2, true));
    }
}
