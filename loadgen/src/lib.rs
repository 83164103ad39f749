//! loadgen: corral's bundled HTTP/1.1 load generator.
//!
//! - [`client`] (pure): where each response ends, whatever its framing.
//! - [`keys`] (pure): key distributions (uniform, zipf) and random ranges.
//! - [`stats`] (pure): HdrHistograms, the open-loop schedule that corrects
//!   coordinated omission, and the outputs (summary, .hgrm, JSON, SVG).
//! - [`engine`] (I/O): pinned glommio executors driving the connections.

pub mod client;
pub mod engine;
pub mod keys;
pub mod stats;

pub use engine::{run, Options, Target};
pub use stats::Report;

/// Parses `512KiB`, `64MiB`, `1GiB`, `16k` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size"))?;
    let mult = match unit {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        u => return Err(format!("unknown size unit `{u}`")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` too large"))
}

/// Parses `250ms`, `10s`, `2m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration"))?;
    Ok(match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" | "" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(
            n.checked_mul(60)
                .ok_or_else(|| format!("duration `{s}` is too long"))?,
        ),
        u => return Err(format!("unknown duration unit `{u}`")),
    })
}
