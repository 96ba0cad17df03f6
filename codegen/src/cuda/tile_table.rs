//! Tile tables: how each float product is computed on a card, as measured there, in place of
//! kiln's estimate. kiln picks a product's tiling (tile shape, slices of the inner dimension, FMAs
//! or tensor cores, or cuBLAS and an epilogue kernel) from its shape alone, by rules of thumb made
//! for an H100; the product benchmark (`cargo bench --bench products -- --write-table FILE`) times
//! every choice for every product of the standard workloads on the card at hand and writes the
//! fastest of each to a table, and `KILN_CUDA_TILES=FILE` (or `with_tile_table`) makes the CUDA
//! backend follow it: autotuning as XLA does it, but measured once, kept in a file a person can
//! read and edit, and applied where the product's shape and layout match a line exactly.
//!
//! The format, a product a line (`#` starts a comment):
//!
//! ```text
//! 128x784x256 nn 32x32/s9
//! 784x128x256 tn tc64x64/s4
//! 4096x784x256 nn cuBLAS
//! ```
//!
//! `m`x`k`x`n` as the kernels' comments print a product, the operands' layout (`a` then `b`: `n`
//! as is, `t` stored transposed), then the choice: `cuBLAS`, `kiln` (its own estimate), or a tile
//! shape and its slice count, `tc` in front for tensor cores (3xTF32), `/pS` after for S slab
//! buffers filled by asynchronous copies, `/cluster` for a tile's slices run as a thread block
//! cluster (`cluster.rs`). A tiling that a product
//! cannot take in its step (an epilogue that does not read it element by element in order, or
//! more blocks than a grid holds) goes to cuBLAS, as a forced `TileChoice` does; the step's
//! launch list in the generated code says which.

use super::tile_staging::MAX_STAGES;
use super::tiled::{TileChoice, TileShape};
use crate::kernel::MatMul;
use kiln_ir::{Error, Result};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A float product as a tile table names it: its size and its operands' layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProductKey {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// `a` is stored as `[k, m]`.
    pub a_transposed: bool,
    /// `b` is stored as `[n, k]`.
    pub b_transposed: bool,
}

impl ProductKey {
    pub(super) fn of(mm: &MatMul) -> ProductKey {
        ProductKey { m: mm.m, k: mm.k, n: mm.n, a_transposed: mm.a_transposed, b_transposed: mm.b_transposed }
    }
}

impl std::fmt::Display for ProductKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layout = |t: bool| if t { 't' } else { 'n' };
        write!(f, "{}x{}x{} {}{}", self.m, self.k, self.n, layout(self.a_transposed), layout(self.b_transposed))
    }
}

impl TileChoice {
    /// The choice as a tile table and the product benchmark's columns name it: `cuBLAS`, `kiln`,
    /// or `[tc]RxC/sN[/pS][/cluster]` (`/pS`: S slab buffers filled by asynchronous copies;
    /// `/cluster`: the slices of a tile a thread block cluster). `None` for a partial choice that a
    /// table cannot hold.
    pub fn label(&self) -> Option<String> {
        match (self.tiled, self.tile, self.slices, self.tensor_cores, self.stages, self.cluster) {
            (Some(false), None, None, None, None, None) => Some("cuBLAS".into()),
            (None, None, None, None, None, None) => Some("kiln".into()),
            (Some(true), Some(tile), Some(slices), Some(tc), stages, cluster) => {
                let staged = match stages {
                    Some(s) if s > 1 => format!("/p{s}"),
                    _ => String::new(),
                };
                let clustered = if cluster == Some(true) { "/cluster" } else { "" };
                Some(format!("{}{}/s{slices}{staged}{clustered}", if tc { "tc" } else { "" }, tile.label()))
            }
            _ => None,
        }
    }

    /// The choice that `label` names.
    pub fn from_label(text: &str) -> Option<TileChoice> {
        match text {
            "cuBLAS" => return Some(TileChoice { tiled: Some(false), ..TileChoice::default() }),
            "kiln" => return Some(TileChoice::default()),
            _ => {}
        }
        let (tensor_cores, rest) = match text.strip_prefix("tc") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        // A line says the whole tiling: no `/pS`, one slab buffer; no `/cluster`, no cluster
        // (what the label meant before either was a default).
        let (rest, cluster) = match rest.strip_suffix("/cluster") {
            Some(rest) => (rest, Some(true)),
            None => (rest, Some(false)),
        };
        let (shape, rest) = rest.split_once("/s")?;
        let tile = TileShape::ALL.into_iter().find(|t| t.label() == shape)?;
        let (slices, stages) = match rest.split_once("/p") {
            Some((slices, stages)) => (slices, Some(stages.parse().ok().filter(|&s| (2..=MAX_STAGES).contains(&s))?)),
            None => (rest, Some(1)),
        };
        let slices = slices.parse().ok().filter(|&s| s >= 1)?;
        Some(TileChoice { stages, cluster, ..TileChoice::forced(tile, slices, tensor_cores) })
    }
}

/// How each listed product is computed; products not listed are left to kiln's estimate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TileTable {
    pub entries: BTreeMap<ProductKey, TileChoice>,
}

impl TileTable {
    /// Reads a table's text; `origin` (a file's path) is what errors name.
    pub fn parse(text: &str, origin: &str) -> Result<TileTable> {
        let mut entries = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |what: &str| {
                Error::Invalid(format!(
                    "tile table {origin}, line {}: {what} in '{line}' (expected a line such as \
                     '128x784x256 nn 64x64/s4': m x k x n, the layout of a and b (n or t), and cuBLAS, \
                     kiln or [tc]RxC/sN[/pS])",
                    i + 1
                ))
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            let [size, layout, choice] = words[..] else { return Err(bad("not three words")) };
            let dims: Vec<usize> = size
                .split('x')
                .map(|d| d.parse().ok().filter(|&d| d > 0))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("a bad size"))?;
            let [m, k, n] = dims[..] else { return Err(bad("a size without three dimensions")) };
            let transposed = |c: u8| match c {
                b'n' => Some(false),
                b't' => Some(true),
                _ => None,
            };
            let (a_transposed, b_transposed) = match layout.as_bytes() {
                [a, b] => (transposed(*a), transposed(*b)),
                _ => (None, None),
            };
            let (Some(a_transposed), Some(b_transposed)) = (a_transposed, b_transposed) else {
                return Err(bad("a bad layout"));
            };
            let choice = TileChoice::from_label(choice).ok_or_else(|| bad("an unknown choice"))?;
            let key = ProductKey { m, k, n, a_transposed, b_transposed };
            if entries.insert(key, choice).is_some() {
                return Err(bad("a product listed twice"));
            }
        }
        Ok(TileTable { entries })
    }

    /// Reads the table in the file `path`.
    pub fn from_file(path: &str) -> Result<TileTable> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Invalid(format!("tile table {path}: cannot be read: {e}")))?;
        TileTable::parse(&text, path)
    }

    /// The table's text, with `heading` as its first comment lines (the card it was measured on).
    pub fn to_text(&self, heading: &str) -> String {
        let mut text: String = heading.lines().map(|l| format!("# {l}\n")).collect();
        for (key, choice) in &self.entries {
            let label = choice.label().expect("a table holds whole choices");
            text.push_str(&format!("{key} {label}\n"));
        }
        text
    }

    /// Adds (or replaces) the line for `key`; `choice` must be one a table can hold (`label`).
    pub fn insert(&mut self, key: ProductKey, choice: TileChoice) -> Result<()> {
        if choice.label().is_none() {
            return Err(Error::Invalid(format!("a tile table cannot hold {choice:?} (a partial choice)")));
        }
        self.entries.insert(key, choice);
        Ok(())
    }
}

thread_local! {
    static TABLE: std::cell::RefCell<Option<Arc<TileTable>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with every CUDA program this thread specializes computing its products as `table`
/// says (instead of `KILN_CUDA_TILES`'s table); a `with_tile_choice` around it still wins.
pub fn with_tile_table<R>(table: TileTable, f: impl FnOnce() -> R) -> R {
    with_shared_tile_table(Arc::new(table), f)
}

/// `with_tile_table` for a table held elsewhere too (a compile's options).
pub(super) fn with_shared_tile_table<R>(table: Arc<TileTable>, f: impl FnOnce() -> R) -> R {
    let before = TABLE.with(|t| t.replace(Some(table)));
    let r = f();
    TABLE.with(|t| *t.borrow_mut() = before);
    r
}

/// The table of `KILN_CUDA_TILES`, read once (a bad file stays an error for every compile).
fn table_from_env() -> &'static std::result::Result<Option<Arc<TileTable>>, String> {
    static TABLE: std::sync::OnceLock<std::result::Result<Option<Arc<TileTable>>, String>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| match std::env::var("KILN_CUDA_TILES") {
        Err(_) => Ok(None),
        Ok(path) => TileTable::from_file(&path).map(|t| Some(Arc::new(t))).map_err(|e| format!("KILN_CUDA_TILES: {e}")),
    })
}

/// The table in force on this thread; an `Err` where `KILN_CUDA_TILES` names a file that is not a
/// table (checked before emitting, so a typo is not a silently untuned run).
pub(super) fn table() -> Result<Option<Arc<TileTable>>> {
    if let Some(t) = TABLE.with(|t| t.borrow().clone()) {
        return Ok(Some(t));
    }
    table_from_env().clone().map_err(Error::Invalid)
}

/// The table's choice for `mm`, if it lists it (an unreadable table lists nothing: `table` has
/// already turned the compile down).
pub(super) fn choice_for(mm: &MatMul) -> Option<TileChoice> {
    table().ok().flatten()?.entries.get(&ProductKey::of(mm)).copied()
}

/// The products of `kp` that a tile table can direct, with their kernels' names: float32, not
/// batched, with an epilogue to take in, and above the size that is computed inside the
/// epilogue's kernel without tiles.
pub(super) fn tunable_products(kp: &crate::kernel::KernelProgram) -> Vec<(String, ProductKey)> {
    kp.steps
        .iter()
        .filter_map(|s| match s {
            crate::kernel::Step::MatMul(mm)
                if mm.dtype == kiln_ir::DType::F32
                    && mm.batch == 1
                    && mm.epilogue.is_some()
                    && super::emit::big_product(mm) =>
            {
                Some((mm.name.clone(), ProductKey::of(mm)))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_reads_back_what_it_prints() {
        let text = "# measured on: a card\n128x784x256 nn 32x32/s9\n784x128x256 tn tc64x64/s4  # a note\n\n\
                    4096x784x256 nn cuBLAS\n256x128x256 nt kiln\n";
        let table = TileTable::parse(text, "t.txt").unwrap();
        assert_eq!(table.entries.len(), 4);
        let key = ProductKey { m: 784, k: 128, n: 256, a_transposed: true, b_transposed: false };
        assert_eq!(table.entries[&key], TileChoice::forced(TileShape::T64x64, 4, true));
        let printed = table.to_text("measured on: a card");
        assert!(printed.starts_with("# measured on: a card\n"), "{printed}");
        assert_eq!(TileTable::parse(&printed, "again").unwrap(), table);
        for label in [
            "cuBLAS",
            "kiln",
            "32x32/s1",
            "32x32k4/s7/p3",
            "tc128x128/s2",
            "128x64/s12",
            "32x32k4/s4/cluster",
            "64x64/s2/p3/cluster",
        ] {
            assert_eq!(TileChoice::from_label(label).and_then(|c| c.label()).as_deref(), Some(label));
        }
    }

    #[test]
    fn a_bad_line_is_an_error_naming_the_file_and_line() {
        for (line, what) in [
            ("128x784 nn kiln", "three dimensions"),
            ("128x784x256 nx kiln", "bad layout"),
            ("128x784x256 nn 48x48/s2", "unknown choice"),
            ("128x784x256 nn 32x32/s0", "unknown choice"),
            ("128x784x256 nn 64x64/s2/p9", "unknown choice"),
            ("128x784x256 nn", "three words"),
            ("128x0x256 nn kiln", "bad size"),
        ] {
            let err = TileTable::parse(&format!("# heading\n{line}\n"), "tiles.txt").unwrap_err().to_string();
            assert!(err.contains("tiles.txt, line 2") && err.contains(what), "{line}: {err}");
        }
        let twice = TileTable::parse("8x8x8 nn kiln\n8x8x8 nn cuBLAS\n", "t").unwrap_err().to_string();
        assert!(twice.contains("listed twice"), "{twice}");
        let missing = TileTable::from_file("/nonexistent/tiles.txt").unwrap_err().to_string();
        assert!(missing.contains("/nonexistent/tiles.txt") && missing.contains("cannot be read"), "{missing}");
    }
}
