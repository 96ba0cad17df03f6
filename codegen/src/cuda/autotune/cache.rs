//! The autotune cache: a search's result kept as a text file in kiln's cache folder, under a key
//! made of the step's code with kiln's own choices, the card and the search space, so that a later
//! run finds it at once. The text holds a line per knob of the step (`dependent-launch on`,
//! `streams 2`, `lookahead kiln`, ...) and then the tile table; a file that does not read is
//! treated as absent (the step is tuned again), and a space that gains a knob makes new keys, so
//! an entry from before it is never misread.

use super::{Setting, Space, TileTable, NUMBERS, NUMBER_LINES, SWITCHES, SWITCH_LINES};
use kiln_ir::{Error, Result};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// The cache entry's name for a step whose code with kiln's own choices is `code`, tuned on
/// `device` over `space`.
pub fn cache_key(code: &str, device: &str, space: &Space) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    code.hash(&mut h);
    device.hash(&mut h);
    for c in &space.candidates {
        c.label().hash(&mut h);
    }
    space.switches().hash(&mut h);
    space.numbers().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// A setting as a cache entry's text: `heading` as comments, the launch line and the step's
/// numbers, then the table.
pub fn setting_text(s: &Setting, heading: &str) -> String {
    let table = s.table.to_text(heading);
    let (comments, lines): (Vec<&str>, Vec<&str>) = table.lines().partition(|l| l.starts_with('#'));
    let mut text = comments.join("\n");
    text.push('\n');
    for knob in s.knobs().split(", ") {
        text.push_str(knob);
        text.push('\n');
    }
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    text
}

/// Reads `setting_text`'s text back; `origin` is what errors name.
pub fn parse_setting(text: &str, origin: &str) -> Result<Setting> {
    let mut setting = Setting::default();
    let (mut switched, mut seen) = ([None; SWITCHES], [false; NUMBERS]);
    let mut table = String::new();
    for line in text.lines() {
        let bad = |what: &str| Error::Invalid(format!("{origin}: '{}' (expected {what})", line.trim()));
        let words: Vec<&str> = line.split_whitespace().collect();
        let switch = SWITCH_LINES.iter().position(|name| words.first() == Some(name));
        let number = NUMBER_LINES.iter().position(|(name, _)| words.first() == Some(name));
        if let Some(i) = switch {
            switched[i] = Some(match (words.as_slice(), i) {
                ([_, "on"], _) => Some(true),
                ([_, "off"], _) => Some(false),
                // Dependent launch is off unless a setting turns it on.
                ([_, "kiln"], 1..) => None,
                (_, 0) => return Err(bad("on or off")),
                _ => return Err(bad("on, off or kiln")),
            });
            continue;
        }
        match (words.as_slice(), number) {
            (&[_, v], Some(i)) => {
                let most = NUMBER_LINES[i].1;
                *setting.numbers_mut()[i] = match v {
                    "kiln" => None,
                    n => Some(
                        n.parse::<usize>()
                            .ok()
                            .filter(|n| (1..=most).contains(n))
                            .ok_or_else(|| bad(&format!("kiln or a number from 1 to {most}")))?,
                    ),
                };
                seen[i] = true;
            }
            (_, Some(_)) => return Err(bad("kiln or a number")),
            _ => {
                table.push_str(line);
                table.push('\n');
            }
        }
    }
    let missing = |l: &str| Error::Invalid(format!("{origin}: no '{l}' line"));
    setting.dependent_launch = switched[0].ok_or_else(|| missing("dependent-launch on|off"))?.unwrap_or(false);
    for (i, switch) in setting.optional_switches_mut().into_iter().enumerate() {
        *switch = switched[i + 1].ok_or_else(|| missing(&format!("{} on|off|kiln", SWITCH_LINES[i + 1])))?;
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(missing(&format!("{} N|kiln", NUMBER_LINES[i].0)));
    }
    setting.table = TileTable::parse(&table, origin)?;
    Ok(setting)
}

/// The folder autotune results are kept in by default: `tuned` in kiln's cache folder.
pub fn default_cache_folder() -> Option<PathBuf> {
    crate::cuda::nvrtc::cache_dir("tuned")
}

/// Where the setting cached under `key` is kept in `folder`.
pub fn cache_path(folder: &Path, key: &str) -> PathBuf {
    folder.join(format!("{key}.txt"))
}

/// The setting cached under `key` in `folder`, if there is one that reads.
pub fn read_cached(folder: &Path, key: &str) -> Option<Setting> {
    let path = cache_path(folder, key);
    let text = std::fs::read_to_string(&path).ok()?;
    parse_setting(&text, &path.display().to_string()).ok()
}

/// Keeps `s` under `key` in `folder` (written to a temporary file and renamed, so that a reader
/// never sees half of it); returns the entry's path.
pub fn write_cached(folder: &Path, key: &str, s: &Setting, heading: &str) -> Result<PathBuf> {
    let io = |e: std::io::Error| Error::Invalid(format!("autotune cache {}: {e}", folder.display()));
    std::fs::create_dir_all(folder).map_err(io)?;
    let path = cache_path(folder, key);
    let partial = folder.join(format!("{key}.{}.partial", std::process::id()));
    std::fs::write(&partial, setting_text(s, heading)).map_err(io)?;
    std::fs::rename(&partial, &path).map_err(io)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::tile_table::ProductKey;
    use crate::cuda::tiled::TileChoice;

    fn key(m: usize) -> ProductKey {
        ProductKey { m, k: 64, n: 32, a_transposed: false, b_transposed: false }
    }

    #[test]
    fn a_setting_reads_back_from_its_text() {
        let mut s = Setting {
            dependent_launch: true,
            clusters: Some(true),
            cublaslt: Some(true),
            row_tails: Some(false),
            streams: Some(3),
            dot_depth: Some(64),
            lookahead: Some(12),
            tensor_cores: Some(true),
            ..Setting::default()
        };
        s.table.insert(key(128), TileChoice::from_label("128x64/s2/p3").unwrap()).unwrap();
        s.table.insert(key(256), TileChoice::from_label("cuBLAS").unwrap()).unwrap();
        let text = setting_text(&s, "tuned on a card\nin 3 s");
        assert!(
            text.starts_with(
                "# tuned on a card\n# in 3 s\ndependent-launch on\nclusters on\ncublaslt on\nrow-tails off\n\
                 longest-first kiln\nchain-joins kiln\nquad-copies kiln\ndeep-slabs kiln\n\
                 tensor-cores on\nturn-passes kiln\nstreams 3\nrun-macs kiln\ndot-depth 64\nlookahead 12\n"
            ),
            "{text}"
        );
        assert_eq!(parse_setting(&text, "entry").unwrap(), s);
        let kiln_streams = Setting { streams: None, ..s.clone() };
        assert_eq!(parse_setting(&setting_text(&kiln_streams, ""), "entry").unwrap(), kiln_streams);
        let kiln_clusters = Setting { clusters: None, ..s.clone() };
        assert!(setting_text(&kiln_clusters, "").contains("\nclusters kiln\n"));
        assert_eq!(parse_setting(&setting_text(&kiln_clusters, ""), "entry").unwrap(), kiln_clusters);
        let err = parse_setting("128x64x32 nn cuBLAS\nstreams kiln\n", "entry").unwrap_err().to_string();
        assert!(err.contains("no 'dependent-launch on|off' line"), "{err}");
        let err = parse_setting("dependent-launch off\nstreams 9\n", "entry").unwrap_err().to_string();
        assert!(err.contains("'streams 9' (expected kiln or a number from 1 to 8)"), "{err}");
        let err = parse_setting("dependent-launch off\nstreams 2\ndot-depth kiln\n", "entry").unwrap_err().to_string();
        assert!(err.contains("no 'clusters on|off|kiln' line"), "{err}");
        let text = "dependent-launch off\nclusters off\nstreams 2\ndot-depth kiln\n";
        let err = parse_setting(text, "entry").unwrap_err().to_string();
        assert!(err.contains("no 'cublaslt on|off|kiln' line"), "{err}");
        let text = "dependent-launch off\nclusters off\ncublaslt kiln\nstreams 2\ndot-depth kiln\n";
        let err = parse_setting(text, "entry").unwrap_err().to_string();
        assert!(err.contains("no 'row-tails on|off|kiln' line"), "{err}");
        let switches = "dependent-launch off\nclusters off\ncublaslt kiln\nrow-tails on\nlongest-first off\n\
                        chain-joins on\nquad-copies off\ndeep-slabs on\ntensor-cores off\nturn-passes on\n";
        let err = parse_setting(&format!("{switches}streams 2\ndot-depth kiln\n"), "entry").unwrap_err().to_string();
        assert!(err.contains("no 'run-macs N|kiln' line"), "{err}");
        let text = format!("{switches}streams 2\nrun-macs kiln\ndot-depth kiln\n");
        let err = parse_setting(&text, "entry").unwrap_err().to_string();
        assert!(err.contains("no 'lookahead N|kiln' line"), "{err}");
        let read = parse_setting(&format!("{text}lookahead kiln\n"), "entry").unwrap();
        assert_eq!((read.row_tails, read.longest_first, read.lookahead), (Some(true), Some(false), None));
        assert_eq!((read.chain_joins, read.quad_copies, read.deep_slabs), (Some(true), Some(false), Some(true)));
        assert_eq!((read.tensor_cores, read.turn_passes), (Some(false), Some(true)));
        let text = "dependent-launch off\nclusters off\ncublaslt kiln\nrow-tails on\nlongest-first off\n";
        let err = parse_setting(text, "entry").unwrap_err().to_string();
        assert!(err.contains("no 'chain-joins on|off|kiln' line"), "{err}");
        let err = parse_setting(&format!("{text}chain-joins on\n"), "entry").unwrap_err().to_string();
        assert!(err.contains("no 'quad-copies on|off|kiln' line"), "{err}");
        let err = parse_setting(&format!("{text}chain-joins on\nquad-copies on\n"), "entry").unwrap_err().to_string();
        assert!(err.contains("no 'deep-slabs on|off|kiln' line"), "{err}");
        let text = format!("{text}chain-joins on\nquad-copies on\ndeep-slabs kiln\n");
        let err = parse_setting(&text, "entry").unwrap_err().to_string();
        assert!(err.contains("no 'tensor-cores on|off|kiln' line"), "{err}");
        let err = parse_setting(&format!("{text}tensor-cores on\n"), "entry").unwrap_err().to_string();
        assert!(err.contains("no 'turn-passes on|off|kiln' line"), "{err}");
        let kiln_lt = Setting { cublaslt: None, ..s.clone() };
        assert_eq!(parse_setting(&setting_text(&kiln_lt, ""), "entry").unwrap(), kiln_lt);
        let err = parse_setting("clusters maybe\n", "entry").unwrap_err().to_string();
        assert!(err.contains("'clusters maybe' (expected on, off or kiln)"), "{err}");
        let err = parse_setting("dependent-launch kiln\n", "entry").unwrap_err().to_string();
        assert!(err.contains("'dependent-launch kiln' (expected on or off)"), "{err}");
    }

    #[test]
    fn a_cached_setting_reads_back_and_a_missing_or_bad_entry_reads_as_none() {
        let folder = std::env::temp_dir().join(format!("kiln-autotune-cache-{}", std::process::id()));
        let mut s = Setting { dependent_launch: true, ..Setting::default() };
        s.table.insert(key(128), TileChoice::from_label("32x32k4/s2").unwrap()).unwrap();
        assert_eq!(read_cached(&folder, "0123"), None);
        let path = write_cached(&folder, "0123", &s, "a test").unwrap();
        assert_eq!(path, cache_path(&folder, "0123"));
        assert_eq!(read_cached(&folder, "0123"), Some(s));
        std::fs::write(&path, "not a setting").unwrap();
        assert_eq!(read_cached(&folder, "0123"), None);
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn the_cache_key_follows_the_code_the_card_and_the_space() {
        let space = Space::default();
        let k = cache_key("code", "H100 (sm_90)", &space);
        assert_eq!(k, cache_key("code", "H100 (sm_90)", &space));
        assert_ne!(k, cache_key("code2", "H100 (sm_90)", &space));
        assert_ne!(k, cache_key("code", "H200 (sm_90)", &space));
        let fewer = Space { candidates: space.candidates[1..].to_vec(), ..space.clone() };
        assert_ne!(k, cache_key("code", "H100 (sm_90)", &fewer));
        assert_ne!(k, cache_key("code", "H100 (sm_90)", &Space { dependent_launch: false, ..space.clone() }));
        assert_ne!(k, cache_key("code", "H100 (sm_90)", &Space { cublaslt: false, ..space.clone() }));
        assert_ne!(k, cache_key("code", "H100 (sm_90)", &Space { longest_first: false, ..space.clone() }));
        assert_ne!(k, cache_key("code", "H100 (sm_90)", &Space { chain_joins: false, ..space.clone() }));
        assert_ne!(k, cache_key("code", "H100 (sm_90)", &Space { quad_copies: false, ..space.clone() }));
        assert_ne!(k, cache_key("code", "H100 (sm_90)", &Space { deep_slabs: false, ..space.clone() }));
        assert_ne!(k, cache_key("code", "H100 (sm_90)", &Space { lookahead: vec![], ..space.clone() }));
        assert_ne!(k, cache_key("code", "H100 (sm_90)", &Space { streams: vec![1, 2], ..space.clone() }));
    }
}
