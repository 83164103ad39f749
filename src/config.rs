//! Configuration: the TOML file and the command-line flags merged into one
//! validated [`Config`]. Pure: text in, a config or a list of errors out,
//! each error naming its key path (and line, where TOML knows it).

use serde::Deserialize;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    /// Number of shards (executors).
    pub shards: usize,
    /// The CPU each shard is pinned to, by shard index; `None` leaves shards
    /// unpinned.
    pub cpus: Option<Vec<usize>>,
    pub admin: Option<SocketAddr>,
    /// Record per-request statistics (latency histograms, counters).
    pub metrics: bool,
    /// A one-line summary on stderr this often.
    pub stats_interval: Option<Duration>,
    pub access_log: Option<AccessLog>,
    /// How long in-flight requests may run after SIGINT/SIGTERM.
    pub drain_timeout: Duration,
    /// Client connections per shard above which new ones are refused (503).
    pub max_connections: usize,
    pub limits: Limits,
    pub cache: CacheConfig,
    pub pools: Vec<PoolConfig>,
    pub stores: Vec<StoreConfig>,
    pub routes: Vec<Route>,
}

/// Where and how the access log is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// A file path, or `None` for stderr.
    pub path: Option<String>,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// The common log format (NCSA), plus nothing.
    Common,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: u64,
    /// From the first byte of a request head to its end (408 after).
    pub header_timeout: Duration,
    /// Between requests on a keep-alive connection (closed silently after).
    pub idle_timeout: Duration,
    /// Between two reads of a request body (408 after).
    pub body_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// The whole process's budget; each shard holds `size_bytes / shards`.
    pub size_bytes: u64,
    /// Responses larger than this stream through unstored.
    pub max_object_bytes: u64,
    pub collapse: bool,
    /// The longest a request waits for another request's fetch to start
    /// answering; after it, it goes to the origin on its own.
    pub collapse_timeout: Duration,
    /// How long a key found uncacheable bypasses collapsing (hit-for-miss).
    pub hit_for_miss: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    Random,
    LeastLoaded,
    PeakEwma,
    Hash,
    Sticky,
}

impl Balance {
    pub const ALL: [Balance; 6] = [
        Balance::RoundRobin,
        Balance::Random,
        Balance::LeastLoaded,
        Balance::PeakEwma,
        Balance::Hash,
        Balance::Sticky,
    ];

    /// Its name in the config and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::Random => "random",
            Balance::LeastLoaded => "least-loaded",
            Balance::PeakEwma => "peak-ewma",
            Balance::Hash => "hash",
            Balance::Sticky => "sticky",
        }
    }
}

/// What `hash` balancing (and the first pick of `sticky`) hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The request target (path and query).
    Uri,
    /// The client's IP address.
    Ip,
    /// A request header's value (name in lower case).
    Header(String),
    /// A cookie's value.
    Cookie(String),
}

/// Active health checks of a pool.
#[derive(Debug, Clone)]
pub struct ActiveHealth {
    pub path: String,
    /// The `Host` of each check: this, or the backend as configured.
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Good statuses, inclusive.
    pub status: (u16, u16),
    pub rise: u32,
    pub fall: u32,
}

/// Passive health: ejection after consecutive failures.
#[derive(Debug, Clone)]
pub struct Eject {
    /// Consecutive failures that eject a backend; 0 turns ejection off.
    pub failures: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    /// At most this percentage of a pool's backends is ejected at once.
    pub max_percent: u32,
    /// 5xx responses count as failures.
    pub on_5xx: bool,
}

/// Session affinity through a cookie.
#[derive(Debug, Clone)]
pub struct Sticky {
    pub cookie: String,
    /// Keys the cookie values; without it, a random key per process.
    pub secret: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    /// As configured (`app.internal:8080`): the `Host` corral sends when
    /// the client sent none, and of health checks.
    pub name: String,
    pub weight: u32,
}

impl Backend {
    /// How logs name it: as configured, with the address it resolved to
    /// when that differs (`app.internal:8080 (10.0.0.5:8080)`), so that
    /// the name metrics and `/status` use finds it in the log too.
    pub fn describe(&self) -> String {
        let addr = self.addr.to_string();
        if self.name == addr {
            addr
        } else {
            format!("{} ({addr})", self.name)
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub balance: Balance,
    pub hash_key: Option<HashKey>,
    /// Bounded-load factor `1 + ε` of `hash`; 0 turns the bound off.
    pub hash_balance_factor: f64,
    /// A response header in which backends report their load (`peak-ewma`).
    pub load_header: Option<String>,
    /// How fast peak-EWMA forgets (its time constant).
    pub ewma_decay: Duration,
    pub backends: Vec<Backend>,
    pub health: Option<ActiveHealth>,
    pub eject: Eject,
    pub slow_start: Duration,
    pub sticky: Option<Sticky>,
    /// Other backends an idempotent request may be retried on.
    pub retries: u32,
    /// Retries may add at most this fraction to the requests sent.
    pub retry_budget: f64,
    pub connect_timeout: Duration,
    /// From the end of the request to the response head.
    pub response_timeout: Duration,
    /// Between two reads of a response body.
    pub body_timeout: Duration,
    /// Idle keep-alive connections kept per backend per shard.
    pub keepalive: usize,
    /// How long an idle upstream connection is kept.
    pub keepalive_timeout: Duration,
}

/// An origin store: files under a directory, read in page-aligned blocks.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub name: String,
    /// The root, canonical (symlinks resolved).
    pub root: std::path::PathBuf,
    pub block_size: u64,
    /// Bytes in one read, at most.
    pub max_merge: u64,
    /// Unrequested bytes one read may span between requested blocks.
    pub max_gap: u64,
    /// Bytes read ÷ bytes wanted per read, at most.
    pub max_amplification: f64,
    /// The block cache of the whole process (each shard holds its share).
    pub cache_bytes: u64,
    /// Open files kept per shard.
    pub open_files: usize,
    /// How long the reader collects pending blocks before planning reads.
    pub merge_window: Duration,
}

/// Where a route sends requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Index into `Config::pools`.
    Pool(usize),
    /// Index into `Config::stores`.
    Store(usize),
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub to: Target,
}

impl Config {
    /// The origin for a request, by host (without port) and path: the longest
    /// matching path prefix among routes for this host, then among `*` routes.
    pub fn route(&self, host: Option<&[u8]>, path: &[u8]) -> Option<Target> {
        let mut best: Option<(bool, usize, Target)> = None;
        for r in &self.routes {
            let host_match = match (&r.host, host) {
                (None, _) => false,
                (Some(h), Some(req)) if h.as_bytes().eq_ignore_ascii_case(req) => true,
                (Some(_), _) => continue,
            };
            if !path.starts_with(r.path_prefix.as_bytes()) {
                continue;
            }
            let key = (host_match, r.path_prefix.len(), r.to);
            if best.is_none_or(|b| (key.0, key.1) > (b.0, b.1)) {
                best = Some(key);
            }
        }
        best.map(|b| b.2)
    }
}

/// One configuration error, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// All errors found in one configuration.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---- the file's shape -------------------------------------------------------

/// A size: an integer of bytes or a string like `64MiB`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub cache: CacheSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub pool: Vec<PoolSection>,
    #[serde(default)]
    pub store: Vec<StoreSection>,
    #[serde(default)]
    pub route: Vec<RouteSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<Vec<String>>,
    pub shards: Option<usize>,
    pub cpus: Option<String>,
    pub admin: Option<String>,
    pub metrics: Option<bool>,
    pub stats_interval: Option<String>,
    pub drain_timeout: Option<String>,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `"stderr"` or a file path; unset: no access log.
    pub access: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_header_bytes: Option<SizeValue>,
    pub max_headers: Option<usize>,
    pub max_uri_bytes: Option<SizeValue>,
    pub max_body_bytes: Option<SizeValue>,
    pub header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub body_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    pub size: Option<SizeValue>,
    pub max_object_size: Option<SizeValue>,
    pub collapse: Option<bool>,
    pub collapse_timeout: Option<String>,
    pub hit_for_miss: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    pub name: String,
    pub balance: Option<String>,
    pub hash_key: Option<String>,
    pub hash_balance_factor: Option<f64>,
    pub load_header: Option<String>,
    pub ewma_decay: Option<String>,
    #[serde(default)]
    pub backends: Vec<BackendSection>,
    pub health: Option<HealthSection>,
    pub eject: Option<EjectSection>,
    pub slow_start: Option<String>,
    pub sticky: Option<StickySection>,
    pub retries: Option<u32>,
    pub retry_budget: Option<f64>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub keepalive: Option<usize>,
    pub keepalive_timeout: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    pub path: Option<String>,
    pub host: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub status: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EjectSection {
    pub failures: Option<u32>,
    pub cooldown: Option<String>,
    pub max_cooldown: Option<String>,
    pub max_percent: Option<u32>,
    pub on_5xx: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickySection {
    pub cookie: Option<String>,
    pub secret: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub addr: String,
    pub weight: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub name: String,
    pub root: String,
    pub block_size: Option<SizeValue>,
    pub max_merge: Option<SizeValue>,
    pub max_gap: Option<SizeValue>,
    pub max_amplification: Option<f64>,
    pub cache_size: Option<SizeValue>,
    pub open_files: Option<usize>,
    pub merge_window: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub to: String,
}

/// Command-line values that override the file (see INTERFACE.md).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub backends: Vec<String>,
    pub balance: Option<String>,
    pub hash_key: Option<String>,
    pub origin_dir: Option<String>,
    pub cache_size: Option<String>,
    pub shards: Option<usize>,
    pub cpus: Option<String>,
    pub admin: Option<String>,
    pub health_path: Option<String>,
    pub health_interval: Option<String>,
    pub no_metrics: bool,
    pub stats_interval: Option<String>,
    pub access_log: Option<String>,
}

/// Parses TOML text into the file shape; the error names the key path and line.
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigErrors> {
    parse_once(text).map_err(|(e, _)| ConfigErrors(vec![e]))
}

/// One parse: the file, or its first error and that error's line.
fn parse_once(text: &str) -> Result<FileConfig, (ConfigError, Option<usize>)> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| text[..s.start].matches('\n').count() + 1);
        let msg = inner.message().to_string();
        let key = if path == "." || path.is_empty() {
            "(top level)".to_string()
        } else {
            path
        };
        let message = match line {
            Some(l) => format!("{msg} (line {l})"),
            None => msg,
        };
        (ConfigError { key, message }, line)
    })
}

/// Parses TOML text, going on past errors in single-line `key = value`
/// entries (an unknown key, a value of the wrong type): each is reported
/// and its line left out, so `check-config` names them all. The file is
/// returned for validating its meaning only when every entry left out was
/// an unknown key (a value left out would look missing, or defaulted). A
/// syntax error, or one in an entry that spans lines or sits inside an
/// inline table, stops there.
fn parse_file_all(text: &str) -> (Option<FileConfig>, Vec<ConfigError>) {
    let mut lines: Vec<&str> = text.split('\n').collect();
    let mut errors: Vec<ConfigError> = Vec::new();
    let mut only_unknown = true;
    for _ in 0..100 {
        match parse_once(&lines.join("\n")) {
            Ok(file) => return (only_unknown.then_some(file), errors),
            Err((e, line)) => {
                // After a line was left out: a syntax error it caused, or a
                // field reported missing because its wrong-typed entry was
                // left out (already reported), ends the report.
                let caused =
                    e.key == "(top level)" || left_out_missing(&errors, &e.key, &e.message);
                if caused && !errors.is_empty() {
                    return (None, errors);
                }
                // The entry's own line: `name = value`, all of it on it.
                let name = e.key.rsplit(['.', ']']).next().unwrap_or("");
                let own = line.filter(|&l| {
                    let t = lines.get(l - 1).map_or("", |t| t.trim_start());
                    let rest = t.strip_prefix(name).map(str::trim_start);
                    !name.is_empty()
                        && e.key != "(top level)"
                        && rest.is_some_and(|r| r.starts_with('='))
                        && !t.contains('{')
                        && t.matches('[').count() == t.matches(']').count()
                });
                only_unknown &= e.message.starts_with("unknown field");
                errors.push(e);
                match own.and_then(|l| lines.get_mut(l - 1)) {
                    Some(entry) => *entry = "",
                    // Inside an inline table or an entry over several
                    // lines: go on over the parsed tree (no line numbers).
                    None => return parse_tree_all(&lines.join("\n"), errors),
                }
            }
        }
    }
    (None, errors)
}

/// [`parse_file_all`] past an error it cannot leave out by line: the text
/// parsed as a TOML tree, each offending entry reported and taken out of
/// the tree, until the rest deserializes (then validated only if every
/// entry left out was an unknown key) or a syntax error or a missing field
/// that a removal caused stops it.
fn parse_tree_all(
    text: &str,
    mut errors: Vec<ConfigError>,
) -> (Option<FileConfig>, Vec<ConfigError>) {
    let Ok(mut tree) = text.parse::<toml::Table>() else {
        return (None, errors);
    };
    let mut only_unknown = errors
        .iter()
        .all(|e| e.message.starts_with("unknown field"));
    for _ in 0..100 {
        let e = match serde_path_to_error::deserialize::<_, FileConfig>(toml::Value::Table(
            tree.clone(),
        )) {
            Ok(file) => return (only_unknown.then_some(file), errors),
            Err(e) => e,
        };
        let key = e.path().to_string();
        let message = e.into_inner().message().to_string();
        let caused = left_out_missing(&errors, &key, &message);
        if caused || key == "." || key.is_empty() || !remove_path(&mut tree, &key) {
            if !caused && !errors.iter().any(|x| x.key == key) {
                errors.push(ConfigError { key, message });
            }
            return (None, errors);
        }
        only_unknown &= message.starts_with("unknown field");
        // The line-based pass may have reported this one already (with its
        // line): once.
        if !errors.iter().any(|x| x.key == key) {
            errors.push(ConfigError { key, message });
        }
    }
    (None, errors)
}

/// Whether an error at `key` says a field is missing that was reported
/// (and left out) already: it was of the wrong type, not missing.
fn left_out_missing(errors: &[ConfigError], key: &str, message: &str) -> bool {
    message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next())
        .is_some_and(|f| errors.iter().any(|x| x.key == format!("{key}.{f}")))
}

/// Takes the entry at `path` (`pool[0].backends[1].weight`) out of `tree`;
/// whether there was one.
fn remove_path(tree: &mut toml::Table, path: &str) -> bool {
    // Segments: names and [indices].
    let mut segs: Vec<Seg> = Vec::new();
    for part in path.split('.') {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            segs.push(Ok(name.to_string()));
        }
        for idx in rest.split('[') {
            match idx.trim_end_matches(']').parse::<usize>() {
                Ok(i) => segs.push(Err(i)),
                Err(_) if idx.is_empty() => {}
                Err(_) => return false,
            }
        }
    }
    let Some((last, walk)) = segs.split_last() else {
        return false;
    };
    let mut root = toml::Value::Table(std::mem::take(tree));
    let done = remove_in(&mut root, walk, last);
    if let toml::Value::Table(t) = root {
        *tree = t;
    }
    done
}

/// A step of a path: a key, or an array index.
type Seg = Result<String, usize>;

fn remove_in(v: &mut toml::Value, walk: &[Seg], last: &Seg) -> bool {
    match walk.split_first() {
        Some((seg, rest)) => {
            let next = match (seg, v) {
                (Ok(name), toml::Value::Table(t)) => t.get_mut(name),
                (Err(i), toml::Value::Array(a)) => a.get_mut(*i),
                _ => None,
            };
            next.is_some_and(|n| remove_in(n, rest, last))
        }
        None => match (last, v) {
            (Ok(name), toml::Value::Table(t)) => t.remove(name).is_some(),
            (Err(i), toml::Value::Array(a)) if *i < a.len() => {
                a.remove(*i);
                true
            }
            _ => false,
        },
    }
}

/// Parses a hash key: `uri`, `ip`, `header:NAME` or `cookie:NAME`.
pub fn parse_hash_key(s: &str) -> Result<HashKey, String> {
    let token = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
    };
    match s.split_once(':') {
        None if s == "uri" => Ok(HashKey::Uri),
        None if s == "ip" => Ok(HashKey::Ip),
        Some(("header", n)) if token(n) => Ok(HashKey::Header(n.to_ascii_lowercase())),
        Some(("cookie", n)) if token(n) => Ok(HashKey::Cookie(n.to_string())),
        _ => Err(format!(
            "`{s}` is not a hash key (uri, ip, header:NAME, cookie:NAME)"
        )),
    }
}

/// Parses a status range: `200-399`, or one status `200`.
pub fn parse_status_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("`{s}` is not a status range like 200-399");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if !(100..=599).contains(&a) || !(100..=599).contains(&b) || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

/// Parses `512KiB`, `64MiB`, `1GiB`, `10kB`, or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 512KiB, 64MiB, 1GiB or bytes)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "kB" | "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}` (use KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// Parses `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 250ms, 5s, 2m)"))?;
    let too_long = || format!("duration `{s}` is too long (at most {MAX_DURATION_DAYS} days)");
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_long)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(too_long)?),
        "us" | "µs" => Duration::from_micros(n),
        "" => return Err(format!("duration `{s}` needs a unit (us, ms, s, m, h)")),
        u => {
            return Err(format!(
                "unknown duration unit `{u}` in `{s}` (use us, ms, s, m, h)"
            ))
        }
    };
    // Deadlines are `now + duration` (and a cool-down may be multiplied):
    // a bound keeps that arithmetic far from overflow.
    if d > Duration::from_secs(MAX_DURATION_DAYS * 86_400) {
        return Err(too_long());
    }
    Ok(d)
}

/// The longest duration any setting takes.
pub const MAX_DURATION_DAYS: u64 = 365;

/// More CPUs than Linux supports (`CONFIG_NR_CPUS` is at most 8192).
const MAX_CPUS: usize = 8192;

/// Parses a CPU list: `1`, `0-3`, `0,2,4`, `0-1,4`.
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a.trim().parse().map_err(|_| format!("bad CPU `{part}`"))?;
            let b: usize = b.trim().parse().map_err(|_| format!("bad CPU `{part}`"))?;
            if a > b {
                return Err(format!("bad CPU range `{part}`"));
            }
            // Checked against the machine later; a bound here keeps a typo
            // from allocating the range first.
            if b >= MAX_CPUS {
                return Err(format!("CPU {b} does not exist (at most {MAX_CPUS} CPUs)"));
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| format!("bad CPU `{part}`"))?);
        }
    }
    if out.is_empty() {
        return Err("empty CPU list".into());
    }
    let mut seen = out.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != out.len() {
        return Err(format!("CPU list `{s}` names a CPU twice"));
    }
    Ok(out)
}

fn resolve(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{s}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{s}` resolves to no address"))
}

/// Builds a validated config from the file (if any) and the flags. Every
/// problem found is reported, each with its key path.
pub fn build(file: FileConfig, ov: &Overrides, online_cpus: usize) -> Result<Config, ConfigErrors> {
    let mut errs: Vec<ConfigError> = Vec::new();
    let mut err = |key: &str, msg: String| {
        errs.push(ConfigError {
            key: key.to_string(),
            message: msg,
        })
    };

    // [server]
    let listen_src: Vec<(String, String)> = if !ov.listen.is_empty() {
        ov.listen
            .iter()
            .map(|l| ("--listen".to_string(), l.clone()))
            .collect()
    } else if let Some(l) = &file.server.listen {
        l.iter()
            .enumerate()
            .map(|(i, a)| (format!("server.listen[{i}]"), a.clone()))
            .collect()
    } else {
        vec![("server.listen".into(), "127.0.0.1:8080".into())]
    };
    let mut listen: Vec<SocketAddr> = Vec::new();
    for (key, a) in &listen_src {
        match resolve(a) {
            // Port 0 (tests) never collides: the kernel picks one each.
            Ok(sa) if sa.port() != 0 && listen.contains(&sa) => {
                err(key, format!("{sa} is listed twice"))
            }
            Ok(sa) => listen.push(sa),
            Err(m) => err(key, m),
        }
    }
    if listen_src.is_empty() {
        err(
            "server.listen",
            "is empty: give at least one address".into(),
        );
    }
    let (cpus_key, cpus_src) = match (&ov.cpus, &file.server.cpus) {
        (Some(c), _) => ("--cpus", Some(c.clone())),
        (None, Some(c)) => ("server.cpus", Some(c.clone())),
        _ => ("server.cpus", None),
    };
    let cpus = match cpus_src.as_deref().map(parse_cpus) {
        Some(Ok(c)) => {
            // CPU numbers run up to the highest online one (an offline CPU
            // in the middle leaves a gap): start-up then checks each one
            // against the affinity mask, which leaves offline ones out.
            let exist = online_cpus.max(crate::shard::highest_online_cpu().map_or(0, |c| c + 1));
            if let Some(bad) = c.iter().find(|&&c| c >= exist) {
                err(
                    cpus_key,
                    format!("CPU {bad} does not exist (this machine has {exist})"),
                );
            }
            Some(c)
        }
        Some(Err(m)) => {
            err(cpus_key, m);
            None
        }
        None => None,
    };
    let shards_key = if ov.shards.is_some() {
        "--shards"
    } else {
        "server.shards"
    };
    let shards = ov
        .shards
        .or(file.server.shards)
        .unwrap_or_else(|| cpus.as_ref().map_or(online_cpus, Vec::len));
    if shards == 0 || shards > 1024 {
        err(
            shards_key,
            format!("must be between 1 and 1024, not {shards}"),
        );
    }
    // Only for a valid count: an absurd one (already an error) must not be
    // allocated first.
    let cpus = cpus.map(|c| (0..shards.clamp(1, 1024)).map(|i| c[i % c.len()]).collect());
    let admin_key = if ov.admin.is_some() {
        "--admin"
    } else {
        "server.admin"
    };
    let admin = match ov.admin.clone().or(file.server.admin.clone()) {
        None => None,
        // A bare port (`9090` or `:9090`) listens on loopback.
        Some(a) => match resolve(&match a.strip_prefix(':').unwrap_or(&a).parse::<u16>() {
            Ok(port) => format!("127.0.0.1:{port}"),
            Err(_) => a,
        }) {
            Ok(addr) if addr.port() != 0 && listen.contains(&addr) => {
                err(admin_key, format!("{addr} is also a client listener"));
                None
            }
            Ok(addr) => Some(addr),
            Err(m) => {
                err(admin_key, m);
                None
            }
        },
    };
    let metrics = !ov.no_metrics && file.server.metrics.unwrap_or(true);
    let stats_interval = match (&ov.stats_interval, &file.server.stats_interval) {
        (Some(v), _) => Some(dur(&mut err, "--stats-interval", &Some(v.clone()), "10s")),
        (None, Some(v)) => Some(dur(
            &mut err,
            "server.stats_interval",
            &Some(v.clone()),
            "10s",
        )),
        (None, None) => None,
    };
    let access_log = {
        let format = match file.log.format.as_deref().unwrap_or("common") {
            "common" | "clf" => LogFormat::Common,
            "json" => LogFormat::Json,
            f => {
                err(
                    "log.format",
                    format!("`{f}` is not a log format (common, json)"),
                );
                LogFormat::Common
            }
        };
        match ov.access_log.clone().or(file.log.access.clone()) {
            None => None,
            Some(p) if p.is_empty() => {
                let key = if ov.access_log.is_some() {
                    "--access-log"
                } else {
                    "log.access"
                };
                err(key, "must be \"stderr\" or a file path".into());
                None
            }
            Some(p) => Some(AccessLog {
                path: (p != "stderr").then_some(p),
                format,
            }),
        }
    };
    let drain_timeout = dur(
        &mut err,
        "server.drain_timeout",
        &file.server.drain_timeout,
        "10s",
    );
    let max_connections = file.server.max_connections.unwrap_or(16_384);
    if max_connections == 0 {
        err("server.max_connections", "must be at least 1".into());
    }

    // [limits]
    let l = &file.limits;
    let max_header_bytes = size(
        &mut err,
        "limits.max_header_bytes",
        &l.max_header_bytes,
        32 << 10,
    );
    if !(1024..=1 << 20).contains(&max_header_bytes) {
        err(
            "limits.max_header_bytes",
            "must be between 1KiB and 1MiB".into(),
        );
    }
    let max_headers = l.max_headers.unwrap_or(100);
    if max_headers == 0 || max_headers > crate::http::request::HEADER_TABLE {
        err(
            "limits.max_headers",
            format!(
                "must be between 1 and {}",
                crate::http::request::HEADER_TABLE
            ),
        );
    }
    let max_uri_bytes = size(&mut err, "limits.max_uri_bytes", &l.max_uri_bytes, 8 << 10);
    if max_uri_bytes == 0 || max_uri_bytes > max_header_bytes {
        err(
            "limits.max_uri_bytes",
            "must be between 1 and max_header_bytes".into(),
        );
    }
    let max_body_bytes = size(
        &mut err,
        "limits.max_body_bytes",
        &l.max_body_bytes,
        1 << 30,
    );
    let header_timeout = dur(&mut err, "limits.header_timeout", &l.header_timeout, "10s");
    let idle_timeout = dur(&mut err, "limits.idle_timeout", &l.idle_timeout, "60s");
    let body_timeout = dur(&mut err, "limits.body_timeout", &l.body_timeout, "30s");

    // [cache]
    let (cache_key, cache_src) = match &ov.cache_size {
        Some(s) => ("--cache-size", Some(SizeValue::Text(s.clone()))),
        None => ("cache.size", file.cache.size.clone()),
    };
    let cache_size = size(&mut err, cache_key, &cache_src, 256 << 20);
    let collapse_timeout = dur(
        &mut err,
        "cache.collapse_timeout",
        &file.cache.collapse_timeout,
        "5s",
    );
    let hit_for_miss = dur(
        &mut err,
        "cache.hit_for_miss",
        &file.cache.hit_for_miss,
        "10s",
    );
    let max_object_bytes = size(
        &mut err,
        "cache.max_object_size",
        &file.cache.max_object_size,
        8 << 20,
    );

    // [[pool]]
    let mut pools = Vec::new();
    let mut pool_sections = file.pool;
    // Which [[pool]] of the file each section is (None: made by --backend),
    // so that errors name the file's own index.
    let mut pool_origin: Vec<Option<usize>> = (0..pool_sections.len()).map(Some).collect();
    if !ov.backends.is_empty() {
        let mut p = match pool_sections.iter().position(|p| p.name == "default") {
            Some(i) => {
                let origin = pool_origin.remove(i);
                pool_origin.insert(0, origin);
                pool_sections.remove(i)
            }
            None => {
                pool_origin.insert(0, None);
                PoolSection {
                    name: "default".into(),
                    ..Default::default()
                }
            }
        };
        p.backends = ov
            .backends
            .iter()
            .map(|b| {
                let mut parts = b.split(',');
                let addr = parts.next().unwrap_or("").trim().to_string();
                let mut weight = None;
                for opt in parts {
                    match opt.trim().strip_prefix("weight=").map(str::parse::<u32>) {
                        Some(Ok(w)) => weight = Some(w),
                        _ => weight = Some(u32::MAX), // flagged below
                    }
                }
                BackendSection { addr, weight }
            })
            .collect();
        pool_sections.insert(0, p);
    }
    if let Some(b) = &ov.balance {
        if let Some(p) = pool_sections.first_mut() {
            p.balance = Some(b.clone());
        }
    }
    if let Some(h) = &ov.hash_key {
        if let Some(p) = pool_sections.first_mut() {
            p.hash_key = Some(h.clone());
        }
    }
    // Flags for the first pool need one to apply to.
    if pool_sections.is_empty() {
        for (given, flag) in [
            (ov.balance.is_some(), "--balance"),
            (ov.hash_key.is_some(), "--hash-key"),
            (ov.health_path.is_some(), "--health-path"),
            (ov.health_interval.is_some(), "--health-interval"),
        ] {
            if given {
                err(
                    flag,
                    "there is no pool to apply it to (give --backend)".into(),
                );
            }
        }
    }
    if ov.health_interval.is_some()
        && ov.health_path.is_none()
        && pool_sections.first().is_some_and(|p| p.health.is_none())
    {
        // Not checks of `/` the backends may not answer with 2xx/3xx.
        err(
            "--health-interval",
            "needs --health-path (or the pool's health section)".into(),
        );
    }
    if ov.health_path.is_some() || ov.health_interval.is_some() {
        if let Some(p) = pool_sections.first_mut() {
            let h = p.health.get_or_insert_with(Default::default);
            if let Some(path) = &ov.health_path {
                h.path = Some(path.clone());
            }
            if let Some(i) = &ov.health_interval {
                h.interval = Some(i.clone());
            }
        }
    }
    for (i, p) in pool_sections.iter().enumerate() {
        // The key an error names: the flag a value came from, else the
        // file's own pool index.
        let k = |f: &str| {
            let first = i == 0;
            if first && !ov.backends.is_empty() && f.starts_with("backends") {
                "--backend".to_string()
            } else if first && ov.balance.is_some() && f == "balance" {
                "--balance".to_string()
            } else if first && ov.hash_key.is_some() && f == "hash_key" {
                "--hash-key".to_string()
            } else if first
                && (ov.health_path.is_some() || ov.health_interval.is_some())
                && f.starts_with("health")
            {
                "--health-path / --health-interval".to_string()
            } else {
                match pool_origin[i] {
                    Some(j) => format!("pool[{j}].{f}"),
                    None => format!("--backend (pool default: {f})"),
                }
            }
        };
        if p.name.is_empty() {
            err(&k("name"), "must not be empty".into());
        }
        if pool_sections[..i].iter().any(|q| q.name == p.name) {
            err(&k("name"), format!("pool `{}` is defined twice", p.name));
        }
        let name = p.balance.as_deref().unwrap_or("round-robin");
        let balance = match Balance::ALL.into_iter().find(|b| b.name() == name) {
            Some(b) => b,
            None => {
                err(
                    &k("balance"),
                    format!("unknown algorithm `{name}` (round-robin, random, least-loaded, peak-ewma, hash, sticky)"),
                );
                Balance::RoundRobin
            }
        };
        let hash_key = match p.hash_key.as_deref().map(parse_hash_key) {
            None if balance == Balance::Hash => Some(HashKey::Uri),
            None => None,
            Some(Ok(h)) if matches!(balance, Balance::Hash | Balance::Sticky) => Some(h),
            Some(Ok(_)) => {
                err(
                    &k("hash_key"),
                    "only used by hash and sticky balancing".into(),
                );
                None
            }
            Some(Err(m)) => {
                err(&k("hash_key"), m);
                None
            }
        };
        let hash_balance_factor = match p.hash_balance_factor {
            None => 1.25,
            Some(f) if f == 0.0 || (1.0..=100.0).contains(&f) => f,
            Some(_) => {
                err(
                    &k("hash_balance_factor"),
                    "must be 0 (no bound) or between 1.0 and 100".into(),
                );
                1.25
            }
        };
        if p.load_header.is_some() && balance != Balance::PeakEwma {
            err(&k("load_header"), "only used by peak-ewma balancing".into());
        }
        if let Some(h) = &p.load_header {
            if h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                err(&k("load_header"), format!("`{h}` is not a header name"));
            }
        }
        let health = p.health.as_ref().map(|h| {
            let hk = |f: &str| k(&format!("health.{f}"));
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                err(&hk("path"), format!("`{path}` is not an absolute path"));
            }
            let interval = dur(&mut err, &hk("interval"), &h.interval, "2s");
            let timeout = dur(&mut err, &hk("timeout"), &h.timeout, "1s");
            let status = match parse_status_range(h.status.as_deref().unwrap_or("200-399")) {
                Ok(r) => r,
                Err(m) => {
                    err(&hk("status"), m);
                    (200, 399)
                }
            };
            let rise = h.rise.unwrap_or(2);
            let fall = h.fall.unwrap_or(3);
            for (name, v) in [("rise", rise), ("fall", fall)] {
                if v == 0 || v > 100 {
                    err(&hk(name), "must be between 1 and 100".into());
                }
            }
            let host = h.host.clone();
            if let Some(v) = &host {
                if v.is_empty() || v.bytes().any(|b| b <= b' ' || b == 0x7f || b == b',') {
                    err(&hk("host"), format!("`{v}` is not a host name"));
                }
            }
            ActiveHealth {
                path,
                host,
                interval,
                timeout,
                status,
                rise,
                fall,
            }
        });
        let eject = {
            let e = p.eject.as_ref();
            let ek = |f: &str| k(&format!("eject.{f}"));
            let none = None;
            let max_percent = e.and_then(|e| e.max_percent).unwrap_or(50);
            if max_percent > 100 {
                err(&ek("max_percent"), "must be between 0 and 100".into());
            }
            Eject {
                failures: e.and_then(|e| e.failures).unwrap_or(5),
                cooldown: dur(
                    &mut err,
                    &ek("cooldown"),
                    e.map_or(&none, |e| &e.cooldown),
                    "10s",
                ),
                max_cooldown: dur(
                    &mut err,
                    &ek("max_cooldown"),
                    e.map_or(&none, |e| &e.max_cooldown),
                    "5m",
                ),
                max_percent,
                on_5xx: e.and_then(|e| e.on_5xx).unwrap_or(false),
            }
        };
        let slow_start = dur_or_zero(&mut err, &k("slow_start"), &p.slow_start, Duration::ZERO);
        let sticky = match (&p.sticky, balance) {
            (None, Balance::Sticky) => Some(Sticky {
                cookie: "corral_backend".into(),
                secret: None,
            }),
            (Some(st), Balance::Sticky) => {
                let cookie = st.cookie.clone().unwrap_or_else(|| "corral_backend".into());
                if cookie.is_empty()
                    || !cookie
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    err(
                        &k("sticky.cookie"),
                        format!("`{cookie}` is not a cookie name"),
                    );
                }
                Some(Sticky {
                    cookie,
                    secret: st.secret.clone(),
                })
            }
            (Some(_), _) => {
                err(&k("sticky"), "only used with balance = \"sticky\"".into());
                None
            }
            (None, _) => None,
        };
        let retries = p.retries.unwrap_or(2);
        if retries > 10 {
            err(&k("retries"), "must be at most 10".into());
        }
        let retry_budget = p.retry_budget.unwrap_or(0.2);
        if !(0.0..=1.0).contains(&retry_budget) {
            err(
                &k("retry_budget"),
                "must be between 0.0 and 1.0 (a fraction of requests)".into(),
            );
        }
        if p.backends.len() > crate::balance::MAX_BACKENDS {
            err(
                &k("backends"),
                format!("at most {} backends per pool", crate::balance::MAX_BACKENDS),
            );
        }
        if p.backends.is_empty() {
            err(&k("backends"), "a pool needs at least one backend".into());
        }
        let mut backends = Vec::new();
        for (j, b) in p.backends.iter().enumerate() {
            match resolve(&b.addr) {
                Ok(addr) => {
                    let weight = b.weight.unwrap_or(1);
                    if weight == 0 || weight > 1000 {
                        err(
                            &k(&format!("backends[{j}].weight")),
                            "must be between 1 and 1000".into(),
                        );
                    }
                    let name = b.addr.trim();
                    if backends
                        .iter()
                        .any(|x: &Backend| x.addr == addr || x.name == name)
                    {
                        // Two entries would be one backend counted twice, with
                        // the same series twice in /metrics: raise the weight.
                        err(
                            &k(&format!("backends[{j}].addr")),
                            format!("{addr} is already a backend of this pool (use weight)"),
                        );
                    }
                    backends.push(Backend {
                        addr,
                        name: name.to_string(),
                        weight,
                    });
                }
                Err(m) => err(&k(&format!("backends[{j}].addr")), m),
            }
        }
        pools.push(PoolConfig {
            name: p.name.clone(),
            balance,
            hash_key,
            hash_balance_factor,
            load_header: p.load_header.as_ref().map(|h| h.to_ascii_lowercase()),
            ewma_decay: dur(&mut err, &k("ewma_decay"), &p.ewma_decay, "10s"),
            backends,
            health,
            eject,
            slow_start,
            sticky,
            retries,
            retry_budget,
            connect_timeout: dur(&mut err, &k("connect_timeout"), &p.connect_timeout, "3s"),
            response_timeout: dur(&mut err, &k("response_timeout"), &p.response_timeout, "60s"),
            body_timeout: dur(&mut err, &k("body_timeout"), &p.body_timeout, "60s"),
            keepalive: p.keepalive.unwrap_or(64),
            keepalive_timeout: dur(
                &mut err,
                &k("keepalive_timeout"),
                &p.keepalive_timeout,
                "30s",
            ),
        });
    }

    // [[store]] and --origin-dir
    let mut store_sections = file.store;
    let mut store_origin: Vec<Option<usize>> = (0..store_sections.len()).map(Some).collect();
    if let Some(dir) = &ov.origin_dir {
        // --origin-dir's store replaces the file's `dir`, and goes first.
        store_origin = std::iter::once(None)
            .chain(
                store_sections
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.name != "dir")
                    .map(|(j, _)| Some(j)),
            )
            .collect();
        store_sections.retain(|s| s.name != "dir");
        store_sections.insert(
            0,
            StoreSection {
                name: "dir".into(),
                root: dir.clone(),
                ..Default::default()
            },
        );
    }
    let mut stores = Vec::new();
    for (i, st) in store_sections.iter().enumerate() {
        let k = |f: &str| match store_origin[i] {
            Some(j) => format!("store[{j}].{f}"),
            None => "--origin-dir".to_string(),
        };
        if st.name.is_empty() {
            err(&k("name"), "must not be empty".into());
        }
        if store_sections[..i].iter().any(|q| q.name == st.name)
            || pools.iter().any(|p| p.name == st.name)
        {
            err(
                &k("name"),
                format!("`{}` names another pool or store", st.name),
            );
        }
        let root = match std::fs::canonicalize(&st.root) {
            Ok(r) if r.is_dir() => r,
            Ok(_) => {
                err(&k("root"), format!("`{}` is not a directory", st.root));
                Default::default()
            }
            Err(e) => {
                err(&k("root"), format!("`{}`: {e}", st.root));
                Default::default()
            }
        };
        let block_size = size(&mut err, &k("block_size"), &st.block_size, 4096);
        if !block_size.is_power_of_two() || !(512..=(1 << 20)).contains(&block_size) {
            err(
                &k("block_size"),
                "must be a power of two from 512 bytes to 1MiB (a multiple of the device's logical block)"
                    .into(),
            );
        }
        let max_merge = size(&mut err, &k("max_merge"), &st.max_merge, 128 << 10);
        if max_merge < block_size || max_merge > (8 << 20) {
            err(
                &k("max_merge"),
                "must be between block_size and 8MiB".into(),
            );
        }
        let max_gap = size(&mut err, &k("max_gap"), &st.max_gap, 16 << 10);
        let max_amplification = st.max_amplification.unwrap_or(1.5);
        if !(1.0..=16.0).contains(&max_amplification) {
            err(&k("max_amplification"), "must be between 1.0 and 16".into());
        }
        let mut merge_window = dur_or_zero(
            &mut err,
            &k("merge_window"),
            &st.merge_window,
            Duration::from_micros(200),
        );
        if merge_window > Duration::from_millis(100) {
            err(&k("merge_window"), "must be at most 100ms".into());
            merge_window = Duration::ZERO;
        }
        stores.push(StoreConfig {
            name: st.name.clone(),
            root,
            block_size,
            max_merge,
            max_gap,
            max_amplification,
            cache_bytes: size(&mut err, &k("cache_size"), &st.cache_size, cache_size / 8),
            open_files: st.open_files.unwrap_or(256).max(1),
            merge_window,
        });
    }

    // [[route]]
    let mut routes = Vec::new();
    for (i, r) in file.route.iter().enumerate() {
        let to = match (
            pools.iter().position(|p| p.name == r.to),
            stores.iter().position(|s| s.name == r.to),
        ) {
            (Some(p), _) => Target::Pool(p),
            (None, Some(s)) => Target::Store(s),
            (None, None) => {
                err(
                    &format!("route[{i}].to"),
                    format!("no pool or store named `{}`", r.to),
                );
                Target::Pool(0)
            }
        };
        let mut path_prefix = r.path_prefix.clone().unwrap_or_else(|| "/".into());
        if !path_prefix.starts_with('/') {
            err(
                &format!("route[{i}].path_prefix"),
                "must start with `/`".into(),
            );
        } else {
            // Requests are matched in normal form (decoded, no `//`, `.` or
            // `..` segments): so is the prefix, or it could never match.
            match String::from_utf8(crate::http::route_path(path_prefix.as_bytes()).into_owned()) {
                Ok(p) => path_prefix = p,
                Err(_) => err(
                    &format!("route[{i}].path_prefix"),
                    "its percent-escapes decode to bytes that are not UTF-8".into(),
                ),
            }
        }
        let host = r
            .host
            .as_deref()
            .filter(|h| *h != "*")
            // `a.example.` is `a.example`, as requests are matched.
            .map(|h| h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase());
        if host
            .as_deref()
            .is_some_and(|h| h.contains(':') && !h.starts_with('['))
        {
            // Requests are matched on the host without its port.
            err(
                &format!("route[{i}].host"),
                "a route matches the host without its port: drop the `:port`".into(),
            );
        }
        if routes
            .iter()
            .any(|x: &Route| x.host == host && x.path_prefix == path_prefix)
        {
            err(
                &format!("route[{i}]"),
                "the same host and path_prefix as an earlier route, which always wins".into(),
            );
        }
        routes.push(Route {
            host,
            path_prefix,
            to,
        });
    }
    let default = if !pools.is_empty() {
        Some(Target::Pool(0))
    } else if !stores.is_empty() {
        Some(Target::Store(0))
    } else {
        None
    };
    match default {
        None => err(
            "pool",
            "no origin: give --backend ADDR, --origin-dir DIR, a [[pool]] or a [[store]]".into(),
        ),
        Some(to)
            if !routes
                .iter()
                .any(|r| r.host.is_none() && r.path_prefix == "/") =>
        {
            // Anything unrouted goes to the first pool (else the first
            // store), like a default server.
            routes.push(Route {
                host: None,
                path_prefix: "/".into(),
                to,
            });
        }
        Some(_) => {}
    }

    let block_bytes: u64 = stores.iter().map(|s| s.cache_bytes).sum();
    if cache_size > 0 && block_bytes >= cache_size {
        // They come out of the cache's budget: all of it leaves the
        // response cache nothing (caching silently off), more the process
        // over its budget.
        err(
            "store",
            format!(
                "the stores' block caches ({block_bytes} bytes) leave nothing of the cache size ({cache_size} bytes) they come out of for the response cache"
            ),
        );
    }
    if !errs.is_empty() {
        return Err(ConfigErrors(errs));
    }
    Ok(Config {
        listen,
        shards,
        cpus,
        admin,
        metrics,
        stats_interval,
        access_log,
        drain_timeout,
        max_connections,
        limits: Limits {
            max_header_bytes: max_header_bytes as usize,
            max_headers,
            max_uri_bytes: max_uri_bytes as usize,
            max_body_bytes,
            header_timeout,
            idle_timeout,
            body_timeout,
        },
        cache: CacheConfig {
            // The stores' block caches come out of the same budget.
            size_bytes: cache_size.saturating_sub(stores.iter().map(|s| s.cache_bytes).sum()),
            collapse: file.cache.collapse.unwrap_or(true),
            max_object_bytes,
            collapse_timeout,
            hit_for_miss,
        },
        pools,
        stores,
        routes,
    })
}

fn dur(
    err: &mut impl FnMut(&str, String),
    key: &str,
    v: &Option<String>,
    default: &str,
) -> Duration {
    let s = v.as_deref().unwrap_or(default);
    match parse_duration(s) {
        Ok(d) if d.is_zero() => {
            err(key, "must be greater than zero".into());
            Duration::from_secs(1)
        }
        Ok(d) => d,
        Err(m) => {
            err(key, m);
            Duration::from_secs(1)
        }
    }
}

/// A duration that may be zero; `default` when unset (0 on an error).
fn dur_or_zero(
    err: &mut impl FnMut(&str, String),
    key: &str,
    v: &Option<String>,
    default: Duration,
) -> Duration {
    match v.as_deref().map(parse_duration) {
        None => default,
        Some(Ok(d)) => d,
        Some(Err(m)) => {
            err(key, m);
            Duration::ZERO
        }
    }
}

fn size(err: &mut impl FnMut(&str, String), key: &str, v: &Option<SizeValue>, default: u64) -> u64 {
    match v {
        None => default,
        Some(SizeValue::Bytes(n)) => *n,
        Some(SizeValue::Text(s)) => parse_size(s).unwrap_or_else(|m| {
            err(key, m);
            default
        }),
    }
}

/// Reads, parses and validates a config file plus flags.
pub fn load(
    path: Option<&str>,
    ov: &Overrides,
    online_cpus: usize,
) -> Result<Config, ConfigErrors> {
    let file = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    key: "--config".into(),
                    message: format!("cannot read {p}: {e}"),
                }])
            })?;
            let (file, mut errors) = parse_file_all(&text);
            match file {
                // Every error: the entries' and then the file's meaning.
                Some(file) if !errors.is_empty() => {
                    if let Err(more) = build(file, ov, online_cpus) {
                        errors.extend(more.0);
                    }
                    return Err(ConfigErrors(errors));
                }
                Some(file) => file,
                None => return Err(ConfigErrors(errors)),
            }
        }
        None => FileConfig::default(),
    };
    build(file, ov, online_cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<Config, ConfigErrors> {
        build(parse_file(text)?, &Overrides::default(), 4)
    }

    #[test]
    fn every_entry_error_is_reported_with_the_meaning_errors() {
        let text = "[server]\nlisten = [\"127.0.0.1:0\"]\nbogus = 1\nshards = \"two\"\n\
                    [limits]\nidle_timeout = \"forever\"\nalso = 2\n\
                    [[pool]]\nname = \"a\"\nbackends = [{ addr = \"127.0.0.1:1\", weight = 0 }]\n";
        let (file, errors) = parse_file_all(text);
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["server.bogus", "server.shards", "limits.also"]);
        assert!(
            errors[0].message.contains("(line 3)"),
            "{}",
            errors[0].message
        );
        assert!(
            errors[2].message.contains("(line 7)"),
            "{}",
            errors[2].message
        );
        // A value left out would look defaulted: the meaning is not checked.
        assert!(file.is_none());
        // Unknown keys alone: it is, with every error in one report.
        let (file, errors) = parse_file_all(&text.replace("shards = \"two\"\n", ""));
        assert_eq!(errors.len(), 2);
        let more = build(file.unwrap(), &Overrides::default(), 4).unwrap_err();
        assert_keys(
            &more,
            &["limits.idle_timeout", "pool[0].backends[0].weight"],
        );
        // A required field of the wrong type is not then reported missing.
        let (file, errors) = parse_file_all("[[pool]]\nname = 5\nbackends = []\n");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert!(file.is_none() && keys == ["pool[0].name"], "{errors:?}");
        // An error inside an inline table, or in an entry over several
        // lines, is taken out of the parsed tree: the report goes on (the
        // later ones without line numbers), and with unknown keys only,
        // the meaning is checked too.
        let (file, errors) = parse_file_all(
            "[[pool]]\nname = \"a\"\nbackends = [{ addr = \"127.0.0.1:1\", wieght = 2 }]\nbogus = 1\n\
             health = { path = \"/h\", intervall = \"1s\" }\n[limits]\nidle_timeout = \"forever\"\n",
        );
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "pool[0].backends[0].wieght",
                "pool[0].bogus",
                "pool[0].health.intervall"
            ],
            "{errors:?}"
        );
        let more = build(file.unwrap(), &Overrides::default(), 4).unwrap_err();
        assert_keys(&more, &["limits.idle_timeout"]);
        let (file, errors) =
            parse_file_all("[server]\nbogus = [1,\n2]\nalso = 1\nshards = \"x\"\n");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert!(file.is_none(), "{errors:?}");
        assert_eq!(
            keys,
            ["server.bogus", "server.also", "server.shards"],
            "{errors:?}"
        );
        // A syntax error still stops the report.
        let (file, errors) = parse_file_all("[server]\nbogus = [1,\n2]\nx = = 1\n");
        assert!(file.is_none() && errors.len() == 1, "{errors:?}");
    }

    /// Every key of `want` is among the errors' keys.
    fn assert_keys(e: &ConfigErrors, want: &[&str]) {
        let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
        for k in want {
            assert!(keys.contains(k), "missing {k} in {keys:?}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert_eq!(parse_cpus("0-2,5"), Ok(vec![0, 1, 2, 5]));
        assert!(parse_cpus("1,1").is_err());
        assert!(parse_cpus("3-1").is_err());
        // Found by review: these panicked or wrapped.
        assert!(parse_cpus("0-18446744073709551615").is_err());
        assert!(parse_cpus("0-2000000000").is_err());
        assert!(parse_duration("10000000000000000000s").is_err());
        assert!(parse_duration("307445734561825861m").is_err());
        assert!(parse_duration("5124095576030432h").is_err());
        assert!(parse_duration("366d").is_err());
        assert_eq!(
            parse_duration("8760h"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        assert!(parse_duration("8761h").is_err());
    }

    #[test]
    fn full_file() {
        let c = cfg(r#"
[server]
listen = ["127.0.0.1:0"]
shards = 2
cpus = "0-1"
[limits]
max_header_bytes = "16KiB"
max_body_bytes = 1048576
header_timeout = "2s"
[cache]
size = "64MiB"
[[pool]]
name = "web"
backends = [{ addr = "127.0.0.1:9001", weight = 3 }, { addr = "127.0.0.1:9002" }]
connect_timeout = "250ms"
[[pool]]
name = "api"
backends = [{ addr = "127.0.0.1:9003" }]
[[route]]
path_prefix = "/api/"
to = "api"
[[route]]
host = "static.example"
to = "web"
"#)
        .unwrap();
        assert_eq!(c.shards, 2);
        assert_eq!(c.cpus, Some(vec![0, 1]));
        assert_eq!(c.limits.max_header_bytes, 16 << 10);
        assert_eq!(c.limits.max_body_bytes, 1 << 20);
        assert_eq!(c.pools[0].backends[0].weight, 3);
        assert_eq!(c.pools[0].connect_timeout, Duration::from_millis(250));
        assert_eq!(c.route(None, b"/api/x"), Some(Target::Pool(1)));
        assert_eq!(
            c.route(Some(b"static.example"), b"/api/x"),
            Some(Target::Pool(0))
        );
        assert_eq!(c.route(Some(b"other"), b"/x"), Some(Target::Pool(0)));
    }

    #[test]
    fn balancing_health_and_failover_keys() {
        let c = cfg(r#"
[[pool]]
name = "app"
balance = "hash"
hash_key = "header:X-User"
hash_balance_factor = 1.5
backends = [{ addr = "127.0.0.1:1" }, { addr = "127.0.0.1:2", weight = 3 }]
health = { path = "/healthz", host = "app.example", interval = "500ms", timeout = "200ms", status = "200-299", rise = 1, fall = 2 }
eject = { failures = 3, cooldown = "2s", max_cooldown = "1m", max_percent = 30, on_5xx = true }
slow_start = "5s"
retries = 1
retry_budget = 0.1
[[pool]]
name = "sessions"
balance = "sticky"
sticky = { cookie = "sid", secret = "s3cret" }
backends = [{ addr = "127.0.0.1:3" }]
"#)
        .unwrap();
        let p = &c.pools[0];
        assert_eq!(p.balance, Balance::Hash);
        assert_eq!(p.hash_key, Some(HashKey::Header("x-user".into())));
        assert_eq!(p.hash_balance_factor, 1.5);
        let h = p.health.as_ref().unwrap();
        assert_eq!(
            (h.path.as_str(), h.status, h.rise, h.fall),
            ("/healthz", (200, 299), 1, 2)
        );
        assert_eq!(h.interval, Duration::from_millis(500));
        assert_eq!(h.host.as_deref(), Some("app.example"));
        // A backend keeps its name as configured (for Host), with its address.
        assert_eq!(p.backends[1].name, "127.0.0.1:2");
        assert_eq!(p.eject.failures, 3);
        assert!(p.eject.on_5xx);
        assert_eq!(p.slow_start, Duration::from_secs(5));
        assert_eq!((p.retries, p.retry_budget), (1, 0.1));
        let st = c.pools[1].sticky.as_ref().unwrap();
        assert_eq!(st.cookie, "sid");
        // Defaults: round robin, no active checks, passive ejection on.
        let d = cfg("[[pool]]\nname = \"d\"\nbackends = [{ addr = \"127.0.0.1:1\" }]\n").unwrap();
        let p = &d.pools[0];
        assert_eq!(p.balance, Balance::RoundRobin);
        assert!(p.health.is_none() && p.sticky.is_none());
        assert_eq!((p.eject.failures, p.retries), (5, 2));
    }

    #[test]
    fn stores_and_routes_to_them() {
        let root = std::env::temp_dir();
        let c = cfg(&format!(
            "[[pool]]\nname = \"app\"\nbackends = [{{ addr = \"127.0.0.1:1\" }}]\n\
             [[store]]\nname = \"files\"\nroot = \"{}\"\nblock_size = \"8KiB\"\nmax_merge = \"256KiB\"\nmerge_window = \"0s\"\n\
             [[route]]\npath_prefix = \"/files/\"\nto = \"files\"\n",
            root.display()
        ))
        .unwrap();
        let st = &c.stores[0];
        assert_eq!((st.block_size, st.max_merge), (8192, 256 << 10));
        assert_eq!(st.merge_window, Duration::ZERO);
        assert_eq!(c.route(None, b"/files/a"), Some(Target::Store(0)));
        assert_eq!(c.route(None, b"/other"), Some(Target::Pool(0)));
        // Prefixes are kept in the normal form requests are matched in.
        let c = cfg(
            "[[pool]]\nname = \"app\"\nbackends = [{ addr = \"127.0.0.1:1\" }]\n\
             [[route]]\npath_prefix = \"/a%20b//c/./\"\nto = \"app\"\n",
        )
        .unwrap();
        assert_eq!(c.routes[0].path_prefix, "/a b/c/");
        let e = cfg("[[store]]\nname = \"s\"\nroot = \"/no/such/dir\"\nblock_size = 1000\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("store[0].root") && e.contains("store[0].block_size"),
            "{e}"
        );
        // --origin-dir alone: the only origin.
        let file = parse_file("").unwrap();
        let ov = Overrides {
            origin_dir: Some(root.display().to_string()),
            ..Default::default()
        };
        let c = build(file, &ov, 2).unwrap();
        assert_eq!(c.route(None, b"/x"), Some(Target::Store(0)));
    }

    #[test]
    fn admin_takes_an_address_or_a_loopback_port() {
        let c = |admin: &str| {
            let file = parse_file(&format!(
                "[server]\nadmin = \"{admin}\"\n[[pool]]\nname = \"d\"\nbackends = [{{ addr = \"127.0.0.1:1\" }}]\n"
            ))
            .unwrap();
            build(file, &Overrides::default(), 2).map(|c| c.admin)
        };
        assert_eq!(c("9090").unwrap(), Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c(":9091").unwrap(), Some("127.0.0.1:9091".parse().unwrap()));
        assert_eq!(
            c("0.0.0.0:80").unwrap(),
            Some("0.0.0.0:80".parse().unwrap())
        );
        assert!(c("nowhere")
            .unwrap_err()
            .to_string()
            .contains("server.admin"));
        // "::1" is an address without a port, not port 1.
        assert!(c("::1").unwrap_err().to_string().contains("server.admin"));
    }

    #[test]
    fn an_absurd_shard_count_is_an_error_not_an_allocation() {
        // With a CPU list, the per-shard CPUs were built before the range
        // error was returned: a panic (capacity overflow) or an abort.
        for shards in [1025usize, 1 << 40, usize::MAX] {
            let file =
                parse_file("[[pool]]\nname = \"d\"\nbackends = [{ addr = \"127.0.0.1:1\" }]\n")
                    .unwrap();
            let ov = Overrides {
                shards: Some(shards),
                cpus: Some("0".into()),
                ..Default::default()
            };
            let e = build(file, &ov, 2).unwrap_err();
            assert!(e.to_string().contains("--shards"), "{e}");
        }
    }

    #[test]
    fn bad_balancing_values_name_their_keys() {
        let e = cfg(r#"
[[pool]]
name = "a"
balance = "round-robin"
hash_key = "uri"
load_header = "X-Load"
sticky = { cookie = "x" }
health = { status = "600", rise = 0, host = "a b" }
eject = { max_percent = 120 }
retry_budget = 2.0
backends = [{ addr = "127.0.0.1:1" }]
"#)
        .unwrap_err()
        .to_string();
        for key in [
            "pool[0].hash_key",
            "pool[0].load_header",
            "pool[0].sticky",
            "pool[0].health.status",
            "pool[0].health.rise",
            "pool[0].health.host",
            "pool[0].eject.max_percent",
            "pool[0].retry_budget",
        ] {
            assert!(e.contains(key), "{key} missing from: {e}");
        }
        assert!(parse_hash_key("cookie:").is_err());
        assert_eq!(parse_hash_key("ip"), Ok(HashKey::Ip));
    }

    #[test]
    fn unknown_key_names_its_path_and_line() {
        let e = cfg("[server]\nlisten = [\"127.0.0.1:0\"]\n\n[[pool]]\nname = \"a\"\nbackends = [{ addr = \"127.0.0.1:1\", wieght = 2 }]\n")
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("pool[0].backends[0]"), "{s}");
        assert!(s.contains("wieght"), "{s}");
        assert!(s.contains("line 6"), "{s}");
    }

    #[test]
    fn duplicate_backends_and_dead_routes_are_errors() {
        let e = cfg(r#"
[server]
listen = ["127.0.0.1:0"]
[[pool]]
name = "a"
backends = [{ addr = "127.0.0.1:9001" }, { addr = "127.0.0.1:9001" }]
[[pool]]
name = "b"
backends = [{ addr = "127.0.0.1:9002" }]
[[route]]
path_prefix = "/api/"
to = "a"
[[route]]
path_prefix = "/api/"
to = "b"
[[route]]
host = "example.com:8080"
to = "b"
"#)
        .unwrap_err();
        assert_keys(
            &e,
            &["pool[0].backends[1].addr", "route[1]", "route[2].host"],
        );
    }

    #[test]
    fn listeners_are_given_once_each() {
        let e = cfg(r#"
[server]
listen = ["127.0.0.1:8181", "127.0.0.1:8181"]
admin = "127.0.0.1:8181"
[[pool]]
name = "a"
backends = [{ addr = "127.0.0.1:9001" }]
"#)
        .unwrap_err();
        assert_keys(&e, &["server.listen[1]", "server.admin"]);
        let e = cfg(r#"
[server]
listen = []
[[pool]]
name = "a"
backends = [{ addr = "127.0.0.1:9001" }]
"#)
        .unwrap_err();
        assert_keys(&e, &["server.listen"]);
    }

    #[test]
    fn block_caches_must_fit_in_the_cache() {
        let root = std::env::temp_dir();
        let text = |store: &str| {
            format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\n[cache]\nsize = \"64MiB\"\n[[store]]\nname = \"s\"\nroot = \"{}\"\ncache_size = \"{store}\"\n",
                root.display()
            )
        };
        let e = cfg(&text("1GiB")).unwrap_err();
        assert!(e.0.iter().any(|e| e.key == "store"), "{e}");
        // All of it would turn caching off without a word.
        let e = cfg(&text("64MiB")).unwrap_err();
        assert!(e.0.iter().any(|e| e.key == "store"), "{e}");
        let c = cfg(&text("16MiB")).unwrap();
        assert_eq!(c.cache.size_bytes, 48 << 20);
    }

    #[test]
    fn every_error_is_reported() {
        let e = cfg(r#"
[server]
listen = ["not an address"]
shards = 0
[limits]
header_timeout = "soon"
[[pool]]
name = "a"
balance = "fastest"
backends = [{ addr = "127.0.0.1:1", weight = 0 }]
[[route]]
to = "nope"
"#)
        .unwrap_err();
        assert_keys(
            &e,
            &[
                "server.listen[0]",
                "server.shards",
                "limits.header_timeout",
                "pool[0].balance",
                "pool[0].backends[0].weight",
                "route[0].to",
            ],
        );
    }

    #[test]
    fn flags_override_file() {
        let file = parse_file("[server]\nlisten = [\"127.0.0.1:1\"]\n").unwrap();
        let ov = Overrides {
            listen: vec!["127.0.0.1:0".into()],
            backends: vec!["127.0.0.1:9000,weight=5".into()],
            shards: Some(3),
            ..Default::default()
        };
        let c = build(file, &ov, 2).unwrap();
        assert_eq!(c.listen[0].port(), 0);
        assert_eq!(c.shards, 3);
        assert_eq!(c.pools[0].name, "default");
        assert_eq!(c.pools[0].backends[0].weight, 5);
    }

    #[test]
    fn errors_name_the_flag_or_the_files_own_index() {
        // With -b, the flag's pool goes first: the file's first pool is
        // still `pool[0]` in messages, and a bad -b value names the flag.
        let file = parse_file(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[[pool]]\nname = \"a\"\nbalance = \"bogus\"\nbackends = [{ addr = \"127.0.0.1:1\" }]\n",
        )
        .unwrap();
        let ov = Overrides {
            backends: vec!["127.0.0.1:9000,weight=0".into()],
            balance: None,
            ..Default::default()
        };
        let e = build(file, &ov, 2).unwrap_err();
        assert_keys(&e, &["pool[0].balance", "--backend"]);
        let root = std::env::temp_dir();
        let file = parse_file(&format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[[store]]\nname = \"s\"\nroot = \"{}\"\nblock_size = 1000\n",
            root.display()
        ))
        .unwrap();
        let ov = Overrides {
            origin_dir: Some(root.display().to_string()),
            ..Default::default()
        };
        let e = build(file, &ov, 2).unwrap_err();
        assert_keys(&e, &["store[0].block_size"]);
    }

    #[test]
    fn pool_flags_need_a_pool_and_an_interval_needs_a_path() {
        let root = std::env::temp_dir().display().to_string();
        let file = parse_file("[server]\nlisten = [\"127.0.0.1:0\"]\n").unwrap();
        let ov = Overrides {
            origin_dir: Some(root),
            balance: Some("random".into()),
            health_interval: Some("1s".into()),
            ..Default::default()
        };
        let e = build(file, &ov, 2).unwrap_err();
        assert_keys(&e, &["--balance", "--health-interval"]);
        let file = parse_file("[server]\nlisten = [\"127.0.0.1:0\"]\n").unwrap();
        let ov = Overrides {
            backends: vec!["127.0.0.1:9000".into()],
            health_interval: Some("1s".into()),
            ..Default::default()
        };
        let e = build(file, &ov, 2).unwrap_err();
        assert_keys(&e, &["--health-interval"]);
        // With a path, or a health section to retime, it is fine.
        let file = parse_file("[server]\nlisten = [\"127.0.0.1:0\"]\n").unwrap();
        let ov = Overrides {
            backends: vec!["127.0.0.1:9000".into()],
            health_path: Some("/hc".into()),
            health_interval: Some("1s".into()),
            ..Default::default()
        };
        let c = build(file, &ov, 2).unwrap();
        assert_eq!(c.pools[0].health.as_ref().unwrap().path, "/hc");
    }

    #[test]
    fn no_origin_is_an_error() {
        let e = cfg("").unwrap_err();
        assert_eq!(e.0[0].key, "pool");
    }
}
