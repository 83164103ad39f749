//! The `loadgen` binary: flags → [`loadgen::Options`] → run → outputs.

use clap::Parser;
use loadgen::keys::Dist;
use std::io::IsTerminal;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "loadgen",
    version,
    about = "HTTP/1.1 load generator with coordinated-omission-corrected HdrHistogram latency"
)]
struct Cli {
    /// Target URL (http://host:port/path); `{key}` is replaced by the key.
    url: String,
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 64)]
    connections: usize,
    /// Run time.
    #[arg(short = 'd', long, default_value = "10s")]
    duration: String,
    /// Stop after N responses instead of after --duration.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Open loop: N requests/s in total, latency from the intended send time.
    #[arg(short = 'R', long)]
    rate: Option<f64>,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Worker threads, one executor each.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// CPUs to pin worker threads to: "0", "0-3", "0,2".
    #[arg(long)]
    cpus: Option<String>,
    /// Spread requests over N keys.
    #[arg(long)]
    keys: Option<u64>,
    /// uniform | zipf:S
    #[arg(long, default_value = "uniform")]
    dist: String,
    /// Every connection asks for the same fresh key at the same instant, round after round.
    #[arg(long)]
    herd: bool,
    /// Random Range requests of SIZE bytes.
    #[arg(long)]
    range: Option<String>,
    /// Object size that --range picks offsets within.
    #[arg(long)]
    object_size: Option<String>,
    /// Extra request header "Name: value", repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Per-request timeout.
    #[arg(long, default_value = "10s")]
    timeout: String,
    /// Write the HdrHistogram percentile distribution (.hgrm) here.
    #[arg(long)]
    hgrm: Option<String>,
    /// Write the JSON summary here.
    #[arg(long)]
    json: Option<String>,
    /// Write a latency percentile plot (SVG) here.
    #[arg(long)]
    svg: Option<String>,
    /// Yields on EAGAIN before parking on io_uring: spinning is fastest on a
    /// core of its own; use 0 when sharing the core with a server.
    #[arg(long, default_value_t = loadgen::engine::SPIN_YIELDS)]
    spin: u32,
    /// Seed for keys and ranges.
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
}

fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    let mut v = Vec::new();
    for p in s.split(',').filter(|p| !p.is_empty()) {
        match p.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.parse().map_err(|_| format!("bad CPU `{p}`"))?;
                let b: usize = b.parse().map_err(|_| format!("bad CPU `{p}`"))?;
                // A CPU set holds CPUs 0 to 1023 (CPU_SETSIZE).
                if b >= 1024 {
                    return Err(format!("CPU `{p}`: CPU numbers go up to 1023"));
                }
                v.extend(a..=b);
            }
            None => v.push(p.parse().map_err(|_| format!("bad CPU `{p}`"))?),
        }
    }
    Ok(v)
}

fn options(cli: &Cli) -> Result<loadgen::Options, String> {
    let mut o = loadgen::Options::new(&cli.url)?;
    o.connections = cli.connections;
    o.duration = loadgen::parse_duration(&cli.duration)?;
    o.requests = cli.requests;
    o.rate = cli.rate;
    o.pipeline = cli.pipeline;
    o.threads = cli.threads;
    o.cpus = cli.cpus.as_deref().map(parse_cpus).transpose()?;
    o.keys = cli.keys;
    o.dist = Dist::parse(&cli.dist)?;
    o.herd = cli.herd;
    o.range = cli.range.as_deref().map(loadgen::parse_size).transpose()?;
    o.object_size = cli
        .object_size
        .as_deref()
        .map(loadgen::parse_size)
        .transpose()?;
    o.method = cli.method.clone();
    o.timeout = loadgen::parse_duration(&cli.timeout)?;
    o.seed = cli.seed;
    o.spin_yields = cli.spin;
    for h in &cli.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("header `{h}` is not `Name: value`"))?;
        o.headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    o.progress =
        std::io::stderr().is_terminal() && o.duration.as_secs() >= 3 && o.requests.is_none();
    Ok(o)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = match options(&cli) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match loadgen::run(opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(1);
        }
    };
    print!("{}", report.summary());
    let write = |path: &Option<String>, text: String| {
        if let Some(p) = path {
            if let Err(e) = std::fs::write(p, text) {
                eprintln!("loadgen: cannot write {p}: {e}");
            }
        }
    };
    write(&cli.hgrm, loadgen::stats::hgrm(&report.stats.latency));
    write(&cli.json, report.json() + "\n");
    write(
        &cli.svg,
        loadgen::stats::svg(
            &report.stats.latency,
            &format!("{} — {}", report.url, report.mode),
        ),
    );
    ExitCode::SUCCESS
}
