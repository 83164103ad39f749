//! The `corral` binary: flags → config → shards. The only place errors become
//! exit codes: 2 for a bad config or a failed start-up.

use clap::{Args, Parser, Subcommand};
use corral::config::{self, Overrides};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "A shard-per-core caching reverse proxy and load balancer on io_uring"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// A self-contained tour: built-in origins, the proxy and load on loopback.
    Demo {
        /// Rough length of the tour, 10 to 120 (each of its phases needs
        /// about a second of load to say anything).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(10..=120))]
        seconds: u64,
    },
    /// Validate a config file; exit 0, or 2 with every error named by its key.
    CheckConfig { file: String },
}

#[derive(Args, Default)]
struct RunArgs {
    /// TOML config file.
    #[arg(short = 'c', long)]
    config: Option<String>,
    /// Client listener, repeatable (default 127.0.0.1:8080).
    #[arg(short = 'l', long)]
    listen: Vec<String>,
    /// Backend of the pool "default": ADDR[,weight=N], repeatable.
    #[arg(short = 'b', long)]
    backend: Vec<String>,
    /// round-robin (default) | random | least-loaded | peak-ewma | hash | sticky
    #[arg(long)]
    balance: Option<String>,
    /// For hash/sticky: uri | ip | header:NAME | cookie:NAME
    #[arg(long)]
    hash_key: Option<String>,
    /// Serve DIR as the origin store.
    #[arg(long)]
    origin_dir: Option<String>,
    /// In-memory cache budget for the whole process (default 256MiB).
    #[arg(long)]
    cache_size: Option<String>,
    /// Number of shards (default: one per CPU in --cpus, else per online CPU).
    #[arg(long)]
    shards: Option<usize>,
    /// CPUs to pin shards to: "1", "0-3", "0,2,4".
    #[arg(long)]
    cpus: Option<String>,
    /// Admin listener address.
    #[arg(long)]
    admin: Option<String>,
    /// Active health checks: GET PATH on each backend.
    #[arg(long)]
    health_path: Option<String>,
    /// Health check interval (default 2s).
    #[arg(long)]
    health_interval: Option<String>,
    /// Do not record per-request statistics (latency histograms, counters).
    #[arg(long)]
    no_metrics: bool,
    /// Print a one-line summary on stderr this often (e.g. 10s).
    #[arg(long)]
    stats_interval: Option<String>,
    /// Write an access log: "stderr" or a file path.
    #[arg(long)]
    access_log: Option<String>,
}

impl RunArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            backends: self.backend.clone(),
            balance: self.balance.clone(),
            hash_key: self.hash_key.clone(),
            origin_dir: self.origin_dir.clone(),
            cache_size: self.cache_size.clone(),
            shards: self.shards,
            cpus: self.cpus.clone(),
            admin: self.admin.clone(),
            health_path: self.health_path.clone(),
            health_interval: self.health_interval.clone(),
            no_metrics: self.no_metrics,
            stats_interval: self.stats_interval.clone(),
            access_log: self.access_log.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::CheckConfig { file }) => {
            match config::load(
                Some(&file),
                &Overrides::default(),
                corral::shard::online_cpus(),
            ) {
                Ok(c) => {
                    println!(
                        "{file}: ok ({} listeners, {} shards, {} pools, {} routes)",
                        c.listen.len(),
                        c.shards,
                        c.pools.len(),
                        c.routes.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(errs) => {
                    for e in &errs.0 {
                        eprintln!("{file}: {e}");
                    }
                    ExitCode::from(2)
                }
            }
        }
        Some(Cmd::Demo { seconds }) => match corral::demo::run(seconds) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("corral demo: {e}");
                ExitCode::from(1)
            }
        },
        None => run(&cli.run),
    }
}

fn run(args: &RunArgs) -> ExitCode {
    let cfg = match config::load(
        args.config.as_deref(),
        &args.overrides(),
        corral::shard::online_cpus(),
    ) {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs.0 {
                eprintln!("corral: config error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    let shards = cfg.shards;
    // Handlers first: a SIGTERM while the shards start (which can take a
    // while) stops them cleanly too.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("corral: cannot install a signal handler: {e}");
            return ExitCode::from(2);
        }
    }
    let running = match corral::shard::start_with(cfg, stop.clone()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("corral: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    for a in &running.addrs {
        println!("corral: listening on {a} ({shards} shards)");
    }
    if let Some(a) = running.admin {
        println!("corral: admin on http://{a}/");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    running.join();
    if stop.load(Ordering::SeqCst) {
        eprintln!("corral: stopped");
    }
    ExitCode::SUCCESS
}
