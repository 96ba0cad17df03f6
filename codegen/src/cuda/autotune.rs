//! Autotuning a step on the card at hand: how each of its float products is computed (cuBLAS and
//! an epilogue kernel, or kiln's tiles of one shape, slice count and number of slab buffers), and
//! for the whole step programmatic dependent launch, sliced tiles as thread block clusters or not,
//! cuBLAS's products through cuBLASLt or not, row tails or not, joined kernels' sections longest
//! first or in step order, the number of streams, two size bounds of the kernel joins and their
//! reach, chosen by timing the whole step,
//! not each product alone. The rules of `TilePlan::for_product` are estimates fitted to one
//! card's product table; a product timed on its own misses what the step around it does (two
//! streams, kernels side by side, what the L2 cache already holds). So the search times the step
//! itself, as XLA's and `torch.compile`'s autotuners do, and keeps what it finds in kiln's cache
//! folder, keyed by the step's code and the card, so that a later run finds it at once (`cache`).
//!
//! The search is a coordinate descent: from kiln's own choices, each product in turn (the largest
//! first) tries every candidate with the others held at the best found so far, then the step tries
//! each value of its knobs in turn.
//! A candidate whose generated code equals one already timed (a tiling the product cannot take
//! falls back to cuBLAS; a slice count past the inner dimension is cut to fit) is not timed again,
//! and the best is timed afresh before each product, so that a candidate is measured against the
//! same moment's noise; it must be faster by more than `MARGIN` to be taken. Every setting is
//! correct (a tile table changes how a product is computed, never what), so a stale or mistaken
//! cache entry can only cost speed. This module holds the search and the cache; the timing (which
//! calls a function) is the caller's (`kiln::Function::autotune`).

use super::tile_plan::DEFAULT_STAGES;
use super::tile_staging::MAX_STAGES;
use super::tile_table::{ProductKey, TileTable};
use super::tiled::{TileChoice, TileShape};
use crate::CompileOptions;
use kiln_ir::Result;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

mod cache;
pub use cache::{cache_key, cache_path, default_cache_folder, parse_setting, read_cached, setting_text, write_cached};

/// The step's knobs as the lines of a cache entry (`cache`) name them: whether dependent launch
/// won (`on` or `off`), clusters (`on`, `off`, or `kiln`: as the card has it), cuBLASLt, row
/// tails, longest-first sections, chain joins, quad copies, deep slabs, tensor cores and passes of
/// turns (`on`, `off`, or `kiln`: as the environment or kiln's default has it), and the step's
/// numbers (each a number, or `kiln`: as kiln has it), with the most each may be.
const SWITCHES: usize = 10;
const NUMBERS: usize = 4;
const SWITCH_LINES: [&str; SWITCHES] = [
    "dependent-launch",
    "clusters",
    "cublaslt",
    "row-tails",
    "longest-first",
    "chain-joins",
    "quad-copies",
    "deep-slabs",
    "tensor-cores",
    "turn-passes",
];
const NUMBER_LINES: [(&str, usize); NUMBERS] =
    [("streams", 8), ("run-macs", usize::MAX), ("dot-depth", usize::MAX), ("lookahead", usize::MAX)];

/// How much faster than the best so far a candidate must be to replace it: less is within the
/// noise of a shared machine's step times.
pub const MARGIN: f64 = 0.01;

/// What the search varies: a tile table for the products, and for the whole step dependent
/// launch, sliced tiles as thread block clusters, the number of streams, and the bounds of
/// products in single-block runs and of the small products tiled for their long dots (`None`: as
/// kiln has them, from the environment or its defaults).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Setting {
    pub table: TileTable,
    pub dependent_launch: bool,
    /// Every sliced tile's slices a thread block cluster (`Some(true)`) or not (`Some(false)`)
    /// where its table line does not say; `None`: as kiln has it (`KILN_CUDA_CLUSTERS`, else
    /// wherever the card has clusters).
    pub clusters: Option<bool>,
    /// `None`: as kiln plans it (`KILN_CUDA_STREAMS`, else two where the memory allows).
    pub streams: Option<usize>,
    /// `KILN_CUDA_RUN_MACS`'s bound.
    pub run_macs: Option<usize>,
    /// `KILN_CUDA_DOT_DEPTH`'s bound.
    pub dot_depth: Option<usize>,
    /// cuBLAS's products through cuBLASLt (`Some(true)`) or not (`Some(false)`); `None`: as
    /// kiln has it (`KILN_CUDA_LT`, else not).
    pub cublaslt: Option<bool>,
    /// Groups over a tiled product's rows joined at the end of its kernel (`Some(true)`) or not;
    /// `None`: as kiln has it (`KILN_CUDA_ROW_TAIL`, else joined).
    pub row_tails: Option<bool>,
    /// A joined kernel's sections taking the grid longest first (`Some(true)`) or in step order;
    /// `None`: as kiln has it (`KILN_CUDA_LONGEST_FIRST`, else longest first).
    pub longest_first: Option<bool>,
    /// `KILN_CUDA_LOOKAHEAD`'s reach.
    pub lookahead: Option<usize>,
    /// Launches joining kernels the step waits for even where they hold them up (`Some(true)`) or
    /// not; `None`: as kiln has it (`KILN_CUDA_CHAIN_JOINS`, else not on several streams).
    pub chain_joins: Option<bool>,
    /// Slabs contiguous along a tile's side copied 16 bytes a copy (`Some(true)`) or a word at a
    /// time; `None`: as kiln has it (`KILN_CUDA_QUAD_COPIES`, else by quads).
    pub quad_copies: Option<bool>,
    /// Unsliced tiles' slabs twice their shape's depth where the inner dimension allows
    /// (`Some(true)`) or the shape's; `None`: as kiln has it (`KILN_CUDA_DEEP_SLABS`, else deep).
    pub deep_slabs: Option<bool>,
    /// Tiles that no table line fixes computed on tensor cores (`Some(true)`) or by FMAs; `None`:
    /// as kiln has it (`KILN_CUDA_TF32X3`, else by FMAs).
    pub tensor_cores: Option<bool>,
    /// Every tile's slab loop in passes of turns (`Some(true)`) or in single turns; `None`: as
    /// kiln has it (`KILN_CUDA_TURN_PASSES`, else in passes on tensor cores only).
    pub turn_passes: Option<bool>,
}

impl Setting {
    /// The compile options that give a function this setting.
    pub fn compile_options(&self) -> CompileOptions {
        CompileOptions {
            tile_table: Some(Arc::new(self.table.clone())),
            dependent_launch: self.dependent_launch,
            clusters: self.clusters,
            streams: self.streams,
            run_macs: self.run_macs,
            dot_depth: self.dot_depth,
            cublaslt: self.cublaslt,
            row_tails: self.row_tails,
            longest_first: self.longest_first,
            lookahead: self.lookahead,
            chain_joins: self.chain_joins,
            quad_copies: self.quad_copies,
            deep_slabs: self.deep_slabs,
            tensor_cores: self.tensor_cores,
            turn_passes: self.turn_passes,
        }
    }

    /// The step's switches, in `SWITCH_LINES`' order (`None`: as kiln has it).
    fn switches(&self) -> [Option<bool>; SWITCHES] {
        // Read through `optional_switches_mut`, so that the order is written once.
        let mut copy = self.clone();
        let mut all = [Some(self.dependent_launch); SWITCHES];
        for (slot, on) in all[1..].iter_mut().zip(copy.optional_switches_mut()) {
            *slot = *on;
        }
        all
    }

    /// The switches but dependent launch (which is never `None`).
    fn optional_switches_mut(&mut self) -> [&mut Option<bool>; SWITCHES - 1] {
        [
            &mut self.clusters,
            &mut self.cublaslt,
            &mut self.row_tails,
            &mut self.longest_first,
            &mut self.chain_joins,
            &mut self.quad_copies,
            &mut self.deep_slabs,
            &mut self.tensor_cores,
            &mut self.turn_passes,
        ]
    }

    /// The step's numbers, in `NUMBER_LINES`' order (`None`: as kiln has it).
    fn numbers(&self) -> [Option<usize>; NUMBERS] {
        [self.streams, self.run_macs, self.dot_depth, self.lookahead]
    }

    fn numbers_mut(&mut self) -> [&mut Option<usize>; NUMBERS] {
        [&mut self.streams, &mut self.run_macs, &mut self.dot_depth, &mut self.lookahead]
    }

    /// The step's knobs in a line, as a cache entry names them: `dependent-launch off, clusters
    /// kiln, cublaslt kiln, row-tails kiln, longest-first kiln, chain-joins kiln, quad-copies kiln,
    /// deep-slabs kiln, tensor-cores kiln, turn-passes kiln, streams 2, run-macs kiln, dot-depth
    /// kiln, lookahead kiln`.
    pub fn knobs(&self) -> String {
        let on_off = |on: Option<bool>| match on {
            Some(true) => "on",
            Some(false) => "off",
            None => "kiln",
        };
        let mut parts: Vec<String> =
            SWITCH_LINES.iter().zip(self.switches()).map(|(name, on)| format!("{name} {}", on_off(on))).collect();
        for ((name, _), value) in NUMBER_LINES.iter().zip(self.numbers()) {
            parts.push(format!("{name} {}", value.map_or("kiln".to_string(), |n| n.to_string())));
        }
        parts.join(", ")
    }

    /// `self` with `key` computed as `choice` (`kiln`'s own choice: no line for it).
    fn with(&self, key: ProductKey, choice: TileChoice) -> Setting {
        let mut s = self.clone();
        if choice == TileChoice::default() {
            s.table.entries.remove(&key);
        } else {
            s.table.entries.insert(key, choice);
        }
        s
    }
}

/// What a search tries: its candidates for each product, then for the whole step dependent
/// launch (if `dependent_launch`), sliced tiles as clusters (if `clusters`), cuBLAS's products
/// through cuBLASLt (if `cublaslt`: a step with none has the same code and is passed over), row
/// tails and not (if `row_tails`), joined sections longest first and in step order (if
/// `longest_first`), launches that would hold up a kernel the step waits for joining it and not
/// (if `chain_joins`), slabs copied by quads and by words (if `quad_copies`), unsliced tiles'
/// slabs deep and not (if `deep_slabs`), the tiles kiln picks on tensor cores and by FMAs (if
/// `tensor_cores`), every slab loop in passes of turns and in single turns (if `turn_passes`),
/// each number of streams of `streams`, each bound of
/// `run_macs` and each of `dot_depth`, and each reach of `lookahead`. Each switch is tried both
/// ways (the way that is kiln's own has its code and is passed over), so that a setting from the
/// environment is tried against the other too.
#[derive(Clone, Debug, PartialEq)]
pub struct Space {
    pub candidates: Vec<TileChoice>,
    pub dependent_launch: bool,
    pub clusters: bool,
    pub cublaslt: bool,
    pub row_tails: bool,
    pub longest_first: bool,
    pub chain_joins: bool,
    pub quad_copies: bool,
    pub deep_slabs: bool,
    pub tensor_cores: bool,
    pub turn_passes: bool,
    pub streams: Vec<usize>,
    pub run_macs: Vec<usize>,
    pub dot_depth: Vec<usize>,
    pub lookahead: Vec<usize>,
}

impl Space {
    /// Whether each of the step's switches is tried, in `SWITCH_LINES`' order.
    fn switches(&self) -> [bool; SWITCHES] {
        let s = self;
        [
            s.dependent_launch,
            s.clusters,
            s.cublaslt,
            s.row_tails,
            s.longest_first,
            s.chain_joins,
            s.quad_copies,
            s.deep_slabs,
            s.tensor_cores,
            s.turn_passes,
        ]
    }

    /// The values each of the step's numbers is tried at, in `NUMBER_LINES`' order.
    fn numbers(&self) -> [&[usize]; NUMBERS] {
        [&self.streams, &self.run_macs, &self.dot_depth, &self.lookahead]
    }

    /// The settings of the step's round `knob` (the switches in `SWITCH_LINES`' order, then the
    /// step's numbers in `NUMBER_LINES`'): `best` with each value that the space tries.
    fn step_round(&self, knob: usize, best: &Setting) -> Vec<Setting> {
        let switches = self.switches();
        if knob < switches.len() {
            if !switches[knob] {
                return vec![];
            }
            // Dependent launch is off unless asked. The others are tried both ways (the one that
            // is kiln's own has its code and is passed over), as the card or the environment may
            // have turned them either way.
            if knob == 0 {
                return vec![Setting { dependent_launch: true, ..best.clone() }];
            }
            return [true, false]
                .map(|on| {
                    let mut s = best.clone();
                    *s.optional_switches_mut()[knob - 1] = Some(on);
                    s
                })
                .to_vec();
        }
        self.numbers()[knob - switches.len()]
            .iter()
            .map(|&n| {
                let mut s = best.clone();
                *s.numbers_mut()[knob - switches.len()] = Some(n);
                s
            })
            .collect()
    }
}

impl Default for Space {
    /// `default_candidates`, every switch, one to three streams, products of up to 2^19
    /// multiply-adds in single-block runs (fmnist-mlp's last layer joins its loss), every
    /// small product's dots one per output thread however long (as before they were tiled), and
    /// joins reaching 12 steps ahead (the reach before 64).
    fn default() -> Self {
        Space {
            candidates: default_candidates(),
            dependent_launch: true,
            clusters: true,
            cublaslt: true,
            row_tails: true,
            longest_first: true,
            chain_joins: true,
            quad_copies: true,
            deep_slabs: true,
            tensor_cores: true,
            turn_passes: true,
            streams: vec![1, 2, 3],
            run_macs: vec![1 << 19],
            dot_depth: vec![1 << 30],
            lookahead: vec![12],
        }
    }
}

/// The choices tried for each product: cuBLAS, and by float32 FMAs each tile shape kiln picks
/// from (32x32 in thread groups, 64x64, 128x64) and 128x128 at 1, 2, 4, 8 and 12 slices, each
/// with one slab buffer and with as many filled by asynchronous copies as fit of eight (up to a
/// slice's every slab in flight: three buffers for 32x32 tiles in thread groups, five for 64x64,
/// seven for 128x64; compute capability 8.0 or newer, elsewhere they fail and are passed over;
/// three buffers, the candidate before, are timed against eight for the whole step by
/// `gpu-check.sh`), and 32x32 tiles of 2x2 outputs a thread (the form before the thread groups);
/// and with a tile's 2, 4 or 8 slices as a thread block cluster (compute capability 9.0;
/// `cluster.rs`): 32x32 tiles in thread groups with one slab buffer and with three, 64x64 and
/// 128x64 tiles with one. Then on tensor cores (3xTF32) each shape kiln picks there (32x32, 64x64,
/// 128x64) whole and in 2, 4 and 8 slices as a cluster, with kiln's three slab buffers: they lost
/// every product of the H100's table of 2026-11-27 but a few, by little, before their slabs were
/// copied asynchronously, split a turn ahead and multiplied in passes of turns, and have not been
/// timed since.
pub fn default_candidates() -> Vec<TileChoice> {
    let mut v = vec![TileChoice { tiled: Some(false), ..TileChoice::default() }];
    for slices in [1, 2, 4, 8, 12] {
        v.push(TileChoice::forced(TileShape::T32x32, slices, false));
    }
    for tile in [TileShape::T32x32K4, TileShape::T64x64, TileShape::T128x64, TileShape::T128x128] {
        for slices in [1, 2, 4, 8, 12] {
            for stages in [Some(1), Some(MAX_STAGES)] {
                v.push(TileChoice { stages, ..TileChoice::forced(tile, slices, false) });
            }
        }
    }
    let clustered = [
        (TileShape::T32x32K4, Some(1)),
        (TileShape::T32x32K4, Some(3)),
        (TileShape::T64x64, Some(1)),
        (TileShape::T128x64, Some(1)),
    ];
    for (tile, stages) in clustered {
        for slices in [2, 4, 8] {
            v.push(TileChoice { stages, cluster: Some(true), ..TileChoice::forced(tile, slices, false) });
        }
    }
    for tile in [TileShape::T32x32, TileShape::T64x64, TileShape::T128x64] {
        let stages = Some(DEFAULT_STAGES);
        v.push(TileChoice { stages, ..TileChoice::forced(tile, 1, true) });
        for slices in [2, 4, 8] {
            v.push(TileChoice { stages, cluster: Some(true), ..TileChoice::forced(tile, slices, true) });
        }
    }
    v
}

/// What a search found and what it cost.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The fastest setting found (kiln's own choices where nothing beat them).
    pub setting: Setting,
    /// Milliseconds a step took with kiln's own choices, and with `setting` (its last timing).
    pub before_ms: f64,
    pub after_ms: f64,
    /// Settings timed, including kiln's own and the fresh timings of the best.
    pub timed: usize,
    /// Candidates not timed because their code was that of a setting already timed.
    pub same_code: usize,
    /// Candidates that could not be compiled or run, with why (a card too old for a feature).
    pub failed: Vec<String>,
    /// Whether the time budget ran out before every candidate was tried.
    pub out_of_budget: bool,
}

impl Outcome {
    /// A setting found before (read from the cache): nothing timed, no times.
    pub fn unsearched(setting: Setting) -> Outcome {
        Outcome {
            setting,
            before_ms: f64::NAN,
            after_ms: f64::NAN,
            timed: 0,
            same_code: 0,
            failed: vec![],
            out_of_budget: false,
        }
    }
}

/// What makes two settings run alike: their code and their streams (the code does not show
/// them). A stable hash (`DefaultHasher::new()` has fixed keys).
fn fingerprint(code: &str, s: &Setting) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    code.hash(&mut h);
    s.streams.hash(&mut h);
    h.finish()
}

/// Searches `space` for the fastest setting of a step whose tunable products are `products`
/// (repeats allowed: a table has one line per shape and layout). `code_of` gives a setting's
/// generated code (to pass over candidates that change nothing but it; the number of streams,
/// which the code does not show, counts too); `prepare` is handed each round's settings to be
/// timed before any is timed (to compile them all at once, on every core); `time` gives a
/// setting's milliseconds per step. The first timing, of kiln's own choices, must succeed; after
/// `budget_seconds` no further candidate is timed. Products are tuned largest first (by
/// multiply-adds; in the order given where equal).
pub fn search<C, P, T>(
    products: &[ProductKey],
    space: &Space,
    budget_seconds: f64,
    code_of: C,
    prepare: P,
    time: T,
) -> Result<Outcome>
where
    C: FnMut(&Setting) -> Result<String>,
    P: FnMut(&[Setting]),
    T: FnMut(&Setting) -> Result<f64>,
{
    let start = std::time::Instant::now();
    let (mut code_of, mut time) = (code_of, time);
    let mut seen = HashSet::new();
    seen.insert(fingerprint(&code_of(&Setting::default())?, &Setting::default()));
    let before_ms = time(&Setting::default())?;
    let out = Outcome { before_ms, after_ms: before_ms, timed: 1, ..Outcome::unsearched(Setting::default()) };
    let mut s = Search { code_of, prepare, time, seen, best: Setting::default(), best_ms: before_ms, out };
    // The largest products first: a search cut short by its budget has tuned what weighs most.
    let mut keys: Vec<ProductKey> = vec![];
    for k in products {
        if !keys.contains(k) {
            keys.push(*k);
        }
    }
    keys.sort_by_key(|k| std::cmp::Reverse(k.m * k.k * k.n));
    let out_of_time = || start.elapsed().as_secs_f64() > budget_seconds;
    let mut first = true;
    for key in keys {
        if !first {
            s.retime()?;
        }
        first = false;
        // The round's settings differ from the best only in this product's line, so they are
        // known before any is timed, whichever wins.
        let round = space.candidates.iter().map(|&c| s.best.with(key, c)).collect();
        if !s.round(round, &out_of_time) {
            break;
        }
    }
    // Then the step as a whole: its switches, then its numbers (streams, the two bounds, the
    // joins' reach), each round made from the best after the one before.
    for knob in 0..SWITCH_LINES.len() + NUMBER_LINES.len() {
        let round = space.step_round(knob, &s.best);
        if s.out.out_of_budget {
            break;
        }
        if round.is_empty() {
            continue;
        }
        if !first {
            s.retime()?;
        }
        first = false;
        s.round(round, &out_of_time);
    }
    s.out.setting = s.best;
    s.out.after_ms = s.best_ms;
    Ok(s.out)
}

/// A search's state: the best setting so far and its time, and the code of every setting timed.
struct Search<C, P, T> {
    code_of: C,
    prepare: P,
    time: T,
    seen: HashSet<u64>,
    best: Setting,
    best_ms: f64,
    out: Outcome,
}

impl<C, P, T> Search<C, P, T>
where
    C: FnMut(&Setting) -> Result<String>,
    P: FnMut(&[Setting]),
    T: FnMut(&Setting) -> Result<f64>,
{
    /// Times the best setting again, so that the candidates after are measured beside it.
    fn retime(&mut self) -> Result<()> {
        self.best_ms = (self.time)(&self.best)?;
        self.out.timed += 1;
        Ok(())
    }

    /// Times each of `candidates` whose code was not timed before; the fastest becomes the best
    /// if it wins. False when the budget ran out first.
    fn round(&mut self, candidates: Vec<Setting>, out_of_time: &impl Fn() -> bool) -> bool {
        let mut fresh = vec![];
        for c in candidates {
            match (self.code_of)(&c) {
                Ok(code) if self.seen.insert(fingerprint(&code, &c)) => fresh.push(c),
                Ok(_) => self.out.same_code += 1,
                Err(e) => self.out.failed.push(format!("{}: {e}", describe(&c))),
            }
        }
        (self.prepare)(&fresh);
        for c in fresh {
            if out_of_time() {
                self.out.out_of_budget = true;
                return false;
            }
            match (self.time)(&c) {
                Ok(ms) => {
                    self.out.timed += 1;
                    if ms < self.best_ms * (1.0 - MARGIN) {
                        self.best = c;
                        self.best_ms = ms;
                    }
                }
                Err(e) => self.out.failed.push(format!("{}: {e}", describe(&c))),
            }
        }
        true
    }
}

/// A setting in a line, for errors.
fn describe(s: &Setting) -> String {
    let mut parts: Vec<String> =
        s.table.entries.iter().map(|(k, c)| format!("{k} {}", c.label().unwrap_or_default())).collect();
    if (Setting { table: TileTable::default(), ..s.clone() }) != Setting::default() {
        parts.push(s.knobs());
    }
    if parts.is_empty() {
        "kiln's own choices".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::Error;

    fn key(m: usize) -> ProductKey {
        ProductKey { m, k: 64, n: 32, a_transposed: false, b_transposed: false }
    }

    /// The default candidates for the products, nothing for the step.
    fn only_products() -> Space {
        Space {
            dependent_launch: false,
            clusters: false,
            cublaslt: false,
            row_tails: false,
            longest_first: false,
            chain_joins: false,
            quad_copies: false,
            deep_slabs: false,
            tensor_cores: false,
            turn_passes: false,
            streams: vec![],
            run_macs: vec![],
            dot_depth: vec![],
            lookahead: vec![],
            ..Space::default()
        }
    }

    fn label(c: &TileChoice) -> String {
        c.label().unwrap()
    }

    /// A step whose time is the sum over its products of a per-(product, choice) cost, less a
    /// saving for dependent launch, a quarter of a millisecond with clusters and half a
    /// millisecond on two streams.
    fn synthetic(cost: impl Fn(ProductKey, &str) -> f64, launch_saves: f64) -> impl FnMut(&Setting) -> Result<f64> {
        move |s: &Setting| {
            let mut t = 0.0;
            for k in [key(128), key(256)] {
                let c = s.table.entries.get(&k).map_or("kiln".to_string(), label);
                t += cost(k, &c);
            }
            if s.dependent_launch {
                t -= launch_saves;
            }
            if s.clusters == Some(true) {
                t -= 0.25;
            }
            Ok(if s.streams == Some(2) { t - 0.5 } else { t })
        }
    }

    /// A setting's code: its text, without the streams (which the code does not show).
    fn code(s: &Setting) -> Result<String> {
        Ok(setting_text(&Setting { streams: None, ..s.clone() }, ""))
    }

    #[test]
    fn the_search_finds_each_products_fastest_choice_then_the_steps_launch_and_streams() {
        let cost = |k: ProductKey, c: &str| match (k.m, c) {
            (128, "64x64/s4/p8") => 2.0,
            (256, "cuBLAS") => 3.0,
            _ => 10.0,
        };
        let products = [key(128), key(256), key(128)];
        let out = search(&products, &Space::default(), 60.0, code, |_| {}, synthetic(cost, 1.0)).unwrap();
        assert_eq!(out.before_ms, 20.0);
        assert_eq!(out.after_ms, 3.25);
        assert!(out.setting.dependent_launch && out.setting.clusters == Some(true));
        // cuBLASLt saves nothing here: either way is within the margin, so kiln's stays.
        assert_eq!((out.setting.cublaslt, out.setting.streams), (None, Some(2)));
        assert_eq!(label(&out.setting.table.entries[&key(128)]), "64x64/s4/p8");
        assert_eq!(label(&out.setting.table.entries[&key(256)]), "cuBLAS");
        // Each distinct setting timed once (the repeated product is tuned once; the settings of
        // the streams' round share their code but not their streams), plus the best again before
        // the second product and before each round of the step's: dependent launch, clusters,
        // cuBLASLt, row tails, longest-first sections, chain joins, quad copies, deep slabs,
        // tensor cores and passes of turns (each on and off), streams, the two bounds and the
        // reach.
        let n = default_candidates().len();
        let switches = (1 + 1) + 9 * (1 + 2);
        assert_eq!(out.timed, 1 + n + 1 + n + switches + (1 + 3) + (1 + 1) + (1 + 1) + (1 + 1));
        assert!(out.failed.is_empty() && !out.out_of_budget);
    }

    #[test]
    fn a_candidate_within_the_margin_does_not_replace_the_best() {
        let cost = |_: ProductKey, c: &str| if c == "32x32k4/s1" { 10.0 * (1.0 - MARGIN / 2.0) } else { 10.0 };
        let out = search(&[key(128)], &only_products(), 60.0, code, |_| {}, synthetic(cost, 0.0)).unwrap();
        assert_eq!(out.setting, Setting::default());
        assert_eq!(out.after_ms, 20.0);
    }

    #[test]
    fn candidates_with_the_code_of_one_timed_are_not_timed_again() {
        // Every tiling of the first product makes the same code (as when none can be taken and
        // each falls back to cuBLAS): one of them is timed.
        let cuda_c = |s: &Setting| -> Result<String> {
            Ok(match s.table.entries.get(&key(128)) {
                Some(c) if c.tiled == Some(true) => "cuBLAS".into(),
                Some(c) => label(c),
                None => "kiln".into(),
            })
        };
        let mut times = 0;
        let mut prepared = vec![];
        let out = search(
            &[key(128)],
            &only_products(),
            60.0,
            cuda_c,
            |s| prepared.push(s.len()),
            |_| {
                times += 1;
                Ok(1.0)
            },
        )
        .unwrap();
        assert_eq!(times, 2, "kiln's own choice and cuBLAS");
        assert_eq!(prepared, [1], "cuBLAS, the one setting of the round with new code");
        assert_eq!(out.same_code, default_candidates().len() - 1);
    }

    #[test]
    fn failing_candidates_are_passed_over_and_said() {
        let time = |s: &Setting| -> Result<f64> {
            match s.table.entries.values().next() {
                Some(c) if c.stages.is_some_and(|s| s > 1) => Err(Error::Invalid("compute capability 7.5".into())),
                Some(_) => Ok(5.0),
                None => Ok(10.0),
            }
        };
        let out = search(&[key(128)], &only_products(), 60.0, code, |_| {}, time).unwrap();
        assert_eq!(out.after_ms, 5.0);
        assert_eq!(out.failed.len(), default_candidates().iter().filter(|c| c.stages.is_some_and(|s| s > 1)).count());
        assert!(out.failed[0].contains("/p8: compute capability 7.5"), "{}", out.failed[0]);
    }

    #[test]
    fn kilns_own_choice_must_run_and_the_budget_stops_the_search() {
        let err = search(&[key(128)], &Space::default(), 60.0, code, |_| {}, |_| Err(Error::Invalid("no".into())));
        assert!(err.is_err());
        let out = search(&[key(128)], &Space::default(), 0.0, code, |_| {}, |_| Ok(1.0)).unwrap();
        assert!(out.out_of_budget);
        assert_eq!((out.timed, out.setting.clone()), (1, Setting::default()));
    }
}
