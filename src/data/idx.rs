//! The IDX format of (Fashion-)MNIST: a big-endian magic number (two zero bytes, a type code and
//! the number of dims), one big-endian u32 per dim, then the data. Files may be gzip-compressed
//! (read through flate2). Every failure is an error that names the file and what was wrong.

use kiln_ir::{Error, Result};
use std::io::Read;
use std::path::Path;

/// An IDX array of unsigned bytes (the only type the datasets use).
#[derive(Clone, Debug, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{} is not a valid IDX file: {what}", path.display()))
}

/// Reads an IDX file, gunzipping it when its name ends in `.gz`.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let file = std::fs::File::open(path).map_err(|e| Error::Invalid(format!("cannot open {}: {e}", path.display())))?;
    let mut bytes = vec![];
    let gz = path.extension().is_some_and(|e| e == "gz");
    let read = if gz {
        flate2::read::GzDecoder::new(file).read_to_end(&mut bytes)
    } else {
        std::io::BufReader::new(file).read_to_end(&mut bytes)
    };
    read.map_err(|e| corrupt(path, format_args!("reading failed ({e})")))?;
    parse_idx(&bytes).map_err(|what| corrupt(path, what))
}

/// Parses the bytes of an (uncompressed) IDX file.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!("{} bytes, too short for the header", bytes.len()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!("bad magic number {:02x}{:02x}{:02x}{:02x}", bytes[0], bytes[1], bytes[2], bytes[3]));
    }
    if bytes[2] != 0x08 {
        return Err(format!("element type 0x{:02x}; only unsigned bytes (0x08) are supported", bytes[2]));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(format!("{ndim} dims but only {} bytes of header", bytes.len()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().expect("4 bytes")) as usize)
        .collect();
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("dims overflow")?;
    let data = &bytes[header..];
    if data.len() != n {
        return Err(format!("dims {dims:?} need {n} bytes of data, the file has {}", data.len()));
    }
    Ok(IdxArray { dims, data: data.to_vec() })
}

/// Writes an IDX array of bytes (gzip-compressed when the name ends in `.gz`).
pub fn write_idx(path: &Path, a: &IdxArray) -> Result<()> {
    let mut bytes = vec![0, 0, 0x08, a.dims.len() as u8];
    for &d in &a.dims {
        bytes.extend_from_slice(&(d as u32).to_be_bytes());
    }
    bytes.extend_from_slice(&a.data);
    let fail = |e: std::io::Error| Error::Invalid(format!("cannot write {}: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(fail)?;
    if path.extension().is_some_and(|e| e == "gz") {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        enc.write_all(&bytes).map_err(fail)?;
        enc.finish().map_err(fail)?;
    } else {
        use std::io::Write;
        std::io::BufWriter::new(file).write_all(&bytes).map_err(fail)?;
    }
    Ok(())
}
